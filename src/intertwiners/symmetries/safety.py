"""The last line of defence: pin every derived space whose random element changes the outputs.

``symmetry_spec(..., check=True)`` applies a random element of all spaces at once to a float64 copy of the
model and compares outputs on (a few samples of) the example input; if that fails, it halves the spaces down
to the single spaces that fail (a few checks per failing space, not one per space). A space pinned here is a
rule bug: the engine derived a symmetry that is not one. The tests require that no model they build needs it;
``verify_symmetry`` checks the spec without it.

An error above the tolerance is first compared with the model's own rounding noise on the same input
(:func:`~.compare.noise_floor`, measured only then): in an ill-conditioned model (train-mode batch norm over a
batch of two and 1x1 feature maps) a float64 copy whose sums merely round differently moves the outputs by more
than 1e-8, and such errors (up to :data:`~.compare.FLOOR_FACTOR` times the floor) are rounding, not a wrong
symmetry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..features import eval_mode
from .apply import apply_symmetry, random_symmetry
from .capture import call_model, input_tensors, map_inputs
from .compare import FLOOR_FACTOR, compare, has_running_stats, noise_floor
from .inputs import explain_failure
from .module_state import copy_model
from .spec import SymmetrySpec

SAFETY_REASON = "pinned by the safety check"
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
def safety_check(model: nn.Module, args, spec: SymmetrySpec, generator: torch.Generator | None = None,
                 rtol: float = 1e-8, unread: list[str] = ()) -> SymmetrySpec:
    """``spec`` with every space pinned whose random element changes the outputs on ``args`` (all spaces at
    once first; each space on its own only if that fails), in eval mode, and in train mode too when the model
    has running statistics or ``unread`` names parameters the captured graph does not read (a pin that only
    train mode needs says so). Runs on a float64 copy when the model is not too large (else, or when the copy
    cannot run because an operation has no float64, in its own dtype, tolerance 1e-3 in lower precision)."""
    numel = sum(p.numel() for p in model.parameters())
    floating = [p for p in model.parameters() if p.is_floating_point()]
    args = _first_samples(model, args, _CHECK_SAMPLES)
    if floating and floating[0].dtype != torch.float64 and numel <= _CHECK_DOUBLE_LIMIT:
        double = copy_model(model).double()
        double_args = map_inputs(args, lambda a: a.double() if a.is_floating_point() else a)
        try:
            return _checked(double, double_args, spec, generator, rtol, unread, strict=True)
        except _NotFiniteInDouble:   # the copy overflows where the model does not (TimesFM): its own dtype
            pass
        except Exception:  # noqa: BLE001 - an operation without float64 (grouped_mm on CPU): the model's own dtype
            if explain_failure(double, double_args) is None:
                raise
    own = rtol if floating and floating[0].dtype == torch.float64 else 1e-3
    return _checked(model, args, spec, generator, own, unread)


class _NotFiniteInDouble(Exception):
    """The float64 copy's own outputs are not finite on the example input."""


def _checked(work: nn.Module, args, spec: SymmetrySpec, generator, rtol: float, unread,
             strict: bool = False) -> SymmetrySpec:
    """:func:`safety_check` on ``work`` (the model or its float64 copy) with the tolerance ``rtol``. ``strict``
    (the float64 copy): raise :class:`_NotFiniteInDouble` when the copy's own outputs are not finite, which says
    nothing about the spec (a model whose float32 masks overflow in float64), instead of pinning every space."""
    gen = generator or torch.Generator().manual_seed(1234)
    modes = ("eval", "train") if unread or has_running_stats(work) else ("eval",)
    floor: dict[str, float] = {}

    def failure(names):
        el = random_symmetry(spec, gen, monomial=True)
        try:
            new = apply_symmetry(work, {k: el[k] for k in names}, spec)
        except Exception as err:  # noqa: BLE001 - any failure to apply pins the space
            return f"{type(err).__name__}: {err}"
        errs = compare(work, new, args, modes)
        bad = {m: e[1] for m, e in errs.items() if not e[1] <= rtol}
        if bad and not floor:   # over the tolerance: how large is this model's rounding noise here?
            floor.update(noise_floor(work, args, modes))
            if strict and not all(math.isfinite(f) for f in floor.values()):
                raise _NotFiniteInDouble
        bad = {m: e for m, e in bad.items() if not e <= FLOOR_FACTOR * floor[m]}   # NaN stays bad
        if not bad:
            return None
        why = ", ".join(f"{m} mode relative error {e:.2e}, rounding-noise floor {floor[m]:.1e}" for m, e in bad.items())
        if unread and list(bad) == ["train"]:
            why += (f"; the eval-mode capture does not read {', '.join(unread)}, which train mode may use, so no "
                    "rule placed it")
        return why

    pins = {}

    def search(names, why):
        """Pin the spaces among ``names`` (whose element together failed with ``why``) that fail alone."""
        if len(names) == 1:
            pins[names[0]] = f"a random element changed the outputs on the example input ({why}); {SAFETY_REASON}"
            return
        for half in (names[:len(names) // 2], names[len(names) // 2:]):
            got = failure(half)
            if got is not None:
                search(half, got)

    names = list(spec.spaces)
    why = failure(names) if names else None
    if why is None:
        return spec
    search(names, why)
    return spec.without(pins)
