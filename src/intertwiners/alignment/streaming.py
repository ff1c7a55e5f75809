"""Weight matching of two Hugging Face model folders within three models' worth of memory.

:func:`~.align.align` must leave both models untouched, so weight matching works on copies of them (the
canonical form rescales the parameters in place) and returns a moved copy of B. When both models were read
from safetensors files, the files hold the untouched weights, and :func:`align_folders` needs no copies:

1. B's outputs on the example input and its spec are computed, the spaces planned as in ``align``;
2. both models' own parameters are put in canonical form in place and matched (:func:`~.align.match_weights`),
   keeping assignment scores of at most an eighth of one model's parameter bytes between solves (the others
   are freed once their space is solved: GPT-2 small's twelve float64 (3072, 3072) MLP scores alone would
   take 1.9 models);
3. both are restored from their files, one tensor at a time; the elements found are applied to B in place
   (``apply_symmetry(..., inplace=True)``, one tensor at a time); attention heads are matched on it, B is
   restored and moved again with every element (so each tensor gets exactly the operations ``align`` applies);
4. B's new outputs are checked against the ones kept in step 1; if they differ, B is restored and ``align``
   does the whole alignment (with the spec's safety check), as it would have.

The elements, the moved weights and the residuals are bit for bit those of ``align(A, B,
method="weights")`` where no freed score is needed again (see ``weight_matching._Scores``; so on GPT-2 small).
``monomial=True`` returns (perm, scale) pairs, as ``align`` does, instead of dense (n, n) elements (another
1.9 models for GPT-2 small). :func:`save_streamed` then writes the moved B in the format of its folder tensor by
tensor (no serialised copy of the whole model). Folders this does not cover (sharded weights, weights whose
names or values differ from the loaded model's, models with batch statistics) take ``align``'s path:
:func:`can_stream` says which; so do models with GL spaces (their elements are solved on a moved copy of B,
:mod:`.linear_spaces`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..symmetries.compare import has_running_stats
from .align import (
    AlignResult,
    _as_element,
    align,
    check_runs,
    check_same_structure,
    few_threads,
    match_weights,
    moved_parameters,
    plan_spaces,
    reference_outputs,
    same_outputs,
    weight_actions,
    weight_residuals,
)
from .attention import align_attention
from .checkpoints import HUGGING_FACE, ModelFolder, _copy_small_files, _quiet_transformers

WEIGHTS = "model.safetensors"
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def stored_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return list(f.keys())


def read_slices(file: Path, key: str, chunk: int = 1 << 22):
    """(start, rows) pairs: one tensor of a safetensors file in slices of about ``chunk`` entries along its first
    axis (a 0-d tensor in one piece), so that no copy of a whole large tensor (a token embedding) is made. The
    file is mapped again for every slice: the pages of a mapping that were read stay in the resident set until
    it is closed (restoring GPT-2 small's token embedding through one mapping peaked 147 MiB higher, through
    one per slice 18 MiB)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        shape = f.get_slice(key).get_shape()
        if not shape:
            yield 0, f.get_tensor(key)
            return
    step = max(1, chunk * shape[0] // max(1, _numel(shape)))
    for i in range(0, shape[0], step):
        with safe_open(str(file), "pt") as f:
            rows = f.get_slice(key)[i:i + step]
        yield i, rows


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def stored_tensors(folder: ModelFolder) -> dict[str, torch.Tensor] | None:
    """{key in the folder's weights file: the model's tensor it was loaded into}, or None when the folder is
    not streamable: not a single ``model.safetensors``, a key that names no tensor of the model, a tensor
    some key does not reach (tied names share one), or a value that differs from the file's."""
    file = folder.path / WEIGHTS
    if folder.kind != HUGGING_FACE or not file.is_file():
        return None
    out = tensors_of(folder.model, stored_keys(file))
    if out is None:
        return None
    with torch.no_grad():
        for k, t in out.items():
            covered = 0
            for i, rows in read_slices(file, k):
                if rows.ndim != t.ndim:
                    return None
                mine = t if t.ndim == 0 else t[i:i + rows.shape[0]]
                if mine.shape != rows.shape or not torch.equal(mine, rows.to(device=t.device, dtype=t.dtype)):
                    return None
                covered = i + (rows.shape[0] if rows.ndim else 1)
            if covered != (t.shape[0] if t.ndim else 1):
                return None
    return out


def tensors_of(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """{key: the model's parameter or buffer of that name} (tied names share one tensor), or None when a key
    names no tensor of the model or some parameter is reached by no key."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    if any(k not in named for k in keys):
        return None
    reached = {id(named[k]) for k in keys}
    if any(id(p) not in reached for p in model.parameters()):
        return None
    return {k: named[k] for k in keys}


def restore(folder: ModelFolder, tensors: dict[str, torch.Tensor]) -> None:
    """The model's tensors set back to the file's values, one slice of a tensor at a time."""
    file = folder.path / WEIGHTS
    with torch.no_grad():
        for k, t in tensors.items():
            for i, rows in read_slices(file, k):
                (t if t.ndim == 0 else t[i:i + rows.shape[0]]).copy_(rows)


def can_stream(fa: ModelFolder, fb: ModelFolder) -> bool:
    """Can :func:`align_folders` align these folders (see the module docstring)?"""
    return (not has_running_stats(fb.model)
            and stored_tensors(fa) is not None and stored_tensors(fb) is not None)


SCORE_SHARE = 8  # the scores kept between solves take at most 1/SCORE_SHARE of one model's parameter bytes


def align_folders(fa: ModelFolder, fb: ModelFolder, example_input, *, max_sweeps: int = 30,
                  threads: int = 1, monomial: bool = False) -> AlignResult:
    """``align(fa.model, fb.model, example_input=example_input, method="weights", monomial=monomial)``; where
    the folders pass :func:`can_stream`, B is moved IN PLACE (``result.model is fb.model``) without a copy of
    either model (module docstring), else ``align`` runs as it is. ``fa.model`` ends as it was loaded."""
    from ..symmetries import apply_symmetry, symmetry_spec

    start = time.perf_counter()
    model_a, model_b = fa.model, fb.model
    check_runs(model_a, example_input, "example_input")
    check_same_structure(model_a, model_b)
    ta, tb = stored_tensors(fa), stored_tensors(fb)
    if ta is None or tb is None or has_running_stats(model_b):
        return align(model_a, model_b, example_input=example_input, method="weights", max_sweeps=max_sweeps,
                     threads=threads, monomial=monomial)
    with torch.no_grad():
        reference = reference_outputs(model_b, example_input)
    spec = symmetry_spec(model_b, example_input, check=False)
    names, attention, skipped = plan_spaces(spec)
    if any(spec.spaces[n].group.kind == "general_linear" for n in names):  # GL elements are solved on a moved copy
        return align(model_a, model_b, example_input=example_input, method="weights", max_sweeps=max_sweeps,
                     threads=threads)
    found, found_by, sweeps = {}, {}, 0
    if names:
        actions = weight_actions(spec, names, attention)
        try:
            with few_threads(threads), torch.no_grad():
                keep = sum(p.numel() * p.element_size() for p in model_b.parameters()) // SCORE_SHARE
                found, sweeps = match_weights(moved_parameters(model_a, actions), moved_parameters(model_b, actions),
                                              actions, True, max_sweeps, keep_bytes=keep)
        finally:
            restore(fa, ta)
            restore(fb, tb)
        found_by = dict.fromkeys(found, "weights")
    if attention:
        if found:
            apply_symmetry(model_b, found, spec, inplace=True)
        heads, how = align_attention(model_a, model_b, spec, attention, True)
        found.update(heads)
        found_by.update(how)
        restore(fb, tb)
    if found:
        apply_symmetry(model_b, found, spec, inplace=True)
    with torch.no_grad():
        same = same_outputs(reference, model_b, example_input)
    if not same:
        restore(fb, tb)  # align redoes it with the spec's safety check, on copies
        return align(model_a, model_b, example_input=example_input, method="weights", max_sweeps=max_sweeps,
                     threads=threads, monomial=monomial)
    elements = {n: _as_element(el, not monomial) for n, el in found.items()}
    residual = weight_residuals(model_a, model_b, spec, list(found))
    return AlignResult(elements, model_b, "weights", "full", spec, time.perf_counter() - start, sweeps, skipped,
                       found_by, residual)


def write_safetensors(file: Path, keys: list[str], tensor, dtype=None, chunk: int = 1 << 22) -> None:
    """A safetensors file of ``tensor(key)`` for ``keys`` (in that order), written ``chunk`` entries at a time;
    floating tensors are cast to ``dtype`` when given. Header metadata: ``{"format": "pt"}``."""
    header, offset, shapes = {}, 0, {}
    for k in keys:  # shapes and dtypes first (the header comes before the data)
        t = tensor(k)
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in _CODES:
            raise ValueError(f"tensor {k!r} has dtype {out_dtype}, which this writer does not store")
        size = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[k] = {"dtype": _CODES[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        shapes[k] = out_dtype
        offset += size
    header = {"__metadata__": {"format": "pt"}, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in keys:
            flat = tensor(k).detach().reshape(-1)
            for i in range(0, flat.numel(), chunk):  # slices: no converted or serialised copy of a whole tensor
                part = flat[i:i + chunk].to(device="cpu", dtype=shapes[k])
                if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                    raise ValueError(f"tensor {k!r} holds NaN/Inf values; refusing to write {file.parent}")
                f.write(part.view(torch.uint8).numpy())


def save_streamed(model: nn.Module, like: ModelFolder, folder: str | Path) -> Path:
    """Write ``model`` to ``folder`` as :func:`~.checkpoints.save_like` does for a Hugging Face folder (same
    config.json, the source's other small files, weights in the stored dtype), the weights one tensor at a
    time under the names of ``like``'s single weights file; ``save_like`` itself where ``like`` has no such
    file or a name there is no tensor of ``model``. ``folder`` must not exist yet (callers write into a
    StagedOutput)."""
    from .checkpoints import save_like

    folder = Path(folder)
    file = like.path / WEIGHTS
    keys = stored_keys(file) if like.kind == HUGGING_FACE and file.is_file() else None
    named = None if keys is None else tensors_of(model, keys)
    if named is None:
        return save_like(model, like, folder)
    folder.mkdir()
    write_safetensors(folder / WEIGHTS, keys, named.__getitem__, like.dtype)
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if gen is not None and can_generate():
        with _quiet_transformers():
            gen.save_pretrained(folder)
    _copy_small_files(like.path, folder)
    shutil.copyfile(like.path / "config.json", folder / "config.json")
    return folder


__all__ = ["align_folders", "can_stream", "save_streamed", "stored_tensors", "write_safetensors"]
