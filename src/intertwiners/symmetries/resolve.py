"""From atoms, ties and constraints to spaces, groups and parameter actions.

Atom classes (after the ties) that occur in exactly the same set of hidden values form one space (so a
slice, a concatenation or zero padding splits a producer's output into independent spaces); its group is
the largest kind satisfying every constraint on it; the queries/keys and values of one attention call form
one attention space (:class:`~intertwiners.symmetries.structured.AttentionGroup`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .constraints import DUAL, Equal, choose_group, holds
from .engine import Analysis, owner
from .structured import AttentionGroup


@dataclass
class Segment:
    """Where one space sits in a tensor axis: ``positions[i, r]`` holds occurrence r of space index
    ``index[i]``; the transform there is the space's element through ``chain``."""
    space: str
    index: np.ndarray
    positions: np.ndarray
    chain: tuple


@dataclass
class ParamAction:
    """How one space moves one parameter/buffer: along ``dim`` (None: the flattened tensor), ``role`` one of
    ``out`` (t -> T t), ``in`` (w -> w T^-1), ``scale`` (a per-channel factor: w -> P diag(t/s) w), ``perm``."""
    param: str
    dim: int | None
    role: str
    space: str
    segment: Segment
    in_segment: Segment | None = None
    groups: int = 1
    length: int = 0


def _ranges(positions: np.ndarray) -> str:
    pos = np.sort(np.unique(positions))
    parts, start = [], pos[0]
    for i in range(1, len(pos) + 1):
        if i == len(pos) or pos[i] != pos[i - 1] + 1:
            parts.append(f"{start}:{pos[i - 1] + 1}")
            if i < len(pos):
                start = pos[i]
    return ",".join(parts)


class Resolver:
    def __init__(self, an: Analysis):
        self.an = an
        n = len(an.parent)
        found = [an.find(a) for a in range(n)]
        self.root = np.array([r for r, _ in found], dtype=np.int64) if n else np.zeros(0, np.int64)
        self.par = np.array([p for _, p in found], dtype=np.int64) if n else np.zeros(0, np.int64)

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
            sel = odd & (chains == cid)
            out[sel] = self.an.chain_id((DUAL,) + self.an.chains[cid])
        return out

    def run(self):
        an = self.an
        # distinct values (by atom array), in graph order
        distinct, seen = [], set()
        for lay in an.layouts:
            if id(lay.atoms) not in seen:
                seen.add(id(lay.atoms))
                distinct.append(self.classes(lay.atoms))
        class_pins: dict[int, list[str]] = defaultdict(list)
        for atom, reasons in an.pins.items():
            class_pins[int(self.root[atom])].extend(reasons)
        output_classes = {int(self.root[a]) for a in an.output_atoms}

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
        cls_ids, first_l, first_p = all_c[starts], all_l[starts], all_p[starts]
        by_sig: dict[tuple, list[int]] = {}
        for k in np.lexsort((first_p, first_l)).tolist():
            by_sig.setdefault((int(sig_hash[k]), int(counts[k]), int(first_l[k])), []).append(int(cls_ids[k]))
        spaces = [dict(classes=cs, reasons=[r for c in cs for r in class_pins.get(c, [])],
                       output=any(c in output_classes for c in cs), constraints=set(), sites=[], ties=0,
                       group=None, name=None) for cs in by_sig.values()]
        space_of = {c: s for s, sp in enumerate(spaces) for c in sp["classes"]}
        index_of = {c: i for sp in spaces for i, c in enumerate(sp["classes"])}
        self.spaces, self.space_of, self.index_of = spaces, space_of, index_of

        space_arr = np.full(len(self.root) + 1, -1, dtype=np.int64)
        for c, sid in space_of.items():
            space_arr[c] = sid

        def pairs(atoms, chains):
            cls = self.classes(atoms)
            m = cls >= 0
            eff = self.eff_chains(atoms, chains)
            codes = np.unique(space_arr[cls[m]] * (1 << 24) + eff[m])
            return [(int(c >> 24), int(c & ((1 << 24) - 1))) for c in codes]

        for lay in an.layouts:
            seen_space: dict[int, int] = {}
            for s, e in pairs(lay.atoms, lay.chains):
                if s in seen_space and seen_space[s] != e:
                    spaces[s]["multi"] = True
                seen_space[s] = e
        for kind, (atoms, chains), extra in an.constraints:
            for s, e in pairs(atoms, chains):
                spaces[s]["constraints"].add(kind(chain=an.chains[e], **extra))
        for a, ca, b, cb in an.adds:
            cla, clb = self.classes(a), self.classes(b)
            both = (cla >= 0) & (clb >= 0)
            ea, eb = self.eff_chains(a, ca), self.eff_chains(b, cb)
            triples = np.unique(np.stack([space_arr[cla[both]], ea[both], eb[both]], 1), axis=0) \
                if both.any() else np.zeros((0, 3), np.int64)
            for s, x, y in triples.tolist():
                spaces[s]["ties"] += 1
                if x != y:
                    spaces[s]["constraints"].add(Equal(an.chains[x], an.chains[y]))
        for name, lay in an.sites:
            cls = self.classes(lay.atoms)
            for s in dict.fromkeys(space_of[c] for c in cls[cls >= 0].tolist()):
                spaces[s]["sites"].append(name)
        self._attention()
        self.space_arr = np.full(len(self.root) + 1, -1, dtype=np.int64)
        self.index_arr = np.full(len(self.root) + 1, -1, dtype=np.int64)
        for c, sid in self.space_of.items():
            self.space_arr[c] = sid
            self.index_arr[c] = self.index_of[c]
        return self

    def _attention(self):
        """Merge the query/key space and the value space of each attention call into one attention space."""
        an, spaces = self.an, self.spaces
        for rec in an.attention:
            kv = rec.kv_heads
            H, dk = rec.q.shape if rec.q is not None else (rec.v.shape[0], 0)
            dv = rec.v.shape[1]
            rep = H // kv if kv and H % kv == 0 else 0
            qk_cls = self.classes(rec.k.reshape(-1)).reshape(H, dk) if rec.k is not None else None
            v_cls = self.classes(rec.v.reshape(-1)).reshape(H, dv)
            if qk_cls is None:  # untransformed queries/keys: per-head maps of the values only
                qk_cls = np.zeros((H, 0), np.int64)
                dk = 0
            reason = None
            if not rep or (qk_cls < 0).any() or (v_cls < 0).any():
                reason = "attention with untransformed or unexpected queries, keys or values"
            else:
                qk_rows, v_rows = qk_cls[::rep], v_cls[::rep]
                sq = {self.space_of[c] for c in qk_rows.reshape(-1).tolist()} or {-1}
                sv = {self.space_of[c] for c in v_rows.reshape(-1).tolist()}
                if len(sq) != 1 or len(sv) != 1 or sq == sv:
                    reason = "attention whose queries/keys or values share channels with other values"
            head_spaces = set()
            if reason is None and rec.heads is not None:
                reason, head_spaces = self._scores_check(rec.heads, {s for s in sq | sv if s >= 0})
            coarse = reason is None and dk > 0 and bool((qk_rows == qk_rows[:, :1]).all()) \
                and len(set(qk_rows[:, 0].tolist())) == kv
            if coarse:  # queries/keys tied within each head (rotary embeddings): one scalar per head
                qk_rows, dk = qk_rows[:, :1], 1
            if reason is None:
                s_qk, s_v = sq.pop(), sv.pop()
                A = spaces[s_qk] if s_qk >= 0 else dict(classes=[], reasons=["no queries/keys"], output=False,
                                                        constraints=set(), sites=[], ties=0)
                B = spaces[s_v]
                if len(A["classes"]) != kv * dk or len(B["classes"]) != kv * dv \
                        or len(set(qk_rows.reshape(-1).tolist())) != kv * dk \
                        or len(set(v_rows.reshape(-1).tolist())) != kv * dv:
                    reason = "attention heads that are not separate channels"
            if reason is not None:
                for c in np.unique(np.concatenate([self.classes(t.reshape(-1)) for t in (rec.q, rec.k, rec.v)
                                                   if t is not None])):
                    if c >= 0:
                        spaces[self.space_of[int(c)]]["reasons"].append(reason)
                continue
            qk_free = not A["reasons"] and not A["output"] and all(
                holds("general_linear", c, an.groups) for c in A["constraints"])
            if B["reasons"] or B["output"] or not all(holds("general_linear", c, an.groups)
                                                      for c in B["constraints"]):
                B["reasons"].append("the attention output is read by an operation that needs a smaller group")
                if qk_free:
                    A["reasons"].append("the values of this attention block are pinned")
                continue
            name = owner_name(an, rec)
            if qk_free:
                group = AttentionGroup(kv, dk, dv, name=name)
                classes = [int(c) for c in qk_rows.reshape(-1)] + [int(c) for c in v_rows.reshape(-1)]
                A["classes"] = []
            else:  # queries/keys pinned (e.g. rotary embeddings): per-head maps of the values only
                group = AttentionGroup(kv, 0, dv, qk="identity", permute_heads=False, name=name)
                classes = [int(c) for c in v_rows.reshape(-1)]
            B["classes"] = []
            for s in head_spaces:   # the scores' head axis moves with the heads of this block
                spaces[s]["classes"] = []
            spaces.append(dict(classes=classes, reasons=[], output=False, constraints=set(),
                               sites=A["sites"] + B["sites"], ties=A["ties"] + B["ties"], group=group, name=name))
            sid = len(spaces) - 1
            for i, c in enumerate(classes):
                self.space_of[c] = sid
                self.index_of[c] = i

    def _scores_check(self, heads: np.ndarray, qkv_spaces: set) -> tuple[str | None, set]:
        """Written-out attention: the head atoms of its scores may only be read by the operations that keep
        them (scaling, a mask shared by the heads, softmax, dropout) -- not pinned, not an output, not bound
        to a parameter (a per-head bias), not tied to anything else. (reason or None, their spaces)."""
        cls = self.classes(heads)
        if (cls < 0).any():
            return "attention scores with untransformed heads", set()
        spaces = {self.space_of[int(c)] for c in cls}
        if spaces & qkv_spaces or len(spaces) != 1 or len(self.spaces[next(iter(spaces))]["classes"]) != len(cls):
            return "attention scores whose heads are tied to other channels", set()
        sp = self.spaces[next(iter(spaces))]
        if sp["reasons"] or sp["output"]:
            return "attention scores read by an operation that needs them fixed: " + "; ".join(
                dict.fromkeys(sp["reasons"] or ["the model's output"])), set()
        if not hasattr(self, "_bound"):
            self._bound = {int(c) for b in self.an.bindings for c in self.classes(b.atoms).tolist() if c >= 0}
        if any(int(c) in self._bound for c in cls):
            return "attention scores with a per-head parameter (e.g. a relative position bias)", set()
        return None, spaces

    # -- output ---------------------------------------------------------------------------------------------
    def segments(self, atoms: np.ndarray, chains: np.ndarray, active: dict[int, str],
                 splittable: set | frozenset = frozenset()) -> list[Segment] | str:
        cls = self.classes(atoms)
        eff = self.eff_chains(atoms, chains)
        out = []
        m = np.flatnonzero(cls >= 0)
        sp = self.space_arr[cls[m]]
        for s in dict.fromkeys(sp.tolist()):
            if s not in active:
                continue
            ps = m[sp == s]
            idx = self.index_arr[cls[ps]]
            chain_ids = np.unique(eff[ps])
            for cid in chain_ids.tolist():
                sel = eff[ps] == cid
                sub_idx = idx[sel]
                u2, c2 = np.unique(sub_idx, return_counts=True)
                if len(set(c2.tolist())) != 1 and s not in splittable:
                    return f"space {active[s]} occurs unevenly in one tensor axis"
                for count in np.unique(c2).tolist():   # e.g. a fused qkv axis: coarse q/k rows, single v rows
                    part = u2[c2 == count]
                    m2 = np.isin(sub_idx, part)
                    o2 = np.lexsort((ps[sel][m2], sub_idx[m2]))
                    out.append(Segment(active[s], part, ps[sel][m2][o2].reshape(len(part), int(count)),
                                       self.an.chains[int(cid)]))
        return out


def owner_name(an: Analysis, rec) -> str:
    node = next(n for n in an.cap.graph.nodes if n.name == rec.node)
    path, _ = owner(node)
    return f"{path or 'model'}.attention" if not path.endswith("attention") else path


def choose(sp: dict, groups: dict):
    if sp.get("group") is not None:
        return sp["group"]
    return choose_group(len(sp["classes"]), sp["constraints"], groups)
