"""The paper's architectures: the Myrtle CNN, the CIFAR ResNet20, and an MLP; safetensors save/load.

Every constructor records its arguments in ``model.intertwiners_config`` so that :func:`save` can
write a JSON config beside the weights and :func:`load` can rebuild the model without unpickling.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

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
    model = ResNet(3, tuple(widths), num_classes, in_channels, activation, shortcut)
    model.intertwiners_config = {"arch": "resnet20", "kwargs": dict(
        num_classes=num_classes, activation=_activation_config(activation), shortcut=shortcut,
        in_channels=in_channels, widths=list(widths))}
    return model


def mlp(in_features: int, hidden: tuple[int, ...] | list[int] = (512, 512), num_classes: int = 10,
        activation: str | nn.Module = "relu") -> nn.Sequential:
    """Flatten, then (Linear, activation) per hidden width, then a Linear head. Sites: act1, act2, ..."""
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


def build(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``intertwiners_config`` dict ({"arch": ..., "kwargs": {...}})."""
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} in config; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config.get("kwargs", {}))


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (``path`` is a folder). Returns the folder."""
    config = getattr(model, "intertwiners_config", None)
    if config is None:
        raise ValueError("save: model was not built by intertwiners.models (no intertwiners_config); "
                         "save its state_dict with safetensors yourself")
    folder = Path(path)
    if folder.suffix == ".safetensors":
        folder = folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(weights file, config dict)`` for a folder or ``.safetensors`` file written by :func:`save`."""
    p = Path(path)
    weights = p if p.suffix == ".safetensors" else p / "model.safetensors"
    config_file = weights.parent / "config.json"
    if not weights.is_file():
        raise ValueError(f"load: no weights file at {weights}")
    if not config_file.is_file():
        raise ValueError(f"load: no config.json beside {weights}")
    try:
        return weights, json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load: {config_file} is not valid JSON: {err}") from err


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save` from its folder or its ``.safetensors`` file. Never unpickles."""
    weights, config = read_config(path)
    model = build(config)
    model.load_state_dict(load_file(str(weights), device=str(map_location)))
    return model.to(map_location)
