"""Weight matching (Ainsworth, Hayase & Srinivasa 2023) over the spaces of a traced symmetry spec.

Find one permutation per space so that B's weights, permuted, are as close as possible to A's: maximise
sum over parameters of <W_A, pi(W_B)>. For one space with the others fixed this is a linear assignment
problem whose score is a sum of cross-products over every parameter slice the space moves
(``score[j, k] = sum_slots <B slice j, A slice k>``, the other axes of each tensor permuted by their
spaces' current permutations); coordinate descent solves one space at a time until nothing changes.

Initialisation: the descent runs twice and the result with the larger objective is kept, once from
identity permutations (Ainsworth et al.) and once from a greedy pass (ours) in which spaces are matched in
an order where each uses only the slices whose other axes are already matched (or never move, like the
input), so a permutation that the weights determine exactly (a planted one) is found exactly before the
descent starts. On independently trained networks the identity start often ends higher.
"""

from __future__ import annotations

import numpy as np
import torch

from ..stitching.matching import hungarian_permutation
from ..symmetries.slots import Slot
from .canonical import pieces, slot_rows
from .spaces import SpaceSlots, along


def permute_slot(t: torch.Tensor, slot: Slot, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with index j's slice moved to index perm[j]'s positions along the slot's axis."""
    view, axis = along(t, slot)
    src = np.arange(view.shape[axis])
    src[slot.positions[perm.numpy()].reshape(-1)] = slot.positions.reshape(-1)
    return view.index_select(axis, torch.as_tensor(src, device=t.device)).reshape(t.shape)


def select_slices(t: torch.Tensor, slot: Slot, idx: torch.Tensor) -> torch.Tensor:
    """The slices of the space's indices ``idx`` along the slot's axis (each index's r repeats), as a tensor
    of ``t``'s shape except along that axis (flattened tensors stay flat)."""
    view, axis = along(t, slot)
    return view.index_select(axis, _positions(slot, idx, t.device))


CHUNK = 1 << 22  # entries: tensors larger than this are multiplied in slices of about this many


def cross(tb: torch.Tensor, ta: torch.Tensor, slot: Slot, chunk: int = CHUNK) -> torch.Tensor:
    """(n, n) ``slot_rows(tb, slot) @ slot_rows(ta, slot).T``; for a tensor of more than ``chunk`` entries, summed
    over slices along another axis (the largest), so that the gathered rows of a large tensor (a token
    embedding) are never copied whole."""
    cuts = pieces(tb, slot, chunk)
    if cuts is None:
        return slot_rows(tb, slot) @ slot_rows(ta, slot).T
    total = None
    for axis, i, k in cuts:
        part = slot_rows(tb.narrow(axis, i, k), slot) @ slot_rows(ta.narrow(axis, i, k), slot).T
        total = part if total is None else total.add_(part)
    return total


def slots_by_key(actions: dict[str, SpaceSlots]) -> dict[str, list[tuple[str, Slot]]]:
    out: dict[str, list[tuple[str, Slot]]] = {}
    for name, act in actions.items():
        for s in act.slots:
            out.setdefault(s.tensor, []).append((name, s))
    return out


def _positions(slot: Slot, idx: torch.Tensor, device) -> torch.Tensor:
    """The tensor positions along the slot's axis of the space's indices ``idx`` (each index's r repeats)."""
    return torch.as_tensor(slot.positions[idx.numpy()].reshape(-1), device=device)


class _Scores:
    """The assignment scores of one coordinate descent, kept up to date as permutations change.

    ``score(name)`` is the float64 (n, n) sum over the space's slots of the cross-products
    ``C_s = slot_rows(T_s, s) @ slot_rows(A, s)^T`` (:func:`cross`), where T_s is B with the slots on the
    tensor's other axes permuted by their spaces' current permutations. It is computed in full once;
    afterwards, when a space's permutation changes on the indices that moved, only the slices of those indices
    change in each T_s, so every other space's score is corrected by the cross-product of the changed slices alone
    (``(rows(T_new) - rows(T_old)) @ rows(A)^T`` restricted to them): late sweeps, in which few indices move,
    cost a small fraction of a full pass. A space whose score has not changed since it was last solved keeps
    its permutation without a new assignment (the Hungarian solution of the same scores).

    ``keep_bytes`` bounds the memory of the scores kept between solves (None: every score is kept). A score
    that would take the kept scores past it is freed once its space is solved, and computed from scratch if
    the space has to be solved again (after a permutation it depends on changed); until then nothing is
    computed for it. Where no freed score is needed again (GPT-2 small: every space is solved on scores
    computed once) the assignments are the ones every score kept gives, bit for bit; otherwise a recomputed
    score differs from the corrected one by the rounding of the float32 cross-products.
    """

    def __init__(self, params_a: dict, params_b: dict, actions: dict[str, SpaceSlots], perms: dict,
                 keep_bytes: int | None = None, pins: dict | None = None):
        self.a, self.b, self.actions, self.perms = params_a, params_b, actions, perms
        self.pins = pins or {}
        self.by_key = slots_by_key(actions)
        self.scores: dict[str, torch.Tensor] = {}  # the scores kept, up to date
        self.current: set[str] = set()  # spaces solved on their scores as they are now (kept or freed)
        self.keep_bytes = keep_bytes

    def contribution(self, slot: Slot) -> torch.Tensor:
        """C_s (n, n) in the parameters' dtype, from scratch."""
        tb = self.b[slot.tensor]
        for name, other in self.by_key[slot.tensor]:
            if other is not slot and other.axis != slot.axis:  # slots on the same axis never touch slot's slices
                tb = permute_slot(tb, other, self.perms[name])
        return cross(tb, self.a[slot.tensor], slot)

    def partial(self, slots: list[Slot]) -> torch.Tensor:
        """The sum of C_s over some of a space's slots (the greedy start), from scratch."""
        n = slots[0].positions.shape[0]
        score = torch.zeros(n, n, dtype=torch.float64)
        for slot in slots:
            score += self.contribution(slot).cpu()
        return score

    def score(self, name: str) -> torch.Tensor:
        if name not in self.scores:
            self.scores[name] = self.partial(self.actions[name].slots)
        return self.scores[name]

    def solve(self, name: str) -> bool:
        """Re-solve one space's assignment (if its scores changed); True when its permutation changed."""
        if name in self.current:
            return False
        perm = assign(self.score(name), self.pins.get(name))
        self.current.add(name)
        if self.keep_bytes is not None and sum(t.nbytes for t in self.scores.values()) > self.keep_bytes:
            del self.scores[name]  # over the budget: freed, recomputed only if the space is solved again
        return self.set(name, perm)

    def set(self, name: str, perm: torch.Tensor) -> bool:
        """Set a space's permutation and correct the scores it enters; True when it changed."""
        old = self.perms[name]
        if torch.equal(perm, old):
            return False
        moved = old[torch.nonzero(old != perm).flatten()]  # positions m whose source index changed
        src_old, src_new = torch.argsort(old)[moved], torch.argsort(perm)[moved]
        switched: set[int] = set()  # this space's slots already at the new permutation
        for o in self.actions[name].slots:
            for sname, s in self.by_key[o.tensor]:
                if s is o or s.axis == o.axis:
                    continue
                self.current.discard(sname)
                if sname not in self.scores:
                    continue
                tb, ta = self.b[o.tensor], self.a[o.tensor]
                t_old, t_new = select_slices(tb, o, src_old), select_slices(tb, o, src_new)
                for oname, other in self.by_key[o.tensor]:
                    if other is s or other is o or other.axis in (o.axis, s.axis):
                        continue
                    if oname == name:
                        p = perm if id(other) in switched else old
                        t_old, t_new = permute_slot(t_old, other, p), permute_slot(t_new, other, p)
                    else:
                        t_old = permute_slot(t_old, other, self.perms[oname])
                        t_new = permute_slot(t_new, other, self.perms[oname])
                a_sub = select_slices(ta, o, moved)
                self.scores[sname] += cross(t_new - t_old, a_sub, s).cpu()
            switched.add(id(o))
        self.perms[name] = perm
        return True


def assign(score: torch.Tensor, pins: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """perm (n,) maximising sum_j score[j, perm[j]] (B's index j to A's index perm[j]; score (n, n)), with
    ``perm[pins[0]] = pins[1]`` kept when pins are given: the other rows are assigned among the other columns."""
    if pins is None:
        return hungarian_permutation(score)
    rows, cols = pins
    free_r = torch.ones(len(score), dtype=torch.bool)
    free_c = torch.ones(len(score), dtype=torch.bool)
    free_r[rows], free_c[cols] = False, False
    perm = torch.empty(len(score), dtype=torch.long)
    perm[rows] = cols
    fr, fc = torch.nonzero(free_r).flatten(), torch.nonzero(free_c).flatten()
    if len(fr):
        perm[fr] = fc[hungarian_permutation(score[fr][:, fc])]
    return perm


def objective(params_a: dict, params_b: dict, actions: dict[str, SpaceSlots], perms: dict) -> float:
    """sum over the parameters the spaces move of <A, B with every space's permutation applied>."""
    total = 0.0
    for key, slots in slots_by_key(actions).items():
        tb = params_b[key]
        for name, slot in slots:
            tb = permute_slot(tb, slot, perms[name])
        total += _dot64(params_a[key], tb)
    return total


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    """<a, b> in float64, ``chunk`` entries at a time (no float64 copies of whole tensors)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return sum(float((fa[i:i + chunk].double() * fb[i:i + chunk].double()).sum()) for i in range(0, fa.numel(), chunk))


def match_permutations(params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor],
                       actions: dict[str, SpaceSlots], max_sweeps: int = 30, init: str = "best",
                       keep_bytes: int | None = None, pins: dict | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """({space: perm}, sweeps): B's index j goes to A's index perm[j] (the element (perm, 1) moves B to A).

    ``init="greedy"`` starts the descent from the greedy pass (see the module docstring), ``"identity"``
    from identity permutations (Ainsworth et al.); ``"best"`` (default) runs both and keeps the result with
    the larger :func:`objective` (the greedy start finds planted permutations exactly; on independently
    trained networks the identity start often ends higher). ``keep_bytes``: the memory bound of the scores
    kept between solves (see ``_Scores``; None keeps them all). ``pins``: {space: (B's indices, A's indices)}
    pairs every assignment of the space keeps (pairs the data matched: :func:`assign`)."""
    if init == "best":
        runs = [_descend(params_a, params_b, actions, max_sweeps, i, keep_bytes, pins)
                for i in ("greedy", "identity")]
        scores = [objective(params_a, params_b, actions, perms) for perms, _ in runs]
        return runs[int(scores[1] > scores[0])]
    return _descend(params_a, params_b, actions, max_sweeps, init, keep_bytes, pins)


def _descend(params_a, params_b, actions, max_sweeps, init, keep_bytes=None, pins=None):
    names = [n for n, a in actions.items() if a.size > 1 and a.slots]
    perms = {n: torch.arange(a.size) for n, a in actions.items()}
    pins = {n: p for n, p in (pins or {}).items() if n in actions}
    for n, (rows, cols) in pins.items():   # a start that keeps the pins (the identity elsewhere where it can)
        perms[n] = assign(torch.eye(actions[n].size, dtype=torch.float64), (rows, cols))
    scores = _Scores(params_a, params_b, actions, perms, keep_bytes, pins)
    by_key = scores.by_key
    matched: set[str] = set()

    def determined(name, slot):
        return all(o in matched for o, s in by_key[slot.tensor] if s is not slot)

    pending = list(names) if init == "greedy" else []
    while pending:
        pick, use = None, None
        for name in pending:
            use = [s for s in actions[name].slots if determined(name, s)]
            if use:
                pick = name
                break
        if pick is None:
            pick, use = pending[0], actions[pending[0]].slots
        scores.set(pick, assign(scores.partial(use), pins.get(pick)))
        matched.add(pick)
        pending.remove(pick)
    sweeps, changed = 0, True
    while changed and sweeps < max_sweeps:
        sweeps += 1
        changed = False
        for name in names:
            changed |= scores.solve(name)
    return perms, sweeps
