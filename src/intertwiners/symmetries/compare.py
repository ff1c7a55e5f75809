"""Comparing a model with a transformed copy: output errors in eval and train mode, dropout off, and the
rounding-noise floor those errors are judged against.

Errors propagate NaN: a model whose outputs (or transformed outputs) are not finite gives NaN (which fails
every tolerance), never 0.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._util import max_nan
from ..features import eval_mode
from .capture import call_model, input_tensors, tensors_of
from .module_state import copy_model


def nanmax(values) -> float:
    """max (0 for none) that propagates NaN (max(worst, nan) would silently keep worst)."""
    return max_nan(0.0, *values)


def output_errors(a, b) -> tuple[float, float]:
    ya, yb = tensors_of(a), tensors_of(b)
    if len(ya) != len(yb):
        return float("nan"), float("nan")
    abs_err, scale = 0.0, 0.0
    for u, v in zip(ya, yb):
        if not u.is_floating_point() or u.numel() == 0:
            if not torch.equal(u, v):
                return float("inf"), float("inf")
            continue
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            return float("nan"), float("nan")
        abs_err = max(abs_err, float((u - v).abs().max()))
        scale = max(scale, float(u.abs().max()))
    return abs_err, abs_err / max(scale, 1e-300)


@contextlib.contextmanager
def no_dropout():
    """Dropout draws random masks: compare the deterministic part (functional dropout and attention dropout
    switched off; dropout modules call F.dropout)."""
    orig_dropout, orig_sdpa = F.dropout, F.scaled_dot_product_attention

    def dropout(x, p=0.5, training=True, inplace=False):
        return orig_dropout(x, 0.0, False, inplace)

    def sdpa(*args, **kwargs):
        args = list(args)
        if len(args) > 4:
            args[4] = 0.0
        else:
            kwargs["dropout_p"] = 0.0
        return orig_sdpa(*args, **kwargs)

    F.dropout, F.scaled_dot_product_attention = dropout, sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = orig_dropout, orig_sdpa


def forward_once(model: nn.Module, args: tuple | dict, train: bool):
    """One forward pass in eval or train mode with dropout off, from a fixed random state: random choices
    that do not depend on channels (stochastic depth drops whole samples) are then the same for the model
    and its transformed copy. The caller's random state is restored."""
    cuda = sorted({a.device.index or 0 for a in input_tensors(args) if isinstance(a, torch.Tensor) and a.is_cuda})
    with torch.random.fork_rng(devices=cuda), _other_rngs_fixed(), eval_mode(model, train), no_dropout():
        torch.manual_seed(0)
        return call_model(model, args)


@contextlib.contextmanager
def _other_rngs_fixed():
    """numpy's and Python's global random states seeded, then restored: some models draw their train-mode
    choices there (transformers' wav2vec2 and HuBERT draw the time steps they mask with numpy)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(0)
    random.seed(0)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) for m in model.modules())


@torch.no_grad()
def compare(model: nn.Module, new: nn.Module, x, modes=("eval", "train")) -> dict[str, tuple]:
    """{mode: (max_abs, max_rel)} between ``model`` and ``new`` on ``x`` (tensor or tuple); neither is modified."""
    args = x if isinstance(x, tuple | dict) else (x,)
    out = {}
    for mode in modes:
        if mode == "eval":
            out[mode] = output_errors(forward_once(model, args, False), forward_once(new, args, False))
        elif mode == "train":
            stats = has_running_stats(model)
            a, b = (copy_model(model), copy_model(new)) if stats else (model, new)
            e1 = output_errors(forward_once(a, args, True), forward_once(b, args, True))
            e2 = output_errors(forward_once(a, args, False), forward_once(b, args, False)) if stats else e1
            out[mode] = (nanmax([e1[0], e2[0]]), nanmax([e1[1], e2[1]]))
        else:
            raise ValueError(f"unknown mode {mode!r}; use 'eval' and/or 'train'")
    return out


NOISE_EPS = 1e-14
"""Relative size of the parameter perturbation :func:`noise_floor` measures with in float64 (about 50 ulps; in
another precision the same number of its ulps)."""
FLOOR_FACTOR = 10.0
"""An output error up to this many times the noise floor is rounding, not a changed function."""


@torch.no_grad()
def noise_floor(model: nn.Module, x, modes=("eval", "train"), generator: torch.Generator | None = None,
                eps: float | None = None) -> dict[str, float]:
    """{mode: max relative output change} when every floating parameter is multiplied by (1 + eps·N(0, 1)):
    the size a rounding difference reaches after going through the model (a transformed copy rounds its
    sums differently). ``eps``: default :data:`NOISE_EPS` in float64, as many ulps of a parameter's own
    precision otherwise. About 1e-15 for most float64 models; far larger in ill-conditioned ones (train-mode
    batch norm over a batch of two and tiny feature maps: torchvision's Inception-v3 at 80 pixels, 1e-8).
    ``model`` is not modified."""
    gen = generator or torch.Generator().manual_seed(3)
    noisy = copy_model(model)
    for p in noisy.parameters():
        if p.is_floating_point():
            e = eps if eps is not None else NOISE_EPS * torch.finfo(p.dtype).eps / torch.finfo(torch.float64).eps
            p.mul_(1 + e * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype))
    return {m: e[1] for m, e in compare(model, noisy, x, modes).items()}
