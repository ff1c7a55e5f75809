"""A function-preserving normal form of the scaling part of a model's intertwiner group.

For every space whose group has scalings, each index j gets the scale that makes its *incoming* weights
(the parameter slices a scaling d_j multiplies by d_j**e, e > 0: a producer's rows, or a batch norm's
gamma and beta when a convolution feeds a batch norm) have unit norm; where the group has signs, the sign
that makes the largest-magnitude entry of the slices a sign flip reaches positive. Both rules commute with
permutations (a norm and a largest entry do not depend on the order of the other axes), so two models that
differ by a group element g have canonical forms that differ by the permutation part of g alone.

The slices of one space can depend on the scales of other spaces (a producer's columns belong to the
previous space), so spaces are visited in dependency order and the pass is repeated until the scales
settle (one pass when the dependencies have no cycle, e.g. whenever every incoming slice is a batch norm's
or the dependency chain is feed-forward; a no-batch-norm residual network has cycles, and the repeated
passes then converge to a fixed point instead of finishing in one).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import groups as G
from .._util import as_tensor
from ..symmetries.slots import Slot
from .spaces import SpaceSlots, along, space_slots


def slot_rows(t: torch.Tensor, slot: Slot) -> torch.Tensor:
    """(n, r * rest): row j holds every entry of index j's slice of ``t`` (a gather, not a view)."""
    n = slot.positions.shape[0]
    t, axis = along(t, slot)
    moved = torch.movedim(t, axis, 0)
    return moved[torch.as_tensor(slot.positions.reshape(-1), device=t.device)].reshape(n, -1)


def pieces(t: torch.Tensor, slot: Slot, chunk: int) -> list[tuple[int, int, int]] | None:
    """(axis, start, length) cutting ``t`` along its largest axis other than the slot's into pieces of about
    ``chunk`` entries, so that a large tensor's gathered rows are never copied whole; None when ``t`` is small
    (or flat, or the slot has no axis): read it whole."""
    if t.numel() <= chunk or slot.axis is None or t.ndim < 2:
        return None
    other = max((d for d in range(t.ndim) if d != slot.axis), key=lambda d: t.shape[d])
    step = max(1, chunk * t.shape[other] // t.numel())
    return [(other, i, min(step, t.shape[other] - i)) for i in range(0, t.shape[other], step)]


def squared_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> tuple[float, float]:
    """(||a - b||², ||a||²) in float64, over ``chunk`` entries at a time (no float64 copy of a whole tensor)."""
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    num = den = 0.0
    for i in range(0, fa.numel(), chunk):
        ca, cb = fa[i:i + chunk].double(), fb[i:i + chunk].double()
        den += float(ca.pow(2).sum())
        num += float((ca - cb).pow(2).sum())
    return num, den


def scale_slot(t: torch.Tensor, slot: Slot, factor: torch.Tensor) -> None:
    """Multiply index j's slice of ``t`` by ``factor[j]`` in place."""
    view, axis = along(t, slot)
    mult = torch.ones(view.shape[axis], dtype=torch.float64)
    r = slot.positions.shape[1]
    mult[torch.as_tensor(slot.positions.reshape(-1))] = factor.repeat_interleave(r)
    shape = [1] * view.ndim
    shape[axis] = -1
    view.mul_(mult.to(t.device, t.dtype).view(shape))


def self_coupled(action: SpaceSlots, slot: Slot) -> bool:
    """Does the space also act on another axis of the slot's tensor (a self-map W -> D W D^-1: a residual
    block's or a recurrent cell's weight)? Such a slice holds entries the space's own element leaves alone
    (the diagonal), so its norm and its largest entry are not equivariant in that coordinate alone."""
    return any(o.tensor == slot.tensor and o.axis != slot.axis for o in action.slots)


def _prefer_not_self_coupled(action: SpaceSlots, slots: list[Slot]) -> list[Slot]:
    """``slots`` without the self-coupled ones, unless that leaves none."""
    return [s for s in slots if not self_coupled(action, s)] or slots


def incoming_slots(action: SpaceSlots) -> list[Slot]:
    """The slots a positive scaling reaches with the smallest positive power (the 'incoming' weights), leaving
    out self-maps where the space has other incoming slots: a self-map's row j scales as d_j times the
    columns' 1/d_k, its diagonal not at all, so a unit norm over it need not exist (the passes then drift and
    the forms of A and g·A differ by more than a permutation; seen on residual MLPs with two blocks)."""
    slots = _prefer_not_self_coupled(action, [s for s in action.slots if s.exponent is not None and s.exponent > 0])
    if not slots:
        return []
    e = min(s.exponent for s in slots)
    return [s for s in slots if s.exponent == e]


def spaces_on(actions: dict[str, SpaceSlots]) -> dict[str, set[str]]:
    """parameter -> the spaces that move it (along any axis)."""
    on_key: dict[str, set[str]] = {}
    for name, act in actions.items():
        for s in act.slots:
            on_key.setdefault(s.tensor, set()).add(name)
    return on_key


def sign_slots(action: SpaceSlots, on_key: dict[str, set[str]] | None = None, name: str | None = None) -> list[Slot]:
    """The slices whose sign a sign flip reverses. With ``on_key``: only those of parameters that no other
    space moves (a token embedding for a residual stream), when there are such -- their largest entry does
    not depend on any other space's signs, so the choice cannot cycle (RMSNorm streams with gated MLPs)."""
    odd = _prefer_not_self_coupled(action, [s for s in action.slots if s.odd])  # a self-map's diagonal keeps
    if on_key is None:                                                           # its sign under any flip
        return odd
    anchored = [s for s in odd if on_key.get(s.tensor, set()) <= {name}]
    return anchored or odd


def dependency_order(actions: dict[str, SpaceSlots]) -> list[str]:
    """Spaces ordered so that a space comes after those that scale the other axes of its deciding slices
    (a topological order; spaces on a cycle keep their spec order)."""
    on_key = spaces_on(actions)
    deps = {name: {o for s in incoming_slots(act) + sign_slots(act, on_key, name) for o in on_key[s.tensor]
                   if o != name}
            for name, act in actions.items()}
    order: list[str] = []
    done: set[str] = set()
    pending = list(actions)
    while pending:
        ready = [n for n in pending if deps[n] <= done]
        pick = ready[0] if ready else pending[0]
        order.append(pick)
        done.add(pick)
        pending.remove(pick)
    return order


def canonical_scales(params: dict[str, torch.Tensor], actions: dict[str, SpaceSlots], max_passes: int = 200,
                     tol: float | None = None) -> dict[str, torch.Tensor]:
    """Scales {space: (n,) float64} of the canonical form; ``params`` (copies!) are rescaled in place to it.

    Spaces without scalings (permutation groups, GL spaces) get all ones. Passes stop when no scale moves
    by more than ``tol`` (default: 100 units of rounding of the parameters' dtype).
    """
    if tol is None:
        dtypes = [t.dtype for t in params.values() if t.is_floating_point()]
        tol = 100 * max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float64).eps)
    total = {name: torch.ones(act.size, dtype=torch.float64) for name, act in actions.items()}
    order = dependency_order(actions)
    on_key = spaces_on(actions)
    for _ in range(max_passes):
        worst = 0.0
        for name in order:
            act = actions[name]
            if not act.group.is_monomial:
                continue
            factor = torch.ones(act.size, dtype=torch.float64)
            inc = incoming_slots(act) if act.allows_positive_scaling else []
            if inc:
                sq = sum(slot_rows(params[s.tensor], s).double().pow(2).sum(1) for s in inc)
                e = inc[0].exponent
                norm = sq.sqrt()
                factor = torch.where(norm > 0, norm.clamp_min(1e-300) ** (-1.0 / e), factor)
            signs = sign_slots(act, on_key, name) if act.allows_signs else []
            if signs:
                rows = torch.cat([slot_rows(params[s.tensor], s).double() * s.factor(factor)[:, None]
                                  for s in signs], 1)
                pick = rows.gather(1, rows.abs().argmax(1, keepdim=True))[:, 0]
                factor = factor * torch.where(pick < 0, -1.0, 1.0).to(torch.float64)
            if torch.equal(factor, torch.ones_like(factor)):
                continue
            for s in act.slots:
                scale_slot(params[s.tensor], s, s.factor(factor))
            total[name] = total[name] * factor
            worst = max(worst, float((factor - 1).abs().max()))
        if not worst > tol:  # also stops on NaN, which then shows in the scales
            break
    for name, t in total.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"canonical scales of space {name!r} are not finite (zero or non-finite weights)")
    return total


def canonicalize(model: nn.Module, example_input, *, return_scales: bool = False):
    """A copy of ``model`` with the same function whose scalings are in canonical form (see
    :mod:`intertwiners.alignment.canonical`): every unit's incoming weights have unit norm and, where its
    group has signs, the largest entry they share with a sign flip is positive. Two models that differ by a
    group element canonicalise to models that differ by a permutation. GL spaces are left as they are.

    ``return_scales=True`` also returns {space: scale} (the element diag(scale) that was applied).
    """
    from ..symmetries import apply_symmetry, symmetry_spec

    if not isinstance(model, nn.Module):
        raise ValueError(f"canonicalize needs an nn.Module, got {type(model).__name__}")
    x = as_tensor(example_input, name="example_input")
    spec = symmetry_spec(model, x)
    actions = {n: space_slots(spec, n) for n, s in spec.spaces.items() if s.group.kind in G.KINDS}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    scales = canonical_scales(params, actions)
    elements = {n: (torch.arange(len(s)), s) for n, s in scales.items() if spec.spaces[n].group.is_monomial}
    out = apply_symmetry(model, elements, spec)
    return (out, scales) if return_scales else out
