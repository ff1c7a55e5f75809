"""Verification that can fail: apply random elements of every derived space and measure the output change.

:func:`verify_symmetry` checks the spec *as derived* (``symmetry_spec(..., check=False)``): every space on its
own and all at once, ``trials`` random elements each, in eval and train mode. A derived space whose element
changes the output beyond the tolerance is a failure (``report.ok`` False; ``intertwiners verify`` exits 1),
never a pin; spaces the engine pinned on purpose are listed with their reasons and are not failures.

Tolerance (relative, max|f'(x) - f(x)| / max|f(x)|): 1e-9 for a float64 model; 1e-6 when its graph casts
to float32 inside (``spec.lower_precision_inside``, e.g. transformers' RMSNorm: float32 rounding of a
permuted sum is ~1e-7); 1e-4 for a float32 model; 1e-2 when float16/bfloat16 is involved. Errors propagate
NaN: a NaN error fails every tolerance. An error over the tolerance is then compared with the model's own
rounding noise on the same input (:func:`~.compare.noise_floor`, in the model's precision): in an
ill-conditioned model (train-mode batch norm over a batch of two and 1x1 feature maps, outputs near 0) a copy
whose sums merely round differently moves the outputs by more than the tolerance, and errors up to
:data:`~.compare.FLOOR_FACTOR` times that floor are rounding, not a failure (``report.floor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .apply import apply_symmetry, random_symmetry
from .compare import FLOOR_FACTOR, compare, nanmax, noise_floor
from .derive import symmetry_spec
from .inputs import check_model, explain_failure, prepare_inputs
from .spec import SymmetrySpec

ALL = "<all spaces>"
__all__ = ["ALL", "VerifyReport", "VerifyRow", "compare", "tolerance", "verify_symmetry"]


def tolerance(spec: SymmetrySpec, dtype: torch.dtype) -> float:
    """The relative output error a true symmetry stays under, for a model computing in ``dtype`` with
    ``spec``'s casts inside (see the module docstring)."""
    lowest = spec.lowest_cast
    if dtype in (torch.float16, torch.bfloat16) or lowest in (torch.float16, torch.bfloat16):
        return 1e-2
    if dtype == torch.float32:
        return 1e-4
    return 1e-6 if lowest == torch.float32 else 1e-9


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
    """Per-space (and all spaces at once) maximal output errors of transformed copies of a model; ``rtol``
    the tolerance, ``ok`` whether every row is within it (NaN fails), ``pinned`` the spaces the engine pinned
    on purpose, with their reasons (not failures)."""

    rows: list[VerifyRow] = field(default_factory=list)
    dtype: str = ""
    pinned: dict[str, str] = field(default_factory=dict)
    rtol: float = 1e-9
    floor: dict[str, float] = field(default_factory=dict)
    """The model's own rounding noise per mode (:func:`~.compare.noise_floor`), measured only when a row
    exceeds ``rtol``: an error up to :data:`~.compare.FLOOR_FACTOR` times it is rounding, not a failure."""

    @property
    def ok(self) -> bool:
        """Every derived space keeps the output within ``rtol`` (NaN fails)."""
        return not self.failures()

    @property
    def max_abs(self) -> float:
        return nanmax(r.max_abs for r in self.rows)

    @property
    def max_rel(self) -> float:
        return nanmax(r.max_rel for r in self.rows)

    @property
    def worst(self) -> VerifyRow | None:
        nan = [r for r in self.rows if math.isnan(r.max_rel)]
        return nan[0] if nan else max(self.rows, key=lambda r: r.max_rel, default=None)

    def by_space(self) -> dict[str, dict[str, tuple[float, float]]]:
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for r in self.rows:
            out.setdefault(r.space, {})[r.mode] = (r.max_abs, r.max_rel)
        return out

    def failures(self, rtol: float | None = None) -> list[VerifyRow]:
        """Rows above ``rtol`` (default: the report's) and above the rounding-noise floor; NaN fails."""
        rtol = self.rtol if rtol is None else rtol
        return [r for r in self.rows if not r.max_rel <= max(rtol, FLOOR_FACTOR * self.floor.get(r.mode, 0.0))]

    def __str__(self) -> str:
        lines = [f"{'space':<34}{'size':>6}  {'group':<28}{'mode':<7}{'max abs err':>13}{'max rel err':>13}"]
        for r in self.rows:
            lines.append(f"{r.space:<34}{r.size:>6}  {r.kind:<28}{r.mode:<7}{r.max_abs:>13.3e}{r.max_rel:>13.3e}")
        for name, reason in self.pinned.items():
            lines.append(f"{name:<34}  pinned: {reason}")
        floor = "".join(f", {m} rounding-noise floor {v:.1e}" for m, v in self.floor.items())
        lines.append(f"dtype {self.dtype}: max abs error {self.max_abs:.3e}, max relative error {self.max_rel:.3e} "
                     f"(tolerance {self.rtol:g}{floor}: {'ok' if self.ok else 'FAILED'})")
        return "\n".join(lines)


def verify_symmetry(model: nn.Module, example_input, spec: SymmetrySpec | None = None,
                    generator: torch.Generator | None = None, trials: int = 2,
                    modes: tuple[str, ...] = ("eval", "train"), per_space: bool = True,
                    rtol: float | None = None) -> VerifyReport:
    """Apply random group elements to ``model`` and measure how much its output changes.

    ``spec``: the spec to check (default: ``symmetry_spec(model, example_input, check=False)``, the spec as
    derived). For each space (``per_space``) and for all spaces at once, ``trials`` random elements are
    applied and the transformed copy's outputs on ``example_input`` (a batch, a tuple or a dict of inputs)
    are compared with the original's, in eval mode and in train mode (batch statistics; dropout off; then
    eval again with the updated running statistics). ``rtol``: the tolerance (default :func:`tolerance`);
    ``report.ok`` is False when a row exceeds it. ValueError for a non-module, NaN/Inf parameters, or a
    model that fails on its example input; NaN outputs give NaN errors (which fail every tolerance).
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    check_model(model, "verify_symmetry")
    args = prepare_inputs(model, example_input)
    if spec is not None and not isinstance(spec, SymmetrySpec):
        raise ValueError(f"spec must be a SymmetrySpec (from symmetry_spec), got {type(spec).__name__}")
    why = explain_failure(model, args)
    if why is not None:
        raise ValueError(f"verify_symmetry: {why}")
    if spec is None:
        spec = symmetry_spec(model, args, check=False)
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float64
    report = VerifyReport(dtype=str(dtype).replace("torch.", ""), pinned=dict(spec.pinned),
                          rtol=tolerance(spec, dtype) if rtol is None else float(rtol))
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
            report.rows.append(VerifyRow(label, size, kind, mode, nanmax(e[0] for e in worst[mode]),
                                         nanmax(e[1] for e in worst[mode])))
    if report.failures():   # over the tolerance: how large is this model's own rounding noise here?
        report.floor = noise_floor(model, args, modes)
    return report
