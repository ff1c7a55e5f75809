"""Checking weight-space symmetries on a model: per-space output errors, so a failure names the space."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .._util import as_tensor
from ..features import eval_mode
from .apply import apply_symmetry, random_symmetry
from .spec import SymmetrySpec, symmetry_spec

ALL = "<all spaces>"
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


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
        return max((r.max_abs for r in self.rows), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((r.max_rel for r in self.rows), default=0.0)

    @property
    def worst(self) -> VerifyRow | None:
        return max(self.rows, key=lambda r: r.max_rel, default=None)

    def by_space(self) -> dict[str, dict[str, tuple[float, float]]]:
        """{space: {mode: (max_abs, max_rel)}}"""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for r in self.rows:
            out.setdefault(r.space, {})[r.mode] = (r.max_abs, r.max_rel)
        return out

    def failures(self, rtol: float) -> list[VerifyRow]:
        return [r for r in self.rows if r.max_rel > rtol]

    def __str__(self) -> str:
        lines = [f"{'space':<34}{'size':>6}  {'group':<28}{'mode':<7}{'max abs err':>13}{'max rel err':>13}"]
        for r in self.rows:
            lines.append(f"{r.space:<34}{r.size:>6}  {r.kind:<28}{r.mode:<7}{r.max_abs:>13.3e}{r.max_rel:>13.3e}")
        for name, reason in self.pinned.items():
            lines.append(f"{name:<34}  pinned: {reason}")
        lines.append(f"dtype {self.dtype}: max abs error {self.max_abs:.3e}, max relative error {self.max_rel:.3e}")
        return "\n".join(lines)


def _outputs(y) -> list[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _outputs(v)]
    if isinstance(y, list | tuple):
        return [t for v in y for t in _outputs(v)]
    return []


def _errors(a, b) -> tuple[float, float]:
    ya, yb = _outputs(a), _outputs(b)
    abs_err, scale = 0.0, 0.0
    for u, v in zip(ya, yb):
        abs_err = max(abs_err, float((u - v).abs().max()) if u.numel() else 0.0)
        scale = max(scale, float(u.abs().max()) if u.numel() else 0.0)
    return abs_err, abs_err / max(scale, 1e-300)


def _forward(model: nn.Module, x: torch.Tensor, train: bool):
    with eval_mode(model, train):
        if train:
            for m in model.modules():
                if isinstance(m, _DROPOUTS):
                    m.eval()  # dropout draws random masks: compare the deterministic part
        return model(x)


@torch.no_grad()
def compare(model: nn.Module, new: nn.Module, x: torch.Tensor, modes=("eval", "train")) -> dict[str, tuple]:
    """{mode: (max_abs, max_rel)} between ``model`` and ``new`` on ``x``; neither is modified."""
    out = {}
    for mode in modes:
        if mode == "eval":
            out[mode] = _errors(_forward(model, x, False), _forward(new, x, False))
        elif mode == "train":
            a, b = copy.deepcopy(model), copy.deepcopy(new)
            e1 = _errors(_forward(a, x, True), _forward(b, x, True))
            e2 = _errors(_forward(a, x, False), _forward(b, x, False))  # with the updated running statistics
            out[mode] = (max(e1[0], e2[0]), max(e1[1], e2[1]))
        else:
            raise ValueError(f"unknown mode {mode!r}; use 'eval' and/or 'train'")
    return out


def verify_symmetry(model: nn.Module, example_input, spec: SymmetrySpec | None = None,
                    generator: torch.Generator | None = None, trials: int = 2,
                    modes: tuple[str, ...] = ("eval", "train"), per_space: bool = True) -> VerifyReport:
    """Apply random group elements to ``model`` and measure how much its output changes.

    For each space (``per_space``) and for all spaces at once, ``trials`` random elements are applied
    (:func:`random_symmetry`, :func:`apply_symmetry`) and the transformed copy's output on
    ``example_input`` is compared with the original's, in eval mode and in train mode (batch norm with
    batch statistics; dropout off; then eval again with the running statistics both copies updated).
    Returns a :class:`VerifyReport` with the maximal absolute and relative errors per space and mode;
    the model is not modified. ``example_input`` must be a batch (train-mode batch norm needs N > 1).
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    p = next(iter(model.parameters()), None)
    x = as_tensor(example_input, name="example_input")
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    if spec is None:
        spec = symmetry_spec(model, x)
    report = VerifyReport(dtype=str(p.dtype if p is not None else x.dtype).replace("torch.", ""),
                          pinned=dict(spec.pinned))
    targets = ([(name, [name]) for name in spec.spaces] if per_space else []) + \
        ([(ALL, list(spec.spaces))] if spec.spaces else [])
    for label, names in targets:
        worst = {m: (0.0, 0.0) for m in modes}
        for _ in range(trials):
            elements = random_symmetry(spec, generator, monomial=True)
            new = apply_symmetry(model, {k: elements[k] for k in names}, spec)
            for mode, (a, r) in compare(model, new, x, modes).items():
                worst[mode] = (max(worst[mode][0], a), max(worst[mode][1], r))
        size = sum(spec.spaces[k].size for k in names)
        kind = spec.spaces[names[0]].kind if len(names) == 1 else "product of all"
        for mode in modes:
            report.rows.append(VerifyRow(label, size, kind, mode, *worst[mode]))
    return report
