"""The scales that bring B closest to A in weight space, once the permutations are chosen.

Weight matching (:mod:`.weight_matching`) picks permutations on the canonical forms (:mod:`.canonical`),
where every unit's incoming weights have unit norm. Moving B's units to the incoming norms of A's matched
units keeps B's function, but it is not the element of the group that puts B's *weights* nearest A's: a
unit of A whose incoming weights are tiny hands its partner tiny incoming and huge outgoing weights (a
trained digits MLP ended 52 times farther from A than before any alignment, and a merge of three such
MLPs fell to 13.9 % accuracy). Averaging, interpolating and merging read the weights themselves, so the
scales should be the ones that minimise ``||A - g·B||²`` over the parameters the spaces move.

For one space, with every other space's element fixed, the distance separates over its coordinates: the
slices a coordinate's scale d reaches with power e contribute ``sum_e (bb_e d^(2e) - 2 ab_e d^e)`` plus a
constant, where ``bb_e`` is the squared norm of B's slices and ``ab_e`` their inner product with A's (both
sums over the slots of power e). Each coordinate's best d is found in log space (a grid, then safeguarded Newton
steps), kept only where it lowers that coordinate's distance, and the spaces are visited in turn until no
scale moves (coordinate descent: the distance never increases). A coordinate's scale moves by at most a
factor of ``MAX_CHANGE`` either way: where the distance keeps falling as a scale goes to 0 or infinity (a
unit whose outgoing weights are all zero, say, whose incoming ones point away from A's) no scale is best
and the element would leave what float arithmetic and the group's membership test hold. A space that also
acts on another axis of the same tensor (a residual self-map ``W -> D W D^-1``) couples its own coordinates;
its update is kept only where the distance over its tensors went down.
"""

from __future__ import annotations

import math

import torch

from ..symmetries.slots import Gain
from .canonical import pieces, scale_slot, self_coupled, slot_rows, squared_distance
from .spaces import SpaceSlots

GRID = torch.linspace(-12.0, 12.0, 241, dtype=torch.float64)  # log-scales tried first (e^±12 ≈ 1.6e5)
NEWTON_STEPS = 30
MAX_CHANGE = 1e3  # a coordinate's scale moves by a factor in [1/MAX_CHANGE, MAX_CHANGE] from where it started
CHUNK = 1 << 22  # entries: larger tensors are read in slices of about this many


def scalable(act: SpaceSlots) -> bool:
    """Does the space have scalings that reach some parameter slice, none of them a normalisation's gain?

    Where a norm's gain carries a unit's scale (a convolution, then batch norm), the norm re-reads the scale
    of what it normalises from the data, and the canonical choice (B's gains given the norms of A's matched
    units' gains and shifts) keeps every unit's output scale equal in both models. Weight distance is no
    guide there: on two trained ResNet20s the closest scales put B nearer A (distance² 2,633 -> 2,096) and
    raised the accuracy barrier of their interpolation from 69.9 to 75.2 points (84.6 from the weights as they
    are), above the 74.3 of no alignment at all. Such spaces keep the canonical scales."""
    return (act.group.is_monomial and act.allows_positive_scaling and any(s.exponent for s in act.slots)
            and not any(isinstance(s.reach, Gain) for s in act.slots))


def slice_sums(ta: torch.Tensor, tb: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
    """((n,) sum of squares of B's slice j, (n,) inner product of A's and B's slice j), float64; a tensor of
    more than ``CHUNK`` entries is read in slices along its largest other axis (no copy of it whole)."""
    cuts = pieces(tb, slot, CHUNK)
    if cuts is None:
        ra, rb = slot_rows(ta, slot).double(), slot_rows(tb, slot).double()
        return rb.pow(2).sum(1), (ra * rb).sum(1)
    bb = ab = 0.0
    for axis, i, k in cuts:
        b, a = slice_sums(ta.narrow(axis, i, k), tb.narrow(axis, i, k), slot)
        bb, ab = bb + b, ab + a
    return bb, ab


def coordinate_cost(log_d: torch.Tensor, sums: dict[float, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum_e bb_e d^(2e) - 2 ab_e d^e`` at ``d = exp(log_d)``; ``log_d`` (n,) or (n, k), sums of (n,)."""
    total = torch.zeros_like(log_d)
    for e, (bb, ab) in sums.items():
        if log_d.ndim == 2:
            bb, ab = bb[:, None], ab[:, None]
        p = torch.exp(e * log_d)
        total = total + bb * p * p - 2 * ab * p
    return total


def _slopes(log_d: torch.Tensor, sums: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives of :func:`coordinate_cost` in ``log d`` ((n,) each)."""
    first = torch.zeros_like(log_d)
    second = torch.zeros_like(log_d)
    for e, (bb, ab) in sums.items():
        p = torch.exp(e * log_d)
        first = first + 2 * e * (bb * p * p - ab * p)
        second = second + 2 * e * e * (2 * bb * p * p - ab * p)
    return first, second


def best_factors(sums: dict[float, tuple[torch.Tensor, torch.Tensor]], log_low: torch.Tensor | None = None,
                 log_high: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) positive factors minimising each coordinate's :func:`coordinate_cost` with ``log d`` in
    [``log_low``, ``log_high``] ((n,) each; default the whole grid, e^±12); 1 where none lowers the cost by
    more than rounding (so a B that already equals A stays exactly as it is)."""
    n = next(iter(sums.values()))[0].shape[0]
    low = torch.full((n,), float(GRID[0]), dtype=torch.float64) if log_low is None else log_low.clamp_min(GRID[0])
    high = torch.full((n,), float(GRID[-1]), dtype=torch.float64) if log_high is None else log_high.clamp_max(GRID[-1])
    grid = GRID.expand(n, -1)
    cost = coordinate_cost(grid, sums).masked_fill((grid < low[:, None]) | (grid > high[:, None]), math.inf)
    k = cost.argmin(1)
    step = float(GRID[1] - GRID[0])
    lo, hi = torch.maximum(GRID[k] - step, low), torch.minimum(GRID[k] + step, high)
    t = GRID[k].clamp(lo, hi)
    for _ in range(NEWTON_STEPS):   # safeguarded Newton on the slope inside the bracket of the grid's best
        slope, curve = _slopes(t, sums)
        hi, lo = torch.where(slope > 0, t, hi), torch.where(slope > 0, lo, t)
        newton = t - slope / curve
        inside = (curve > 0) & (newton >= lo) & (newton <= hi)
        new = torch.where(inside, newton, (lo + hi) / 2)
        done = bool(((new - t).abs() <= 1e-13).all())
        t = new
        if done:
            break
    zero = torch.zeros(n, dtype=torch.float64)
    before, after = coordinate_cost(zero, sums), coordinate_cost(t, sums)
    size = sum(bb for bb, _ in sums.values()) + sum(ab.abs() for _, ab in sums.values())
    better = after < before - 1e-12 * size
    return torch.where(better, torch.exp(t), torch.ones(n, dtype=torch.float64))


def _distance(params_a: dict, params_b: dict, keys) -> float:
    return sum(squared_distance(params_a[k], params_b[k])[0] for k in keys)


def fit_closest_scales(params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor],
                       actions: dict[str, SpaceSlots], max_sweeps: int = 50, tol: float = 1e-7
                       ) -> dict[str, torch.Tensor]:
    """{space: (n,) float64 factors c} such that diag(c) applied to B (in A's basis already: the
    permutations done) minimises ``||A - B||²`` by coordinate descent over the spaces that allow positive
    scalings (the others get ones). ``params_b`` is rescaled to the result IN PLACE (pass copies, or tensors
    restored afterwards). Sweeps stop when no factor moves by more than ``tol`` (relative)."""
    total = {name: torch.ones(act.size, dtype=torch.float64) for name, act in actions.items()}
    names = [n for n, a in actions.items() if scalable(a)]
    for _ in range(max_sweeps):
        worst = 0.0
        for name in names:
            act = actions[name]
            sums: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
            for s in act.slots:
                if not s.exponent:
                    continue
                bb, ab = slice_sums(params_a[s.tensor], params_b[s.tensor], s)
                old = sums.get(s.exponent, (0.0, 0.0))
                sums[s.exponent] = (old[0] + bb, old[1] + ab)
            room = math.log(MAX_CHANGE)
            c = best_factors(sums, -room - total[name].log(), room - total[name].log())
            if torch.equal(c, torch.ones_like(c)):
                continue
            coupled = any(self_coupled(act, s) for s in act.slots)
            keys = {s.tensor for s in act.slots}
            before = _distance(params_a, params_b, keys) if coupled else 0.0
            for s in act.slots:
                scale_slot(params_b[s.tensor], s, s.factor(c))
            if coupled and not _distance(params_a, params_b, keys) < before:
                for s in act.slots:   # the coordinates' updates together did not help: undone
                    scale_slot(params_b[s.tensor], s, s.factor(1.0 / c))
                continue
            total[name] = total[name] * c
            worst = max(worst, float((c - 1).abs().max()))
        if not worst > tol:
            break
    return total

