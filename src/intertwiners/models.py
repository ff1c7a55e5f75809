"""The paper's architectures: the Myrtle CNN, the CIFAR ResNet20, and an MLP; safetensors save/load.

Every constructor records its arguments in ``model.intertwiners_config`` so that :func:`save` can
write a JSON config beside the weights and :func:`load` can rebuild the model without unpickling.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ._util import resolve_device
from .activations import activation_name, make_activation

# Myrtle CNN activation sites and the paper's numbering of them (Fig. 1, Table 2: layers 3/6/10/14).
MYRTLE_PAPER_LAYERS = {"relu1": 3, "relu2": 6, "relu3": 10, "relu4": 14}


def _activation_config(activation: str | nn.Module) -> str:
    return activation if isinstance(activation, str) else activation_name(activation)


def myrtle_cnn(width: int = 64, num_classes: int = 10, in_channels: int = 3, activation: str | nn.Module = "relu",
               batch_norm: bool = True, input_size: int = 32) -> nn.Sequential:
    """The Myrtle CNN ("mCNN") of the paper.

    conv3x3 in->w, [BN], act | conv w->2w, [BN], act, maxpool2 | conv 2w->4w, [BN], act, maxpool2 |
    conv 4w->8w, [BN], act, maxpool2 | maxpool(input_size/8), flatten, linear 8w->classes.
    Convolutions have no bias when followed by batch norm, and a bias otherwise. Input (N, in_channels,
    input_size, input_size); ``input_size`` must be a multiple of 8. Activation sites: relu1..relu4
    (named ``relu*`` whatever the activation is).
    """
    _check_kwargs("myrtle_cnn", width=width, num_classes=num_classes, in_channels=in_channels, batch_norm=batch_norm,
                  input_size=input_size)
    check_activation(activation)
    if input_size % 8 or input_size < 8:
        raise ValueError(f"myrtle_cnn needs input_size a positive multiple of 8, got {input_size}")
    if width < 1 or num_classes < 1 or in_channels < 1:
        raise ValueError("myrtle_cnn: width, num_classes and in_channels must be positive")
    widths = [in_channels, width, 2 * width, 4 * width, 8 * width]
    layers: list[tuple[str, nn.Module]] = []
    for i in range(1, 5):
        layers.append((f"conv{i}", nn.Conv2d(widths[i - 1], widths[i], 3, padding=1, bias=not batch_norm)))
        if batch_norm:
            layers.append((f"bn{i}", nn.BatchNorm2d(widths[i])))
        layers.append((f"relu{i}", make_activation(activation)))
        if i >= 2:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
    layers += [("pool", nn.MaxPool2d(input_size // 8)), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(widths[4], num_classes))]
    model = nn.Sequential(OrderedDict(layers))
    model.intertwiners_config = {"arch": "myrtle_cnn", "kwargs": dict(
        width=width, num_classes=num_classes, in_channels=in_channels,
        activation=_activation_config(activation), batch_norm=batch_norm, input_size=input_size)}
    return model


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels from ``in_planes`` to ``out_planes``.

    The new channels are split evenly before and after the existing ones (as in the CIFAR ResNet of
    He et al.), so channel c of the input lands at channel ``c + (out_planes - in_planes) // 2``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN, plus a shortcut, then the activation after the residual add."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str | nn.Module, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, §4.2): stem, three stages of basic blocks, global average pool."""

    def __init__(self, blocks_per_stage: int = 3, widths: tuple[int, int, int] = (16, 32, 64),
                 num_classes: int = 10, in_channels: int = 3, activation: str | nn.Module = "relu",
                 shortcut: str = "A"):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero padding) or 'B' (1x1 conv), got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = make_activation(activation)
        in_planes = widths[0]
        for s, planes in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, activation, shortcut))
                in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, activation: str | nn.Module = "relu", shortcut: str = "A",
             in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)) -> ResNet:
    """ResNet20 for CIFAR: 3 stages x 3 basic blocks, widths 16/32/64, 19 activation sites.

    ``shortcut="A"`` is the parameter-free strided subsample with zero channel padding; ``"B"`` a 1x1
    conv with batch norm. ``activation`` is a name (``"leaky_relu:0.3"``) or an ``nn.Module``.
    """
    _check_kwargs("resnet20", num_classes=num_classes, in_channels=in_channels, shortcut=shortcut, widths=widths)
    check_activation(activation)
    model = ResNet(3, tuple(widths), num_classes, in_channels, activation, shortcut)
    model.intertwiners_config = {"arch": "resnet20", "kwargs": dict(
        num_classes=num_classes, activation=_activation_config(activation), shortcut=shortcut,
        in_channels=in_channels, widths=list(widths))}
    return model


def mlp(in_features: int, hidden: tuple[int, ...] | list[int] = (512, 512), num_classes: int = 10,
        activation: str | nn.Module = "relu") -> nn.Sequential:
    """Flatten, then (Linear, activation) per hidden width, then a Linear head. Sites: act1, act2, ..."""
    _check_kwargs("mlp", in_features=in_features, hidden=hidden, num_classes=num_classes)
    check_activation(activation)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    prev = in_features
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(prev, h)), (f"act{i}", make_activation(activation))]
        prev = h
    layers.append(("head", nn.Linear(prev, num_classes)))
    model = nn.Sequential(OrderedDict(layers))
    model.intertwiners_config = {"arch": "mlp", "kwargs": dict(
        in_features=in_features, hidden=list(hidden), num_classes=num_classes,
        activation=_activation_config(activation))}
    return model


ARCHITECTURES = {"myrtle_cnn": myrtle_cnn, "resnet20": resnet20, "mlp": mlp}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + a JSON config, one validation layer. Every problem with a checkpoint (a
# missing, empty, truncated or foreign file, a config that does not describe a model, tensors that do not match
# it, a device that does not exist) is a ValueError naming the file and what is wrong. Nothing is ever unpickled.

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# The type of every constructor argument a config may hold: (check, what it must be).
_KWARG_TYPES = {
    "width": (_positive_int, "a positive integer"),
    "num_classes": (_positive_int, "a positive integer"),
    "in_channels": (_positive_int, "a positive integer"),
    "input_size": (_positive_int, "a positive integer"),
    "in_features": (_positive_int, "a positive integer"),
    "activation": (lambda v: isinstance(v, str) and bool(v.strip()), "an activation name (a string)"),
    "batch_norm": (lambda v: isinstance(v, bool), "true or false"),
    "shortcut": (lambda v: v in ("A", "B"), "'A' or 'B'"),
    "widths": (lambda v: isinstance(v, list) and len(v) == 3 and all(_positive_int(w) for w in v),
               "a list of three positive integers"),
    "hidden": (lambda v: isinstance(v, list) and all(_positive_int(w) for w in v),
               "a list of positive integers"),
}


def _check_kwargs(arch: str, **kwargs) -> None:
    """A constructor's arguments, checked with the same rules as a saved config (ValueError, never TypeError)."""
    for key, value in kwargs.items():
        check, what = _KWARG_TYPES[key]
        if isinstance(value, tuple) and key in ("widths", "hidden"):
            value = list(value)
        if not check(value):
            raise ValueError(f"{arch}: {key} must be {what}, got {value!r}")


def check_activation(activation, where: str = "activation") -> None:
    """The activation must build, and every number it carries (a LeakyReLU slope, ...) must be finite."""
    if not isinstance(activation, str | nn.Module):
        raise ValueError(f"{where} must be a name or an nn.Module, got {type(activation).__name__}")
    try:
        module = make_activation(activation)
    except (TypeError, OverflowError, ValueError) as err:
        raise ValueError(f"{where} {activation!r} is not a valid activation: {err}") from err
    for key, value in vars(module).items():
        if isinstance(value, float | int) and not isinstance(value, bool) and not math.isfinite(value):
            raise ValueError(f"{where} {activation!r}: its parameter {key} = {value} is not a finite number")


def check_config(config: Any, source: str = "config") -> dict[str, Any]:
    """Validate a model config ``{"arch": ..., "kwargs": {...}}`` as :func:`save` writes it; returns it.

    Raises ValueError naming ``source`` when the config is not a dict, names an unknown architecture, or
    its kwargs are not exactly the constructor's arguments with values of the right types.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: a model config must be a JSON object with 'arch' and 'kwargs', "
                         f"got {type(config).__name__ if config is not None else 'null'}")
    arch = config.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"{source}: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    kwargs = config.get("kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{source}: 'kwargs' must be a JSON object of constructor arguments, got "
                         f"{type(kwargs).__name__ if kwargs is not None else 'nothing'}")
    params = set(inspect.signature(ARCHITECTURES[arch]).parameters)
    extra, missing = sorted(set(kwargs) - params), sorted(params - set(kwargs))
    if extra:
        raise ValueError(f"{source}: {arch} has no argument(s) {extra}; its arguments are {sorted(params)}")
    if missing:
        raise ValueError(f"{source}: {arch} config lacks argument(s) {missing} (a config written by "
                         "intertwiners.models.save records every argument)")
    for key, value in kwargs.items():
        check, what = _KWARG_TYPES[key]
        if not check(value):
            raise ValueError(f"{source}: {arch} argument {key!r} must be {what}, got {value!r}")
    check_activation(kwargs["activation"], f"{source}: activation")
    return config


def build(config: dict[str, Any], source: str = "config") -> nn.Module:
    """Rebuild a model from its ``intertwiners_config`` dict ({"arch": ..., "kwargs": {...}})."""
    check_config(config, source)
    try:
        return ARCHITECTURES[config["arch"]](**config["kwargs"])
    except (TypeError, RuntimeError, AttributeError, KeyError, OverflowError, ValueError) as err:
        raise ValueError(f"{source}: cannot build a {config['arch']} from {config['kwargs']}: {err}") from err


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (``path`` is a folder). Returns the folder.

    Each file is written under a temporary name and renamed, so a crash never leaves a half-written checkpoint.
    Non-finite weights are refused (ValueError): such a checkpoint could never be loaded.
    """
    config = getattr(model, "intertwiners_config", None)
    if config is None:
        raise ValueError("save: model was not built by intertwiners.models (no intertwiners_config); "
                         "save its state_dict with safetensors yourself")
    check_config(config, "save: the model's intertwiners_config")
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"save: path must be a folder path, got {type(path).__name__}")
    folder = Path(path)
    if folder.suffix == ".safetensors":
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save: {folder} exists and is not a folder")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"save: tensor {name!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf values; "
                             f"refusing to write a checkpoint of a diverged model to {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
    _atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return folder


def _paths(path: str | Path) -> tuple[Path, Path]:
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"load: path must be a folder or a .safetensors file, got {type(path).__name__}")
    p = Path(path)
    if p.suffix == ".safetensors" or (p.is_file() and p.name != CONFIG_NAME):
        weights = p
    elif p.name == CONFIG_NAME:
        weights = p.parent / WEIGHTS_NAME
    else:
        weights = p / WEIGHTS_NAME
    config_file = weights.parent / CONFIG_NAME
    if not p.exists():
        raise ValueError(f"load: {p} does not exist")
    if not weights.is_file():
        raise ValueError(f"load: no weights file at {weights}")
    if not config_file.is_file():
        raise ValueError(f"load: no config.json beside {weights}")
    return weights, config_file


def read_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(weights file, config dict)`` for a folder or ``.safetensors`` file written by :func:`save`.

    The config is only parsed here (a JSON object); :func:`check_config` (called by :func:`load`) checks it.
    """
    weights, config_file = _paths(path)
    try:
        text = config_file.read_bytes().decode("utf-8")
        config = json.loads(text)
    except OSError as err:
        raise ValueError(f"load: cannot read {config_file}: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load: {config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"load: {config_file}: a model config must be a JSON object with 'arch' and 'kwargs', "
                         f"got {type(config).__name__ if config is not None else 'null'}")
    return weights, config


# dtype names of the safetensors header
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_header(weights: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` of a safetensors file, checked without reading the data.

    Raises ValueError for an empty, truncated or foreign file (a pickle or a ``torch.save`` zip archive
    is recognised and refused: nothing is ever unpickled).
    """
    weights = Path(weights)
    try:
        size = weights.stat().st_size
        with weights.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= size - 8 else b""
    except OSError as err:
        raise ValueError(f"load: cannot read {weights}: {err.strerror or err}") from err
    if size == 0:
        raise ValueError(f"load: {weights} is empty (0 bytes); the checkpoint was not written completely")
    if head[:2] == b"PK":
        raise ValueError(f"load: {weights} is a zip archive (a torch.save file?), not safetensors; it is not "
                         "unpickled. Re-save the model with intertwiners.models.save")
    if head[:1] == b"\x80":
        raise ValueError(f"load: {weights} is a pickle file, not safetensors; it is not unpickled. Re-save the "
                         "model with intertwiners.models.save")
    if n < 2 or n > size - 8 or len(raw) != n:
        raise ValueError(f"load: {weights} is not a safetensors file or is truncated ({size} bytes; the header "
                         f"claims {max(n, 0)} bytes of JSON)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"load: {weights} has a damaged safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise ValueError(f"load: {weights} has a damaged safetensors header (not a JSON object)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list)
              and all(_positive_int(d) or d == 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and 0 <= o <= data_size for o in info["data_offsets"]))
        if not ok:
            raise ValueError(f"load: {weights}: tensor {name!r} has a damaged or truncated header entry {info!r}")
        out[name] = (info["dtype"], tuple(info["shape"]))
    return out


def _check_tensors(weights: Path, found: dict[str, tuple[str, tuple[int, ...]]], model: nn.Module) -> None:
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))

    def names(keys):
        return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")

    if missing:
        raise ValueError(f"load: {weights} lacks {len(missing)} tensor(s) the config's model needs: {names(missing)}")
    if extra:
        raise ValueError(f"load: {weights} holds {len(extra)} tensor(s) the config's model does not have: "
                         f"{names(extra)}")
    for name, (dtype, shape) in found.items():
        want_dtype, want_shape = expected[name]
        if shape != want_shape:
            raise ValueError(f"load: {weights}: tensor {name!r} has shape {list(shape)} but the model of "
                             f"config.json needs {list(want_shape)}")
        if _ST_DTYPES[dtype].is_floating_point != want_dtype.is_floating_point:
            raise ValueError(f"load: {weights}: tensor {name!r} is {dtype}, the model needs {want_dtype}")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save` from its folder or its ``.safetensors`` file. Never unpickles.

    Every problem (missing/empty/truncated/foreign file, bad config, tensors that do not match the config,
    non-finite weights, a device that does not exist) raises ValueError naming the file.
    """
    device = resolve_device(map_location)
    weights, config = read_config(path)
    found = read_header(weights)
    with torch.device("meta"):            # shapes only: a config asking for a huge model allocates nothing
        skeleton = build(config, f"load: {weights.parent / CONFIG_NAME}")
    _check_tensors(weights, found, skeleton)
    model = build(config, f"load: {weights.parent / CONFIG_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"load: {weights} is damaged: {err}") from err
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"load: {weights}: tensor {name!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf "
                             "values (a diverged or damaged checkpoint)")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"load: {weights} does not match its config: {err}") from err
    return model.to(device)
