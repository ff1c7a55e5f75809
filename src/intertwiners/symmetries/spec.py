"""The symmetry spec: spaces, their groups and their slots (what every consumer reads), and pinned spaces.

:func:`build_spec` turns a resolved analysis into a :class:`SymmetrySpec`: names the spaces (after the first
activation site that holds them, with channel ranges when that site holds several, else after their
producing module), gives each its group or pins it with the reasons, and lists its slots
(:mod:`~intertwiners.symmetries.slots`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from .records import Analysis
from .resolve import Resolver, ranges
from .slots import Columns, HeadBlocks, Permuted, Rows, Slot, SlotBuilder


@dataclass(frozen=True)
class Space:
    """One hidden space and its group: ``size`` coordinates, ``group`` (an ``IntertwinerGroup`` or an
    :class:`~intertwiners.symmetries.structured.AttentionGroup`), ``sites`` (activation sites whose input
    holds it), ``producers``/``consumers`` (parameters whose rows / columns it moves), ``ties`` (residual
    additions inside it)."""

    name: str
    size: int
    group: object
    sites: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    ties: int = 0

    @property
    def kind(self) -> str:
        return self.group.kind

    @property
    def is_monomial(self) -> bool:
        return self.group.is_monomial

    def __repr__(self) -> str:
        return f"Space({self.name!r}, size={self.size}, kind={self.kind!r}, sites={self.sites}, ties={self.ties})"


@dataclass(frozen=True, eq=False)
class ParamAction:
    """A compatibility view of a parameter/buffer :class:`~intertwiners.symmetries.slots.Slot`:
    ``role`` ``out`` (rows), ``in`` (columns), ``scale`` (a gain), ``perm`` (permuted); ``dim`` the axis
    (None: flattened). Read ``slot`` for everything else."""
    param: str
    dim: int | None
    role: str
    space: str
    slot: Slot


def _role(slot: Slot) -> str:
    r = slot.reach
    if isinstance(r, HeadBlocks):
        return "in" if r.part == "o" else "out"
    if isinstance(r, Rows):
        return "out"
    if isinstance(r, Columns):
        return "in"
    return "perm" if isinstance(r, Permuted) else "scale"


@dataclass(frozen=True)
class SymmetrySpec:
    """The weight-space symmetries of one model: ``spaces`` (name -> :class:`Space`), ``pinned`` (name ->
    reason), ``pinned_sizes``, ``sites`` (all activation sites), ``all_slots`` (every slot of every space;
    see :meth:`slots`), ``lower_precision_inside``."""

    spaces: dict[str, Space]
    pinned: dict[str, str]
    pinned_sizes: dict[str, int]
    sites: list[str]
    all_slots: tuple[Slot, ...]
    model_type: str = ""
    lowest_cast: object = None
    """The lowest floating dtype the captured graph casts to (float32/float16/bfloat16; None if none)."""

    @property
    def lower_precision_inside(self) -> bool:
        """The captured graph casts to float32/float16/bfloat16 (transformers' RMSNorm does, even in a float64
        model): a transformed copy then agrees with the model to that precision only (the rounding differs)."""
        return self.lowest_cast is not None

    def _check_space(self, space: str | None) -> None:
        if space is not None and space not in self.spaces:
            raise ValueError(f"unknown space {space!r}; spaces: {list(self.spaces)}")

    def slots(self, space: str | None = None) -> list[Slot]:
        """Every tensor axis ``space`` acts on (all spaces when None): parameters, buffers and the inputs of
        activation sites, each a :class:`~intertwiners.symmetries.slots.Slot`."""
        self._check_space(space)
        return [s for s in self.all_slots if space is None or s.space == space]

    def actions(self, space: str | None = None) -> list[ParamAction]:
        """The parameter/buffer slots of ``space`` as ``ParamAction(param, dim, role, space, slot)``."""
        return [ParamAction(s.tensor, s.axis, _role(s), s.space, s) for s in self.slots(space) if s.kind != "site"]

    def without(self, pins: dict[str, str]) -> SymmetrySpec:
        """This spec with the spaces of ``pins`` (name -> reason) pinned."""
        spaces = {k: v for k, v in self.spaces.items() if k not in pins}
        return replace(self, spaces=spaces, pinned={**self.pinned, **pins},
                       pinned_sizes={**self.pinned_sizes, **{k: self.spaces[k].size for k in pins}},
                       all_slots=tuple(s for s in self.all_slots if s.space in spaces))

    def summary(self) -> str:
        lines = [f"{self.model_type}: {len(self.spaces)} spaces, {len(self.pinned)} pinned"]
        for s in self.spaces.values():
            extra = f", tied by {s.ties} residual add(s)" if s.ties else ""
            lines.append(f"  {s.name:<32} n={s.size:<5} {s.kind:<28} sites={s.sites}{extra}")
        for name, reason in self.pinned.items():
            lines.append(f"  {name:<32} n={self.pinned_sizes.get(name, '?'):<5} PINNED: {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _names(res: Resolver, an: Analysis) -> list[str]:
    """A name per space: its first activation site (with channel ranges when the site holds more), else the
    module of its first producer."""
    producers = {}
    for u in an.uses:
        if u.role == "rows":
            cls = res.classes(u.channels.atoms)
            for c in cls[cls >= 0][:1].tolist():
                producers.setdefault(res.space_of[c], u.param.rsplit(".", 1)[0])
    site_values = {s.name: s.value for s in an.sites}
    used, names = set(), []
    for sid, sp in enumerate(res.spaces):
        base = sp.name
        if base is None and sp.sites:
            base = sp.sites[0]
            cls = res.classes(site_values[base].atoms)
            inside = [i for i, c in enumerate(cls.tolist()) if c >= 0 and res.space_of[c] == sid]
            if len(inside) != len(cls) and inside:
                base = f"{base}[{ranges(np.array(inside))}]"
        if base is None:
            base = producers.get(sid, f"space{sid}")
        name, k = base, 1
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def build_spec(an: Analysis, model_type: str, buffers: frozenset = frozenset()) -> SymmetrySpec:
    """The spec of an analysis: spaces with groups and slots, pinned spaces with reasons."""
    res = Resolver(an).run()
    names = _names(res, an)
    spaces, pinned, pinned_sizes, active, groups = {}, {}, {}, {}, {}
    for sid, sp in enumerate(res.spaces):
        if not sp.classes:
            continue  # merged into an attention space
        reasons = list(dict.fromkeys(sp.reasons))
        if sp.multi and sp.group is None:
            reasons.append("its channels carry different transforms in one value")
        if sp.output:
            reasons = [r for r in reasons if r != "the model's output"]
            if not reasons:
                continue  # the model's input/output coordinates are never transformed (and not listed)
            reasons.append("it reaches the model's output")
        group = None
        if not reasons:
            group = sp.choose(an.groups)
            if isinstance(group, str):
                reasons = [group]
        name = names[sid]
        if reasons:
            pinned[name] = "; ".join(reasons)
            pinned_sizes[name] = len(sp.classes)
            continue
        active[sid] = name
        groups[name] = group
        spaces[name] = (len(sp.classes), group, sp.sites, sp.ties)
    slots = SlotBuilder(res, an, active, groups, buffers).build()
    tensor_slots = defaultdict(list)
    for s in slots:
        if s.kind != "site":
            tensor_slots[s.space].append(s)
    result = {}
    for name, (size, group, sites, ties) in spaces.items():
        mine = tensor_slots[name]
        producers = list(dict.fromkeys(s.tensor for s in mine if _role(s) == "out"))
        consumers = list(dict.fromkeys(s.tensor for s in mine if _role(s) == "in"))
        result[name] = Space(name, size, group, list(sites), producers, consumers, ties)
    return SymmetrySpec(result, pinned, pinned_sizes, [s.name for s in an.sites], tuple(slots), model_type,
                        an.lowest_cast)
