"""Slots: every tensor axis a space acts on, and how an element reaches it (the one description of a spec).

A :class:`Slot` names a tensor (a parameter, a buffer, or the input of an activation site), the axis the
space acts along (None: the flattened tensor), which coordinates of the space it covers (``coords`` (n,)),
where each sits along the axis (``positions`` (n, r): occurrence k of coordinate ``coords[i]`` is at
``positions[i, k]`` -- repeats after a flatten into a linear layer, head blocks, one slice of a packed
projection), the *block* of another axis it is confined to (``block``: the output rows of one group of a
grouped convolution, or of one slice of a packed projection, whose input columns it moves) and a *reach*, a
small frozen value saying how an element A = P·diag(s) (or a dense A) acts there:

==================  ========================================================================================
:class:`Rows`       t -> T t (a producer's rows, a bias, an embedding's columns, a running mean)
:class:`Columns`    w -> w T^-1 (a consumer's input columns)
:class:`Gain`       w -> P diag(t/s) w: a per-channel factor between two values (norm gains, depthwise
                    filters, layer scale)
:class:`Permuted`   w -> P w (running variances)
:class:`HeadBlocks` attention: q/v rows (A_g / B_g), k rows (A_g^-T), o columns (B_g^-1), h (h-) rows
                    (columns) of a per-head parameter, permuted with the heads; a gain or a
                    permuted tensor on queries/keys with one coordinate per head (a norm's gain over the whole
                    projection, OLMo 2's) keeps its reach: the element is monomial there
:class:`Features`   the input of an activation site (``before``) and its output (``after``)
==================  ========================================================================================

where T is the transform the tensor sees: ``P·diag(c(s))`` with ``c`` a :class:`~.chains.Power` for
monomial groups (computed once, from the chain of operations and the activation groups), A or A^-T
(exponent 1 / -1) for dense groups. Every reach has a ``power``: the factor ``sign(s)**odd·|s|**exponent``
that multiplies the slice of coordinate j when it moves to ``positions[perm[j]]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .chains import DUAL, UNSCALED, Power, linear_power, power_of
from .layout import Channels, feature_index
from .records import Analysis
from .resolve import Resolver


@dataclass(frozen=True)
class Carried:
    """The transform carried where a chain of operations reaches: ``power`` (P·diag(power(s)); for dense
    groups exponent 1 is A, -1 is A^-T) and ``linear``, the same with every activation treated as linear
    (how ``apply_symmetry(..., check=False)`` acts with an element outside the group)."""
    power: Power
    linear: Power


@dataclass(frozen=True)
class Rows:
    """t -> T t along the axis."""
    carried: Carried

    @property
    def power(self) -> Power:
        return self.carried.power


@dataclass(frozen=True)
class Columns:
    """w -> w T^-1 along the axis (the input columns of a weight)."""
    carried: Carried

    @property
    def power(self) -> Power:
        return self.carried.power.inverse


@dataclass(frozen=True)
class Gain:
    """A per-channel factor between an input value (transform P·diag(s_in)) and an output value
    (P·diag(t)): w -> P diag(t/s_in) w. Monomial elements only."""
    out: Carried
    inp: Carried

    @property
    def power(self) -> Power:
        return self.out.power.over(self.inp.power)


@dataclass(frozen=True)
class Permuted:
    """w -> P w (a running variance: permuted, never scaled). Monomial elements only."""

    @property
    def power(self) -> Power:
        return UNSCALED


@dataclass(frozen=True)
class HeadBlocks:
    """An attention space's blocks: ``part`` ``"q"`` (rows, A_g), ``"k"`` (rows, A_g^-T), ``"v"`` (rows, B_g),
    ``"o"`` (columns, B_g^-1), ``"h"`` / ``"h-"`` (rows / columns of a per-head parameter: the head permutation),
    heads permuted together; coordinates index the attention space (queries/keys first, heads·dk of them, then
    values/outputs, then the per-head coordinates)."""
    part: str

    @property
    def power(self) -> Power:
        return Power(-1.0, True) if self.part in ("k", "o", "h-") else Power(1.0, True)


@dataclass(frozen=True)
class Features:
    """An activation site: its input carries ``before``, its output ``after`` (phi of the activation)."""
    before: Carried
    after: Carried

    @property
    def power(self) -> Power:
        return self.before.power


Reach = Rows | Columns | Gain | Permuted | HeadBlocks | Features


@dataclass(frozen=True, eq=False)
class Slot:
    """One tensor axis a space acts on (see the module docstring).

    ``space``: the space's name; ``tensor``: a parameter/buffer name or an activation site; ``kind``:
    ``"parameter"``, ``"buffer"`` or ``"site"``; ``axis``: the tensor axis (None: the flattened tensor, for
    a site the tensor at the example input's shape); ``length``: the size of that axis (or of the flattened
    tensor); ``coords`` (n,): the space coordinates covered; ``positions`` (n, r): where they sit;
    ``reach``: how an element acts (:data:`Reach`); ``block``: None, or ``(axis, start, stop)``: the slot
    moves only the part ``start:stop`` of another axis of the tensor."""
    space: str
    tensor: str
    kind: str
    axis: int | None
    length: int
    coords: np.ndarray
    positions: np.ndarray
    reach: Reach
    block: tuple[int, int, int] | None = None

    @property
    def exponent(self) -> float:
        """Exponent of the factor on each slice (``reach.power``)."""
        return self.reach.power.exponent

    @property
    def odd(self) -> bool:
        """Does a negative scale flip the slice's sign (``reach.power``)?"""
        return self.reach.power.odd

    def factor(self, scale: torch.Tensor) -> torch.Tensor:
        """The multiplier of each covered coordinate's slice for the element scales ``scale`` (size,):
        ``reach.power(scale[coords])``."""
        return self.reach.power(scale[torch.as_tensor(self.coords)])

    def __repr__(self) -> str:
        axis = "flat" if self.axis is None else f"axis {self.axis}"
        block = "" if self.block is None else f" in {self.block[1]}:{self.block[2]} of axis {self.block[0]}"
        return (f"Slot({self.space!r}: {self.kind} {self.tensor!r} {axis}{block}, {len(self.coords)} coords x "
                f"{self.positions.shape[1]}, {type(self.reach).__name__})")


class SlotBuilder:
    """Slots of the active spaces of a resolution (``active``: space id -> name, ``groups``: name -> group)."""

    def __init__(self, res: Resolver, an: Analysis, active: dict[int, str], groups: dict, buffers: frozenset):
        self.res, self.an, self.active, self.groups, self.buffers = res, an, active, groups, buffers
        # monomial spaces act coordinate by coordinate, attention block by block: their coordinates may occur
        # with different multiplicities in one axis
        self.splittable = {sid for sid, name in active.items()
                           if groups[name].is_monomial or groups[name].kind == "attention_heads"}
        self._carried: dict[tuple, Carried] = {}

    def carried(self, chain: tuple) -> Carried:
        if chain not in self._carried:
            self._carried[chain] = Carried(power_of(chain, self.an.groups), linear_power(chain))
        return self._carried[chain]

    def build(self) -> list[Slot]:
        out, seen = [], set()
        for u in self.an.uses:
            for slot in self._use_slots(u):
                key = (slot.tensor, slot.axis, slot.block, slot.space, slot.coords.tobytes(), slot.positions.tobytes())
                if key not in seen:   # a tied parameter (embedding and unembedding) is moved once
                    seen.add(key)
                    out.append(slot)
        for site in self.an.sites:
            out.extend(self._site_slots(site))
        return out

    def _segments(self, ch: Channels):
        return self.res.segments(ch, self.active, self.splittable)

    def _use_slots(self, u) -> list[Slot]:
        kind = "buffer" if u.param in self.buffers else "parameter"
        segs = self._segments(u.channels)
        inner = self._segments(u.inner) if u.inner is not None else None
        length, offset, block = len(u.channels.atoms), 0, None
        if u.span is not None and u.span.axis == u.dim:   # a slice along the axis: its positions in the whole
            length, offset = u.span.full[u.dim], u.span.start
        elif u.span is not None:                          # a block of another axis
            block = (u.span.axis, u.span.start, u.span.stop)
        slots = []
        for i, seg in enumerate(segs):
            name = self.active[seg.space]
            coords, positions = seg.index, seg.positions + offset
            if u.role == "gain":
                reach = Gain(self.carried(seg.chain), self.carried(inner[i].chain))
            elif u.role == "permuted":
                reach = Permuted()
            else:
                reach = (Rows if u.role == "rows" else Columns)(self.carried(seg.chain))
            group = self.groups[name]
            if group.kind == "attention_heads" and u.role in ("rows", "columns"):
                slots.extend(self._head_slots(name, u.param, kind, u.dim, length, coords, positions, seg.chain,
                                              u.role, group, block))
                continue
            slots.append(Slot(name, u.param, kind, u.dim, length, coords, positions, reach, block))
        return slots

    def _head_slots(self, name, tensor, kind, dim, length, coords, positions, chain, role, group,
                    block) -> list[Slot]:
        """An attention slot split into its query/key and value/output parts."""
        nq, nv = group.heads * group.dk, group.heads * group.dv
        out = []
        for sel, part in ((coords < nq, "k" if DUAL in chain else "q"),
                          ((coords >= nq) & (coords < nq + nv), "o" if role == "columns" else "v"),
                          (coords >= nq + nv, "h-" if role == "columns" else "h")):
            if sel.any():
                out.append(Slot(name, tensor, kind, dim, length, coords[sel], positions[sel], HeadBlocks(part),
                                block))
        return out

    def _site_slots(self, site) -> list[Slot]:
        lay = site.value
        fdims = lay.feature_dims()
        axis = fdims[0] if len(fdims) == 1 else None
        if axis is not None:
            idx = feature_index(lay, [axis])
            length = lay.shape[axis]
        else:
            idx = feature_index(lay, list(range(lay.ndim))).reshape(-1)
            length = len(idx)
        if idx is None:  # pragma: no cover - a site's features always lie in its tensor
            return []
        ch = Channels(lay.atoms[idx], lay.chains[idx])
        slots = []
        for seg in self._segments(ch):
            after = seg.chain + ((site.key,) if site.key is not None else ())
            slots.append(Slot(self.active[seg.space], site.name, "site", axis, length, seg.index, seg.positions,
                              Features(self.carried(seg.chain), self.carried(after))))
        return slots
