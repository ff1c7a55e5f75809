"""Resolution: from atoms, ties and constraints to spaces and their groups.

Atom classes (after the ties) that occur in exactly the same set of hidden values form one space (so a
slice, a concatenation or zero padding splits a producer's output into independent spaces); its group is
the largest kind satisfying every constraint on it; the queries/keys and values of one attention call form
one attention space (:class:`~intertwiners.symmetries.structured.AttentionGroup`). :meth:`Resolver.segments`
says where each space sits along a tensor axis (the input of :mod:`~intertwiners.symmetries.slots`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .chains import DUAL
from .constraints import Equal, choose_group, holds
from .layout import Channels
from .records import Analysis, Pins
from .structured import AttentionGroup


@dataclass
class Draft:
    """A space while it is being resolved: its atom ``classes`` (in coordinate order), why it must be pinned,
    whether it reaches the output, its constraints, activation sites, residual ties, and (attention) its
    group and name. ``multi``: some value holds its channels with different chains."""
    classes: list
    reasons: list = field(default_factory=list)
    output: bool = False
    constraints: set = field(default_factory=set)
    sites: list = field(default_factory=list)
    ties: int = 0
    group: object = None
    name: str | None = None
    multi: bool = False

    def choose(self, groups: dict):
        """The group (or the reason only the identity is left)."""
        return self.group if self.group is not None else choose_group(len(self.classes), self.constraints, groups)


@dataclass(frozen=True, eq=False)
class Segment:
    """Where one space sits in a tensor axis: ``positions[i, r]`` holds occurrence r of space coordinate
    ``index[i]``; the transform there is the space's element through ``chain``."""
    space: int
    index: np.ndarray
    positions: np.ndarray
    chain: tuple


def ranges(positions) -> str:
    """'0:8,24:32' for a set of positions."""
    pos = np.sort(np.unique(positions))
    parts, start = [], pos[0]
    for i in range(1, len(pos) + 1):
        if i == len(pos) or pos[i] != pos[i - 1] + 1:
            parts.append(f"{start}:{pos[i - 1] + 1}")
            if i < len(pos):
                start = pos[i]
    return ",".join(parts)


def in_order(values: np.ndarray) -> list[int]:
    """The distinct entries of ``values`` (n,) in the order they first occur."""
    distinct, first = np.unique(values, return_index=True)
    return distinct[np.argsort(first)].tolist()


def _occurrences(space: int, index: np.ndarray, positions: np.ndarray, chain: tuple,
                 splittable: bool) -> list[Segment]:
    """Segments of one space and chain: coordinates ``index`` (n,) at ``positions`` (n,), grouped by how
    often each coordinate occurs (a fused qkv axis: coarse q/k rows, single v rows); occurrences in
    position order. Uneven multiplicities need a ``splittable`` space, else ValueError."""
    order = np.lexsort((positions, index))
    index, positions = index[order], positions[order]
    starts = np.flatnonzero(np.concatenate([[True], index[1:] != index[:-1]]))
    counts = np.diff(np.append(starts, len(index)))
    multiplicities = np.unique(counts).tolist()
    if len(multiplicities) != 1 and not splittable:
        raise ValueError(f"space {space} occurs unevenly in one tensor axis")  # pragma: no cover
    out = []
    for count in multiplicities:
        keep = counts == count
        part = index[starts[keep]]
        out.append(Segment(space, part, positions[np.repeat(keep, counts)].reshape(len(part), count), chain))
    return out


def _group_in_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``keys`` (n, k) grouped by equal rows: (group (n,), index within the group (n,)), groups
    numbered by their first row and rows kept in order inside each group."""
    if not len(keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group)
    index = np.empty(len(group), dtype=np.int64)
    index[order] = np.arange(len(group)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return group, index


def _space_reasons(pins: Pins, root: np.ndarray, space_of: np.ndarray, index_of: np.ndarray,
                   n_spaces: int) -> list[list[str]]:
    """The distinct pin reasons of each space, in order: its classes in coordinate order, inside a class its
    atoms by their first pin (then atom id), each atom's reasons as they were found."""
    cls = root[pins.atoms]
    space = space_of[cls]
    first = np.full(len(root) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, pins.atoms, pins.events)
    order = np.lexsort((pins.events, pins.atoms, first[pins.atoms], index_of[cls], space))
    order = order[space[order] >= 0]
    out: list[list[str]] = [[] for _ in range(n_spaces)]
    for k, events in zip(*_split_by(space[order], pins.events[order]), strict=True):
        out[k] = list(dict.fromkeys(pins.reasons[e] for e in dict.fromkeys(events.tolist())))
    return out


def _split_by(labels: np.ndarray, values: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """(each distinct label of the sorted ``labels``, the run of ``values`` under it)."""
    if not len(labels):
        return [], []
    starts = np.flatnonzero(np.concatenate([[True], labels[1:] != labels[:-1]]))
    return labels[starts].tolist(), np.split(values, starts[1:])


_PER_HEAD_SCALARS = (("scaled_permutation", "general_linear"), ("positive_scaled_permutation", "positive"),
                     ("signed_permutation", "sign"), ("permutation", "identity"))


def per_head_scalar(constraints: set, groups: dict) -> str | None:
    """What a query/key space with one coordinate per head (its channels tied within each head) lets each head's
    scalar be, as an attention group's ``qk`` (:class:`~.structured.AttentionGroup`): the largest monomial kind
    that satisfies every constraint on the space -- its elements are exactly a permutation of the heads times a
    scalar per head -- read as that scalar's kind (any non-zero, positive, ±1, 1); None when none does."""
    return _largest_per_head(_PER_HEAD_SCALARS, constraints, groups)


def _largest_per_head(table: tuple, constraints: set, groups: dict) -> str | None:
    """The per-head kind of the first (largest) monomial kind in ``table`` that satisfies every constraint."""
    for kind, inner in table:
        if all(holds(kind, c, groups) for c in constraints):
            return inner
    return None


_PER_HEAD_MONOMIALS = (("scaled_permutation", "monomial"), ("positive_scaled_permutation", "positive_monomial"),
                       ("signed_permutation", "signed_permutation"), ("permutation", "permutation"))


def per_head_monomial(constraints: set, groups: dict) -> str | None:
    """What each head's map may be, as an attention group's ``qk`` or ``vo``, for queries/keys or values that
    only monomial maps pass (Hiera's and SAM 2's max-pooled queries: positive scalings): a permutation within
    the head times the largest diagonal kind that satisfies every constraint on the space. With the heads
    permuted too, an element is then one of that monomial kind on the whole space (the dual a map's keys or
    outputs take, P·D^-1, is of the same kind). None when not even permutations do."""
    return _largest_per_head(_PER_HEAD_MONOMIALS, constraints, groups)


class Resolver:
    """Spaces of an :class:`~intertwiners.symmetries.records.Analysis` (``spaces``: list of :class:`Draft`,
    ``space_of``/``index_of``: atom class -> space id / coordinate)."""

    def __init__(self, an: Analysis):
        self.an = an
        self.root, self.par = an.roots, an.parity
        self.chains = list(an.chains)
        self._chain_ids = {c: i for i, c in enumerate(self.chains)}

    def chain_id(self, chain: tuple) -> int:
        if chain not in self._chain_ids:
            self._chain_ids[chain] = len(self.chains)
            self.chains.append(chain)
        return self._chain_ids[chain]

    def classes(self, atoms: np.ndarray) -> np.ndarray:
        out = atoms.copy()
        m = atoms >= 0
        out[m] = self.root[atoms[m]]
        return out

    def eff_chains(self, atoms: np.ndarray, chains: np.ndarray) -> np.ndarray:
        """Chain ids including the dual parity of each atom."""
        out = chains.copy()
        m = atoms >= 0
        odd = np.zeros(len(atoms), dtype=bool)
        odd[m] = self.par[atoms[m]] == 1
        for cid in np.unique(chains[odd]).tolist():
            out[odd & (chains == cid)] = self.chain_id((DUAL,) + self.chains[cid])
        return out

    def run(self) -> Resolver:
        an = self.an
        distinct, seen = [], set()   # distinct values (by atom array), in graph order
        for lay in an.values:
            if id(lay.atoms) not in seen:
                seen.add(id(lay.atoms))
                distinct.append(self.classes(lay.atoms))

        # signature of each class = the set of values holding it (hashed: a sum of random 64-bit labels)
        cs, ls, ps = [], [], []
        for i, cls in enumerate(distinct):
            pos = np.flatnonzero(cls >= 0)
            cs.append(cls[pos])
            ls.append(np.full(len(pos), i, dtype=np.int64))
            ps.append(pos)
        all_c = np.concatenate(cs) if cs else np.zeros(0, np.int64)
        all_l = np.concatenate(ls) if ls else np.zeros(0, np.int64)
        all_p = np.concatenate(ps) if ps else np.zeros(0, np.int64)
        order = np.lexsort((all_p, all_l, all_c))
        all_c, all_l, all_p = all_c[order], all_l[order], all_p[order]
        keep = np.ones(len(all_c), dtype=bool)
        keep[1:] = (all_c[1:] != all_c[:-1]) | (all_l[1:] != all_l[:-1])  # one entry per (class, value)
        all_c, all_l, all_p = all_c[keep], all_l[keep], all_p[keep]
        starts = np.flatnonzero(np.concatenate([[True], all_c[1:] != all_c[:-1]])) if len(all_c) else all_c
        labels = np.random.default_rng(0).integers(1, 2**63 - 1, size=max(len(distinct), 1)).astype(np.uint64)
        with np.errstate(over="ignore"):
            sig_hash = np.add.reduceat(labels[all_l], starts) if len(starts) else np.zeros(0, np.uint64)
        counts = np.diff(np.concatenate([starts, [len(all_c)]]))
        order = np.lexsort((all_p[starts], all_l[starts]))   # classes by (first value, position there)
        keys = np.stack([sig_hash[order], counts[order].astype(np.uint64), all_l[starts][order].astype(np.uint64)], 1)
        space, index = _group_in_order(keys)
        classes = all_c[starts][order]
        by_space = np.lexsort((index, space))
        space_of = np.full(len(self.root) + 1, -1, dtype=np.int64)
        index_of = np.full(len(self.root) + 1, -1, dtype=np.int64)
        space_of[classes], index_of[classes] = space, index
        n_spaces = int(space.max()) + 1 if len(space) else 0
        reasons = _space_reasons(an.pins, self.root, space_of, index_of, n_spaces)
        outputs = set(space_of[self.root[an.outputs]].tolist()) - {-1}
        members = np.split(classes[by_space], np.cumsum(np.bincount(space, minlength=n_spaces))[:-1]) \
            if n_spaces else []   # no hidden channel at all (every layer's weight untransformed): no space
        spaces = [Draft(m.tolist(), reasons[k], k in outputs) for k, m in enumerate(members)]
        self.spaces = spaces
        self.space_of = dict(zip(classes[by_space].tolist(), space[by_space].tolist()))
        self.index_of = dict(zip(classes[by_space].tolist(), index[by_space].tolist()))
        self.space_arr, self.index_arr = space_of, index_of

        for lay in an.values:
            seen_space: dict[int, int] = {}
            for s, e in self._pairs(lay.channels):
                if s in seen_space and seen_space[s] != e:
                    spaces[s].multi = True
                seen_space[s] = e
        for req in an.requirements:
            extra = {"key": req.key} if req.key is not None else {}
            for s, e in self._pairs(req.channels):
                spaces[s].constraints.add(req.kind(chain=self.chains[e], **extra))
        for tie in an.ties:
            a, b = tie.a, tie.b
            cla, clb = self.classes(a.atoms), self.classes(b.atoms)
            both = (cla >= 0) & (clb >= 0)
            ea, eb = self.eff_chains(a.atoms, a.chains), self.eff_chains(b.atoms, b.chains)
            triples = np.unique(np.stack([self.space_arr[cla[both]], ea[both], eb[both]], 1), axis=0) \
                if both.any() else np.zeros((0, 3), np.int64)
            for s, x, y in triples.tolist():
                spaces[s].ties += 1
                if x != y:
                    spaces[s].constraints.add(Equal(self.chains[x], self.chains[y]))
        for site in an.sites:
            cls = self.classes(site.value.atoms)
            for s in dict.fromkeys(self.space_of[c] for c in cls[cls >= 0].tolist()):
                spaces[s].sites.append(site.name)
        self._attention()
        self._index_arrays()
        return self

    def _index_arrays(self) -> None:
        self.space_arr = np.full(len(self.root) + 1, -1, dtype=np.int64)
        self.index_arr = np.full(len(self.root) + 1, -1, dtype=np.int64)
        classes = np.fromiter(self.space_of, dtype=np.int64, count=len(self.space_of))
        self.space_arr[classes] = np.fromiter(self.space_of.values(), dtype=np.int64, count=len(classes))
        self.index_arr[classes] = np.fromiter(map(self.index_of.__getitem__, self.space_of), dtype=np.int64,
                                              count=len(classes))

    def _pairs(self, ch: Channels) -> list[tuple[int, int]]:
        """The distinct (space, effective chain) pairs of some channels."""
        cls = self.classes(ch.atoms)
        m = cls >= 0
        eff = self.eff_chains(ch.atoms, ch.chains)
        codes = np.unique(self.space_arr[cls[m]] * (1 << 24) + eff[m])
        return [(int(c >> 24), int(c & ((1 << 24) - 1))) for c in codes]

    def _attention(self) -> None:
        """Merge the query/key space and the value space of each attention call into one attention space."""
        an, spaces = self.an, self.spaces
        readers: dict = {}   # query/key class -> how many attention calls read it
        for rec in an.attention:
            if rec.k is not None:
                for c in set(self.classes(rec.k.reshape(-1)).tolist()):
                    readers[c] = readers.get(c, 0) + 1
        for rec in an.attention:
            kv = rec.kv_heads
            H, dk = rec.q.shape if rec.q is not None else (rec.v.shape[0], 0)
            dv = rec.v.shape[1] if rec.v is not None else 0
            rep = H // kv if kv and H % kv == 0 else 0
            qk_cls = self.classes(rec.k.reshape(-1)).reshape(H, dk) if rec.k is not None else None
            # no values: the scores are read across heads (talking heads), queries/keys alone, heads in place
            v_cls = self.classes(rec.v.reshape(-1)).reshape(H, dv) if rec.v is not None else np.zeros((H, 0), np.int64)
            if qk_cls is None:  # untransformed queries/keys: per-head maps of the values only
                qk_cls = np.zeros((H, 0), np.int64)
                dk = 0
            reason, split = None, False
            if not rep or (qk_cls < 0).any() or (v_cls < 0).any():
                reason = "attention with untransformed or unexpected queries, keys or values"
            else:
                qk_rows, v_rows = qk_cls[::rep], v_cls[::rep]
                sq = {self.space_of[c] for c in qk_rows.reshape(-1).tolist()} or {-1}
                sv = {self.space_of[c] for c in v_rows.reshape(-1).tolist()} or {-2}
                # queries shared with an earlier call that split them by head (GC ViT's global query, read by
                # several blocks of a stage): the queries/keys keep those per-head spaces
                split = len(sq) > 1 and len(sv) == 1 and not sq & sv and self._split_by_head_already(qk_rows)
                if (len(sq) != 1 and not split) or len(sv) != 1 or sq == sv:
                    reason = "attention whose queries/keys or values share channels with other values"
            head_spaces, heads_fixed, head_params = set(), rec.v is None, False
            if reason is None and rec.heads is not None:
                reason, head_spaces, heads_fixed, head_params = self._scores_check(
                    rec.heads, {s for s in sq | sv if s >= 0})
            coarse = reason is None and not split and dk > 0 and bool((qk_rows == qk_rows[:, :1]).all()) \
                and len(set(qk_rows[:, 0].tolist())) == kv
            if coarse:  # queries/keys tied within each head (rotary embeddings): one scalar per head
                qk_rows, dk = qk_rows[:, :1], 1
            v_coarse = reason is None and dv > 1 and bool((v_rows == v_rows[:, :1]).all()) \
                and len(set(v_rows[:, 0].tolist())) == kv
            if v_coarse:  # values tied within each head (normalised per head, Gemma 4's v_norm): one per head
                v_rows, dv = v_rows[:, :1], 1
            if reason is None:
                s_qk, s_v = (-1 if split else sq.pop()), sv.pop()
                A = None if split else spaces[s_qk] if s_qk >= 0 else Draft([], ["no queries/keys"])
                B = spaces[s_v] if s_v >= 0 else Draft([])
                # pinned queries/keys (a per-head norm, Llama 4's) need not be apart: the values keep their
                # per-head maps with the heads in place whatever ties the pinned channels hold
                qk_apart = A is None or bool(A.reasons) or (len(A.classes) == kv * dk
                                                            and len(set(qk_rows.reshape(-1).tolist())) == kv * dk)
                if not qk_apart or len(B.classes) != kv * dv or len(set(v_rows.reshape(-1).tolist())) != kv * dv:
                    reason = "attention heads that are not separate channels"
            if reason is not None:
                for c in np.unique(np.concatenate([self.classes(t.reshape(-1)) for t in (rec.q, rec.k, rec.v)
                                                   if t is not None])):
                    if c >= 0:
                        spaces[self.space_of[int(c)]].reasons.append(reason)
                if rec.heads is not None:   # the scores' head axis (and a per-head parameter on it) stays fixed
                    for c in np.unique(self.classes(np.asarray(rec.heads).reshape(-1))):
                        if c >= 0:
                            spaces[self.space_of[int(c)]].reasons.append(reason)
                continue
            qk_free = A is not None and not A.reasons and not A.output \
                and all(holds("general_linear", c, an.groups) for c in A.constraints)
            qk_kind = "general_linear" if qk_free else None
            if coarse and not qk_free and A is not None and not A.reasons and not A.output:
                # one coordinate per head (rotary embeddings, a norm per head): the heads may still permute,
                # each with the scalar that every operation on the queries/keys lets through
                qk_kind = per_head_scalar(A.constraints, an.groups)
                qk_free = qk_kind is not None
            if not coarse and not qk_free and A is not None and not A.reasons and not A.output \
                    and all(readers.get(int(c), 0) == 1 for c in qk_rows.reshape(-1)):
                # queries/keys that only monomial maps pass (max-pooled queries): a permutation within each head
                # with the scalings every operation on them lets through, the heads still permuting (queries
                # read by several calls, GC ViT's global query, are split by head below: one call's group
                # cannot hold them)
                qk_kind = per_head_monomial(A.constraints, an.groups)
                qk_free = qk_kind is not None
            vo_kind = "general_linear"
            if v_coarse and not B.reasons and not B.output:   # each head's scalar, as for queries/keys
                vo_kind = per_head_scalar(B.constraints, an.groups)
            elif not B.reasons and not B.output \
                    and not all(holds("general_linear", c, an.groups) for c in B.constraints):
                vo_kind = per_head_monomial(B.constraints, an.groups)   # (values pooled by a maximum)
            if B.reasons or B.output or vo_kind is None:
                B.reasons.append("the attention output is read by an operation that needs a smaller group")
                if qk_free:
                    A.reasons.append("the values of this attention block are pinned")
                elif A is not None:
                    self._split_by_head(A, qk_rows)
                self._heads_in_place(head_spaces if head_params else (), "the attention block is pinned")
                continue
            if not qk_free and A is not None:
                self._split_by_head(A, qk_rows)
            if rec.v is None and not qk_free:
                self._heads_in_place(head_spaces if head_params else (),
                                     "the attention block keeps its heads in place")
                continue
            per_head = []   # classes of a per-head parameter on the scores' heads (Swin's relative position bias)
            if head_params and qk_free and not heads_fixed and rep == 1:
                per_head = [int(c) for c in self.classes(np.asarray(rec.heads).reshape(-1))]
            elif head_params:   # (one slice per query head, but grouped-query heads move in groups)
                heads_fixed = True
                self._heads_in_place(head_spaces, "the attention block keeps its heads in place")
            if qk_free:   # heads permute only when the scores reach the values head by head, and nothing else
                group = AttentionGroup(kv, dk, dv, qk=qk_kind, vo=vo_kind, permute_heads=not heads_fixed,
                                       name=rec.owner, per_head=1 if per_head else 0)
                classes = [int(c) for c in qk_rows.reshape(-1)] + [int(c) for c in v_rows.reshape(-1)] + per_head
                A.classes = []
            else:  # queries/keys pinned (e.g. rotary embeddings): per-head maps of the values only
                group = AttentionGroup(kv, 0, dv, qk="identity", vo=vo_kind, permute_heads=False, name=rec.owner)
                classes = [int(c) for c in v_rows.reshape(-1)]
            B.classes = []
            for s in head_spaces:   # the scores' head axis moves with the heads of this block
                if not head_params or per_head:
                    spaces[s].classes = []
            kept = A if A is not None else Draft([])   # split queries/keys keep their own sites and ties
            spaces.append(Draft(classes, [], False, set(), kept.sites + B.sites, kept.ties + B.ties, group, rec.owner))
            sid = len(spaces) - 1
            for i, c in enumerate(classes):
                self.space_of[c] = sid
                self.index_of[c] = i

    def _heads_in_place(self, head_spaces, why: str) -> None:
        """A per-head parameter on the scores' heads (``head_spaces``) stays fixed when the block keeps its heads."""
        for s in head_spaces:
            self.spaces[s].reasons.append(f"{why}: a per-head parameter on its heads stays in place")

    def _split_by_head(self, A: Draft, rows: np.ndarray) -> None:
        """Queries/keys that are not merged into an attention space because they keep a smaller group than the
        per-head maps A_g (a batch norm after their projections: signed permutations): ``q @ k^T`` contracts the
        width of each head on its own, so an element may act within a head only, never move a channel to another
        head. ``rows`` (heads, width): A's classes by head; A becomes the first head's space and every other head
        gets its own space with A's constraints (a space that is pinned, or will be for holding its channels
        with different transforms in one value, stays as it is)."""
        if A.reasons or A.multi or len(rows) < 2:
            return
        sid = self.space_of[int(rows[0, 0])]
        for h, row in enumerate(rows):
            classes = [int(c) for c in row]
            if h == 0:
                A.classes = classes
            else:
                self.spaces.append(Draft(classes, [], A.output, set(A.constraints), list(A.sites), A.ties,
                                         multi=A.multi))
                sid = len(self.spaces) - 1
            for i, c in enumerate(classes):
                self.space_of[c] = sid
                self.index_of[c] = i

    def _split_by_head_already(self, rows: np.ndarray) -> bool:
        """Are the queries/keys ``rows`` (heads, width; classes) already one space per head, each holding exactly
        its head's classes (split by :meth:`_split_by_head` for an earlier attention call that reads them)?"""
        seen = set()
        for row in rows:
            owners = {self.space_of[int(c)] for c in row}
            if len(owners) != 1:
                return False
            s = owners.pop()
            if s in seen or sorted(self.spaces[s].classes) != sorted(int(c) for c in row):
                return False
            seen.add(s)
        return True

    def _scores_check(self, heads: np.ndarray, qkv_spaces: set) -> tuple[str | None, set, bool, bool]:
        """Written-out attention (or a mask with one channel per head): the head atoms of its scores may only be
        read by the operations that keep them (scaling, a mask shared by the heads, softmax, dropout) or by a
        parameter with one slice per head (a relative position bias table of this block alone) -- not pinned,
        not an output, not tied to anything else, not shared with another block (T5's one table for every
        layer). When they are, the heads stay in place (their spaces are pinned here) and every head keeps its
        maps: a head's scores do not change under A_g, A_g^-T, so whatever reads them is unaffected. Returns
        (reason the block must be pinned -- only when the heads are tied to its queries, keys or values --,
        the heads' spaces that move with the block's head permutation, whether the heads stay in place,
        whether those spaces reach a parameter: then they are coordinates of the block's group, permuted with
        its heads, or pinned when the block keeps its heads in place)."""
        cls = self.classes(heads)
        if (cls < 0).any():
            return None, set(), True, False
        spaces = {self.space_of[int(c)] for c in cls}
        if spaces & qkv_spaces:
            return "attention scores whose heads are tied to its queries, keys or values", set(), True, False
        why, bound = None, False
        if len(spaces) != 1 or len(self.spaces[next(iter(spaces))].classes) != len(cls):
            why = "attention scores whose heads are tied to other channels"
        elif any(self.spaces[s].reasons or self.spaces[s].output for s in spaces):
            return None, set(), True, False   # pinned already (read by an operation that needs them fixed, an output)
        else:
            if not hasattr(self, "_bound"):
                self._bound = {int(c) for u in self.an.uses for c in self.classes(u.channels.atoms).tolist()
                               if c >= 0}
                counts: dict[int, int] = {}
                for rec in self.an.attention:
                    if rec.heads is not None:
                        for c in set(self.classes(np.asarray(rec.heads).reshape(-1)).tolist()):
                            counts[c] = counts.get(c, 0) + 1
                self._shared_heads = {c for c, n in counts.items() if n > 1}
            bound = any(int(c) in self._bound for c in cls)
            space = self.spaces[next(iter(spaces))]
            if bound and any(int(c) in self._shared_heads for c in cls):
                why = "attention scores with a per-head parameter shared with other blocks (e.g. T5's relative " \
                      "position bias)"
            elif bound and not all(holds("permutation", c, self.an.groups) for c in space.constraints):
                why = "attention scores with a per-head parameter read by an operation that needs the heads fixed"
        if why is not None:
            for s in spaces:
                self.spaces[s].reasons.append(why + ": heads stay in place")
            return None, set(), True, False
        return None, spaces, False, bound

    def segments(self, ch: Channels, active: set | dict, splittable: set | frozenset = frozenset()) -> list[Segment]:
        """Where the ``active`` spaces sit among the positions of ``ch``: one :class:`Segment` per space,
        chain and multiplicity. A space whose coordinates occur unevenly must be ``splittable`` (monomial
        and attention elements act coordinate by coordinate / block by block), else ValueError."""
        cls = self.classes(ch.atoms)
        eff = self.eff_chains(ch.atoms, ch.chains)
        out = []
        m = np.flatnonzero(cls >= 0)
        sp = self.space_arr[cls[m]]
        for s in in_order(sp):
            if s not in active:
                continue
            ps = m[sp == s]
            idx = self.index_arr[cls[ps]]
            chains = eff[ps]
            for cid in np.unique(chains).tolist():
                sel = chains == cid
                out.extend(_occurrences(s, idx[sel], ps[sel], self.chains[cid], s in splittable))
        return out
