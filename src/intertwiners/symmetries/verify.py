"""Checking weight-space symmetries on a model: per-space output errors, so a failure names the space.

Errors propagate NaN: a model whose outputs (or transformed outputs) are not finite reports NaN (and fails
every tolerance), never 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._util import max_nan
from ..features import eval_mode
from .apply import apply_symmetry, random_symmetry
from .engine import call_model, input_tensors, map_inputs, tensors_of
from .spec import SymmetrySpec, _as_args, drop_space, symmetry_spec

ALL = "<all spaces>"


def _nanmax(values) -> float:
    """max (0 for none) that propagates NaN (max(worst, nan) would silently keep worst)."""
    return max_nan(0.0, *values)


@dataclass
class VerifyRow:
    space: str
    size: int
    kind: str
    mode: str          # "eval" or "train" (train: a train-mode forward, then eval with the new statistics)
    max_abs: float
    max_rel: float


@dataclass
class VerifyReport:
    """Per-space (and all spaces at once) maximal output errors of transformed copies of a model."""

    rows: list[VerifyRow] = field(default_factory=list)
    dtype: str = ""
    pinned: dict[str, str] = field(default_factory=dict)

    @property
    def max_abs(self) -> float:
        return _nanmax(r.max_abs for r in self.rows)

    @property
    def max_rel(self) -> float:
        return _nanmax(r.max_rel for r in self.rows)

    @property
    def worst(self) -> VerifyRow | None:
        nan = [r for r in self.rows if math.isnan(r.max_rel)]
        return nan[0] if nan else max(self.rows, key=lambda r: r.max_rel, default=None)

    def by_space(self) -> dict[str, dict[str, tuple[float, float]]]:
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for r in self.rows:
            out.setdefault(r.space, {})[r.mode] = (r.max_abs, r.max_rel)
        return out

    def failures(self, rtol: float) -> list[VerifyRow]:
        return [r for r in self.rows if not r.max_rel <= rtol]  # NaN fails

    def __str__(self) -> str:
        lines = [f"{'space':<34}{'size':>6}  {'group':<28}{'mode':<7}{'max abs err':>13}{'max rel err':>13}"]
        for r in self.rows:
            lines.append(f"{r.space:<34}{r.size:>6}  {r.kind:<28}{r.mode:<7}{r.max_abs:>13.3e}{r.max_rel:>13.3e}")
        for name, reason in self.pinned.items():
            lines.append(f"{name:<34}  pinned: {reason}")
        lines.append(f"dtype {self.dtype}: max abs error {self.max_abs:.3e}, max relative error {self.max_rel:.3e}")
        return "\n".join(lines)


def _errors(a, b) -> tuple[float, float]:
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
def _no_dropout():
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


def _forward(model: nn.Module, args: tuple | dict, train: bool):
    """One forward pass in eval or train mode with dropout off, from a fixed random state: random choices
    that do not depend on channels (stochastic depth drops whole samples) are then the same for the model
    and its transformed copy. The caller's random state is restored."""
    cuda = sorted({a.device.index or 0 for a in input_tensors(args) if isinstance(a, torch.Tensor) and a.is_cuda})
    with torch.random.fork_rng(devices=cuda), eval_mode(model, train), _no_dropout():
        torch.manual_seed(0)
        return call_model(model, args)


def _has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) for m in model.modules())


@torch.no_grad()
def compare(model: nn.Module, new: nn.Module, x, modes=("eval", "train")) -> dict[str, tuple]:
    """{mode: (max_abs, max_rel)} between ``model`` and ``new`` on ``x`` (tensor or tuple); neither is modified."""
    args = x if isinstance(x, tuple | dict) else (x,)
    out = {}
    for mode in modes:
        if mode == "eval":
            out[mode] = _errors(_forward(model, args, False), _forward(new, args, False))
        elif mode == "train":
            stats = _has_running_stats(model)
            a, b = (copy.deepcopy(model), copy.deepcopy(new)) if stats else (model, new)
            e1 = _errors(_forward(a, args, True), _forward(b, args, True))
            e2 = _errors(_forward(a, args, False), _forward(b, args, False)) if stats else e1
            out[mode] = (_nanmax([e1[0], e2[0]]), _nanmax([e1[1], e2[1]]))
        else:
            raise ValueError(f"unknown mode {mode!r}; use 'eval' and/or 'train'")
    return out


def _check_finite_model(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the model has non-finite values in {name!r}")


def verify_symmetry(model: nn.Module, example_input, spec: SymmetrySpec | None = None,
                    generator: torch.Generator | None = None, trials: int = 2,
                    modes: tuple[str, ...] = ("eval", "train"), per_space: bool = True) -> VerifyReport:
    """Apply random group elements to ``model`` and measure how much its output changes.

    For each space (``per_space``) and for all spaces at once, ``trials`` random elements are applied and the
    transformed copy's outputs on ``example_input`` (a batch, or a tuple of inputs) are compared with the
    original's, in eval mode and in train mode (batch statistics; dropout off; then eval again with the
    updated running statistics). ValueError for a model with NaN/Inf parameters; NaN outputs give NaN
    errors (which fail every tolerance).
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    _check_finite_model(model)
    args = _as_args(model, example_input)
    if spec is None:
        spec = symmetry_spec(model, args)
    p = next(iter(model.parameters()), None)
    report = VerifyReport(dtype=str(p.dtype if p is not None else input_tensors(args)[0].dtype).replace("torch.", ""),
                          pinned=dict(spec.pinned))
    targets = ([(name, [name]) for name in spec.spaces] if per_space else []) + \
        ([(ALL, list(spec.spaces))] if spec.spaces else [])
    for label, names in targets:
        worst = {m: [(0.0, 0.0)] for m in modes}
        for _ in range(trials):
            elements = random_symmetry(spec, generator, monomial=True)
            new = apply_symmetry(model, {k: elements[k] for k in names}, spec)
            for mode, err in compare(model, new, args, modes).items():
                worst[mode].append(err)
        size = sum(spec.spaces[k].size for k in names)
        kind = spec.spaces[names[0]].kind if len(names) == 1 else "product of all"
        for mode in modes:
            report.rows.append(VerifyRow(label, size, kind, mode, _nanmax(e[0] for e in worst[mode]),
                                         _nanmax(e[1] for e in worst[mode])))
    return report


_CHECK_DOUBLE_LIMIT = 30_000_000
_CHECK_SAMPLES = 8


@torch.no_grad()
def _first_samples(model: nn.Module, args, k: int):
    """The first ``k`` samples of a larger example batch (every input sliced along a common leading batch
    axis), when the model runs on them; otherwise the inputs unchanged. A random element that changes a
    model's function changes its outputs on almost every input, so a few samples suffice for the check."""
    tensors = input_tensors(args)
    sizes = {t.shape[0] if t.ndim else None for t in tensors}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= k:
        return args
    small = map_inputs(args, lambda t: t[:k])
    try:
        with eval_mode(model):
            call_model(model, small)
    except Exception:  # noqa: BLE001 - a model that needs the whole batch keeps it
        return args
    return small


@torch.no_grad()
def safety_check(model: nn.Module, args: tuple, spec: SymmetrySpec, generator: torch.Generator | None = None,
                 rtol: float = 1e-8) -> None:
    """Pin every space whose random element changes the outputs on ``args`` (all spaces at once first; each
    space on its own only if that fails). Runs on a float64 copy when the model is not too large."""
    numel = sum(p.numel() for p in model.parameters())
    floating = [p for p in model.parameters() if p.is_floating_point()]
    args = _first_samples(model, args, _CHECK_SAMPLES)
    if floating and floating[0].dtype != torch.float64 and numel <= _CHECK_DOUBLE_LIMIT:
        work = copy.deepcopy(model).double()
        args = map_inputs(args, lambda a: a.double() if a.is_floating_point() else a)
    else:
        work = model
        rtol = rtol if floating and floating[0].dtype == torch.float64 else 1e-3
    gen = generator or torch.Generator().manual_seed(1234)
    modes = ("eval", "train") if _has_running_stats(work) else ("eval",)

    def failure(names):
        el = random_symmetry(spec, gen, monomial=True)
        try:
            new = apply_symmetry(work, {k: el[k] for k in names}, spec)
        except Exception as err:  # noqa: BLE001 - any failure to apply pins the space
            return f"{type(err).__name__}: {err}"
        errs = compare(work, new, args, modes)
        bad = {m: e[1] for m, e in errs.items() if not e[1] <= rtol}
        if not bad:
            return None
        return ", ".join(f"{m} mode relative error {e:.2e}" for m, e in bad.items())

    if failure(list(spec.spaces)) is None:
        return
    for name in list(spec.spaces):
        why = failure([name])
        if why is not None:
            drop_space(spec, name, f"a random element changed the outputs on the example input ({why}); pinned "
                                   "by the safety check")
