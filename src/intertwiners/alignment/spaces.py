"""The spec's slots as alignment reads them: one :class:`SpaceSlots` per space, every slot covering it whole.

The spec (:mod:`intertwiners.symmetries.slots`) lists, for every space, each tensor axis it acts on with the
coordinates covered there, their positions and the power a scaling reaches them with. Alignment sums
cross-products over the coordinates of a space, so it wants one slot per (tensor, axis, reach) holding every
coordinate in order: :func:`space_slots` merges the spec's slots of a space that cover complementary
coordinates of the same tensor axis with the same reach (an axis split into segments) and puts the
coordinates in order (``coords == arange(n)``, ``positions[j]`` the places of coordinate j). Nothing is
re-derived: positions, axes and powers are the spec's.

Slots whose coordinates do not cover the space after merging (a space that reaches a tensor on part of its
coordinates only) and the columns of grouped convolutions are left out of the matching costs (they are
still moved, by :func:`~intertwiners.apply_symmetry`, with the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..symmetries.slots import Features, HeadBlocks, Slot


@dataclass
class SpaceSlots:
    """A space of the spec (``name``, ``size``, ``group``) and its slots (parameters/buffers or sites)."""

    name: str
    size: int
    group: object
    slots: list[Slot] = field(default_factory=list)

    @property
    def allows_positive_scaling(self) -> bool:
        return _allows(self.group, torch.full((self.size,), 2.0, dtype=torch.float64))

    @property
    def allows_signs(self) -> bool:
        return _allows(self.group, torch.full((self.size,), -1.0, dtype=torch.float64))


def _allows(group, scale: torch.Tensor) -> bool:
    if not group.is_monomial:
        return True
    return bool(group.allows_scale(scale))


def covers(slot: Slot, n: int) -> bool:
    """Does the slot hold every coordinate 0..n-1, in order?"""
    return len(slot.coords) == n and bool((slot.coords == np.arange(n)).all())


def _merge(parts: list[Slot], n: int) -> list[Slot]:
    """One slot for the parts (same tensor, axis and reach) when together they cover 0..n-1 once with the same
    number of repeats each; else the parts as they are."""
    if len(parts) == 1 and covers(parts[0], n):
        return parts
    coords = np.concatenate([p.coords for p in parts])
    reps = {p.positions.shape[1] for p in parts}
    if len(reps) != 1 or len(coords) != n or len(np.unique(coords)) != n:
        return parts
    order = np.argsort(coords, kind="stable")
    positions = np.concatenate([p.positions for p in parts])[order]
    return [replace(parts[0], coords=np.arange(n), positions=positions)]


def space_slots(spec, name: str, kind: str = "parameters") -> SpaceSlots:
    """The slots of space ``name``: ``kind`` ``"parameters"`` (parameters; buffers are moved with them, never
    matched) or ``"sites"`` (activation sites with one feature axis), merged per (tensor, axis, reach) (see
    the module docstring)."""
    space = spec.spaces[name]
    groups: dict[tuple, list[Slot]] = {}
    for s in spec.slots(name):
        if s.kind != ("site" if kind == "sites" else "parameter") or isinstance(s.reach, HeadBlocks):
            continue  # buffers (running statistics) follow their parameters; attention blocks: .attention
        if kind == "sites" and (s.axis is None or not isinstance(s.reach, Features)):
            continue  # features spread over several axes: read at the example's shape only
        groups.setdefault((s.tensor, s.axis, s.kind, s.reach), []).append(s)
    slots = [m for parts in groups.values() for m in _merge(parts, space.size)]
    # alignment sums over whole spaces: a slot on part of the coordinates (or inside a block of another axis:
    # one group of a grouped convolution, one slice of a packed projection) is moved by apply_symmetry but not
    # read here
    slots = [s for s in slots if covers(s, space.size) and s.block is None]
    return SpaceSlots(name, space.size, space.group, slots)


def along(t: torch.Tensor, slot: Slot) -> tuple[torch.Tensor, int]:
    """(tensor, axis) the slot's positions index: the flattened tensor on axis 0 when ``slot.axis`` is None."""
    return (t.reshape(-1), 0) if slot.axis is None else (t, slot.axis)
