"""Checking what a user passes to ``symmetry_spec``/``verify_symmetry``: a module, finite weights, an example
input (a tensor, a tuple of positional inputs or a dict of keyword inputs) on the model's device.

Nothing is refused on a guess about shapes: a model is only refused when it fails on its example input,
and then the error says why (with a hint when an integer tensor met a float model, or when the input looks
unbatched). The model is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .._util import as_tensor
from ..features import eval_mode
from .capture import call_model, input_tensors, map_inputs


def check_model(model, who: str) -> None:
    """ValueError unless ``model`` is an nn.Module with finite floating-point parameters and buffers without NaN.
    A buffer may hold infinities: an unset clamp bound (timm's Gemma 4 vision encoder clamps between buffers
    that start at -inf and +inf), a mask; the outputs are checked for NaN wherever they are compared."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"{who} needs a torch.nn.Module, got {type(model).__name__}")
    for name, t in model.named_parameters():
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"the model has non-finite values (NaN or Inf) in {name!r}")
    for name, t in model.named_buffers():
        if t.is_floating_point() and t.numel() and bool(torch.isnan(t.detach()).any()):
            raise ValueError(f"the model has NaN values in buffer {name!r}")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in floating-point ``t`` (any shape): its minimum and maximum are finite (NaN propagates
    through ``aminmax``). One read of ``t``, without the boolean copy of ``isfinite(t).all()``."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def prepare_inputs(model: nn.Module, example_input) -> tuple | dict:
    """The example input as positional inputs (a tuple) or keyword inputs (a dict, e.g. a tokenizer's output
    with ``input_ids`` and ``attention_mask``), on the model's device, floating inputs in its dtype."""
    if isinstance(example_input, torch.Tensor):
        args = (example_input,)
    elif isinstance(example_input, tuple | list):
        args = tuple(example_input)
    elif isinstance(example_input, Mapping):
        args = {str(k): v for k, v in example_input.items()}
    else:
        args = (as_tensor(example_input, name="example_input"),)
    if not args:
        raise ValueError("example_input is empty")
    p = next(iter(model.parameters()), None)

    def prepare(a):
        if not isinstance(a, torch.Tensor):
            raise ValueError("example_input must be a tensor, a tuple of tensors or a dict of tensors, got "
                             f"{type(a).__name__} inside")
        if a.is_floating_point() and not all_finite(a):
            raise ValueError("example_input has non-finite entries")
        if p is not None:
            a = a.to(device=p.device, dtype=p.dtype if a.is_floating_point() else a.dtype)
        return a

    return map_inputs(args, prepare)


def _hint(model: nn.Module, args, message: str = "") -> str:
    """What the user can do about the failure ``message`` of ``model`` on ``args`` ("" when nothing is known)."""
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    if p is not None and p.dtype == torch.float64 and "Double" in message:
        return ("; an operation inside the model does not support torch.float64: run the model in float32 (the "
                "checks' tolerances follow the dtype)")
    ints = [a for a in input_tensors(args) if not a.is_floating_point() and not a.is_complex()]
    embeds = any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in model.modules())
    if p is not None and ints and not embeds:
        return (f"; example_input holds an integer tensor ({ints[0].dtype}, shape {tuple(ints[0].shape)}) and the "
                f"model computes in {p.dtype}: pass a floating-point input (token ids only suit models that embed "
                "them)")
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None)
    first = input_tensors(args)[0] if input_tensors(args) else None
    if conv is not None and first is not None and first.ndim == conv.weight.ndim - 1:
        return (f"; is example_input (shape {tuple(first.shape)}) one unbatched sample? Pass a batch (add a "
                "leading batch axis)")
    return ""


@torch.no_grad()
def explain_failure(model: nn.Module, args) -> str | None:
    """Why ``model`` fails on ``args`` (eval mode, no autograd), or None when it runs."""
    try:
        with eval_mode(model):
            call_model(model, args)
    except Exception as err:  # noqa: BLE001 - any failure of the user's model is reported, not raised
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return f"the model fails on its example input ({type(err).__name__}: {first}){_hint(model, args, first)}"
    return None
