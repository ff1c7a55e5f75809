"""Model folders in and out for ``intertwiners align`` and ``intertwiners merge``: this package's folders and
local Hugging Face folders, read and written in the same format.

* This package's folder: ``config.json`` (``{"arch": ..., "kwargs": ...}``) + ``model.safetensors``, as
  :func:`intertwiners.models.save` writes it.
* A Hugging Face folder: ``config.json`` (with ``model_type``) + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``), as ``save_pretrained`` writes it. It is loaded offline with the class named
  first in ``config.architectures`` (the class the matching ``AutoModelFor...`` resolves to; ``AutoModel`` when
  the config names none), ``from_pretrained(folder, local_files_only=True, use_safetensors=True)``: pickled
  weights (``pytorch_model.bin``) are never loaded. Weights are computed on in float32 and written back in the
  floating dtype they were stored in; the written folder holds the same ``config.json`` byte for byte, the
  weights as safetensors (``save_pretrained``), and copies of the other small files of the source folder
  (tokenizer, generation config).

Every output is written under a temporary name beside its destination and renamed when complete
(:class:`StagedOutput`), so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PACKAGE, HUGGING_FACE = "intertwiners", "huggingface"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
_ST_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class ModelFolder:
    """A model read from a folder: ``kind`` (``"intertwiners"`` or ``"huggingface"``), ``model`` (eval mode,
    float32 for Hugging Face models), ``dtype`` (the floating dtype of the stored weights)."""

    path: Path
    kind: str
    model: nn.Module
    dtype: torch.dtype = torch.float32


def _read_json(file: Path) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read {file}: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object")
    return config


def folder_kind(path: str | Path) -> str:
    """``"intertwiners"`` or ``"huggingface"`` from the folder's ``config.json``; ValueError for anything that
    holds no model."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (give a model folder: config.json + model.safetensors)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} holds no model: no config.json (expected a folder written by `intertwiners "
                         "train` or a Hugging Face model folder)")
    config = _read_json(config_file)
    if "arch" in config and "kwargs" in config:
        return PACKAGE
    if "model_type" in config:
        return HUGGING_FACE
    raise ValueError(f"{config_file} describes no model: neither this package's config (arch, kwargs) nor a "
                     "Hugging Face config (model_type)")


def _stored_dtype(folder: Path) -> torch.dtype:
    """The floating dtype of the first floating tensor in the folder's safetensors files (float32 if none)."""
    from ..models import read_header

    for file in sorted(folder.glob("*.safetensors")):
        for dtype, _shape in read_header(file).values():
            if dtype in _ST_FLOATS:
                return _ST_FLOATS[dtype]
    return torch.float32


@contextmanager
def _quiet_transformers():
    """transformers' progress bars and info logs off for the duration (the CLI prints one summary)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


def _hf_class(config, folder: Path):
    """The model class of a Hugging Face config: the first of ``config.architectures``, else ``AutoModel``."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return transformers.AutoModel
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{folder}/config.json names the architecture {names[0]!r}, which this transformers "
                         f"({transformers.__version__}) does not have")
    return cls


def load_hf(folder: str | Path) -> ModelFolder:
    """A local Hugging Face model folder, offline, safetensors only (module docstring)."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        pickled = [p.name for p in folder.glob("*.bin")]
        raise ValueError(f"{folder} holds no safetensors weights (model.safetensors)"
                         + (f"; {pickled} are pickle files and are not loaded" if pickled else ""))
    try:
        import transformers
    except ImportError as err:
        raise ValueError(f"{folder} is a Hugging Face model folder; reading it needs the transformers "
                         "package") from err
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            cls = _hf_class(config, folder)
            model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=torch.float32)
        except ValueError:
            raise
        except (OSError, KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"{folder}: cannot load the Hugging Face model: {str(err).splitlines()[0]}") from err
    return ModelFolder(folder, HUGGING_FACE, model.eval(), _stored_dtype(folder))


def load_folder(path: str | Path, device: str | torch.device = "cpu") -> ModelFolder:
    """This package's model folder or a local Hugging Face model folder (ValueError when it holds neither)."""
    from .. import models

    kind = folder_kind(path)
    if kind == PACKAGE:
        return ModelFolder(Path(path), PACKAGE, models.load(path).to(device).eval())
    found = load_hf(path)
    found.model.to(device)
    return found


def load_folders(paths: list[str | Path], device: str | torch.device = "cpu") -> list[ModelFolder]:
    """Several model folders of one kind (ValueError naming the first that differs in kind)."""
    for p in paths:
        folder_kind(p)  # every folder checked before any model is loaded
    found = [load_folder(p, device) for p in paths]
    for f in found[1:]:
        if f.kind != found[0].kind:
            raise ValueError(f"{found[0].path} is a {found[0].kind} model folder but {f.path} is a {f.kind} one")
    return found


def token_ids(model: nn.Module, tokens: int = 8, batch: int = 2) -> torch.Tensor:
    """The example input that traces a language model: ``batch x tokens`` token ids ``0, 1, 2, ...`` modulo the
    vocabulary size (fixed, so runs are reproducible)."""
    if tokens < 1 or batch < 1:
        raise ValueError(f"the example input needs at least one token and one row, got {batch} x {tokens}")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 1:
        raise ValueError("the Hugging Face model's config has no vocab_size: only models that read token ids "
                         "(input_ids) can be aligned from the command line")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or getattr(
        getattr(model, "config", None), "n_positions", None)
    if limit is not None and tokens > int(limit):
        raise ValueError(f"--tokens {tokens} is longer than the model's {limit} positions")
    return (torch.arange(batch * tokens) % vocab).reshape(batch, tokens)


def _copy_small_files(source: Path, target: Path) -> None:
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != "config.json":
            shutil.copyfile(f, target / f.name)


def save_like(model: nn.Module, like: ModelFolder, folder: str | Path) -> Path:
    """Write ``model`` to ``folder`` in the format of ``like`` (this package's, or a Hugging Face folder with
    ``like``'s config.json, safetensors weights in ``like``'s dtype and its other small files). ``folder``
    must not exist yet (callers write into a :class:`StagedOutput`)."""
    from .. import models

    folder = Path(folder)
    if like.kind == PACKAGE:
        return models.save(model.cpu(), folder)
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ValueError(f"tensor {name!r} holds NaN/Inf values; refusing to write {folder}")
    out = model.cpu()
    if like.dtype != torch.float32:
        import copy

        out = copy.deepcopy(model).to(like.dtype)
    with _quiet_transformers():
        out.save_pretrained(folder, safe_serialization=True)
    _copy_small_files(like.path, folder)
    shutil.copyfile(like.path / "config.json", folder / "config.json")
    return folder


class StagedOutput:
    """An output folder written under a temporary name and moved into place only when complete.

    ``with StagedOutput(out) as stage: ...`` writes into ``stage`` (a hidden sibling of ``out``); on success each
    entry of ``stage`` replaces the entry of that name in ``out`` (created if missing); on any error the stage
    is removed and ``out`` is left as it was."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} exists and is not a folder")
        self.stage = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage.mkdir(parents=True)
        return self.stage

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        try:
            if not self.out.exists():
                self.stage.rename(self.out)
                return
            for entry in sorted(self.stage.iterdir()):
                target = self.out / entry.name
                if target.is_dir() and not target.is_symlink():
                    old = target.with_name(f".{entry.name}.old-{os.getpid()}")
                    target.rename(old)
                    entry.rename(target)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(entry, target)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)
