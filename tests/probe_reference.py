"""Test-only reference: where each symmetry space acts, measured by applying elements (independent of the slots).

The library reads where a space acts from the spec's slots; this module measures the same facts the slow way,
through the public API only, so that tests can check the slots against it. It is not part of the package.

Where each symmetry space acts, read off through the public symmetry API only.

Alignment needs, for every space of ``symmetry_spec(model, x)``, the tensor axes it moves: which
parameter axes (for weight matching and :func:`~intertwiners.alignment.canonicalize`) and which channels
of its activation sites (for activation matching), and how a scaling reaches each of them. Rather than
reading the engine's internals, we *probe* it: on a float64 copy of the model with random, pairwise
distinct weights we apply a few group elements to one space at a time with
:func:`~intertwiners.apply_symmetry` and compare the tensors before and after:

* a cyclic shift ``j -> j+1`` moves exactly the slices the space occupies, one cycle per repeat
  (a flatten into a ``Linear`` repeats a channel over its spatial block);
* the transposition ``(0 1)`` tells where index 0 is, so the cycles become positions ``(n, r)``;
* the scaling ``diag(2)`` (where the group allows it) multiplies each slice by ``2**e``: the exponent
  ``e`` (1 for a producer's rows, -1 for a consumer's columns, 0 for a convolution before a batch norm,
  3 after x**3, ...);
* the scaling ``diag(-1)`` (where allowed) shows which slices change sign (``odd``).

A slice is recognised by permutation-invariant fingerprints (its sum and its sums of squares and cubes),
so a tensor moved along two axes at once is still read correctly. This works for any engine that
honours ``apply_symmetry``'s contract; it costs a few applications per space.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from intertwiners.alignment.align import few_threads
from intertwiners.features import SiteExtractor


@dataclass
class Slot:
    """Where one space sits on one tensor axis.

    ``key``: a parameter name (``"layer1.0.conv1.weight"``) or an activation site; ``axis``: the tensor axis;
    ``positions`` (n, r): index j of the space occupies ``positions[j]`` along ``axis``. Under the element
    P·diag(s) the slice of index j moves to ``positions[perm[j]]`` and is multiplied by
    ``sign(s_j)**odd * |s_j|**exponent`` (``exponent``/``odd`` are None where the group has no such scalings).
    """

    key: str
    axis: int
    positions: np.ndarray
    exponent: float | None = None
    odd: bool | None = None

    def factor(self, scale: torch.Tensor) -> torch.Tensor:
        """The multiplier of each index j's slice for the element scales ``scale`` (n,)."""
        out = torch.ones_like(scale)
        if self.exponent is not None:
            out = out * scale.abs() ** self.exponent
        if self.odd:
            out = out * torch.sign(scale)
        return out


@dataclass
class SpaceAction:
    """A space of the spec and the slots it acts on."""

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
    if group.kind in ("general_linear",):
        return True
    allows = getattr(group, "allows_scale", None)
    if allows is not None:
        return bool(allows(scale))
    return bool(group.contains(torch.diag(scale)))


# ----------------------------------------------------------------------------------------------------
# The probe model
# ----------------------------------------------------------------------------------------------------

def probe_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A float64 copy of ``model`` in eval mode whose parameters are random and pairwise distinct: uniform
    in [0.5, 1.5] / fan-in, all positive, so that hidden units fed by non-negative values never die."""
    probe = copy.deepcopy(model).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in probe.parameters():
            if not p.is_floating_point():
                continue
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_((0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64)) / fan_in)
    return probe


def calibrate_batch_norms(model: nn.Module, x) -> None:
    """Set every batch norm's running statistics to those of the batch ``x`` (one train-mode forward of the
    batch norms only), so that the probe's hidden units are centred and active on the probe input."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for m, mom in saved:
            m.momentum = mom
            m.eval()


def probe_input(example_input, rows: int = 64, seed: int = 0):
    """A probe batch: for floating inputs, ``rows`` standard normal samples of the example's shape
    (generic, so that every hidden unit is active somewhere); other inputs (token ids) are used as given."""
    x = torch.as_tensor(example_input) if not isinstance(example_input, torch.Tensor) else example_input
    if not x.is_floating_point():
        return x
    gen = torch.Generator().manual_seed(seed)
    rows = rows if x.ndim <= 2 else 4  # images: every pixel is a sample already
    return torch.randn((max(rows, x.shape[0]),) + tuple(x.shape[1:]), generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# Fingerprints and slice maps
# ----------------------------------------------------------------------------------------------------

def fingerprints(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(L, 3) permutation-invariant summaries of the L slices of ``t`` along ``axis`` (float64)."""
    s = torch.movedim(t.detach().to(torch.float64), axis, 0).reshape(t.shape[axis], -1)
    return torch.stack([s.sum(1), (s * s).sum(1), (s * s * s).sum(1)], 1)


def _close(a: torch.Tensor, b: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Rows of fingerprints that agree to rounding: relative 1e-8, absolute 1e-12 of each column's scale."""
    return ((a - b).abs() <= 1e-12 * floor + 1e-8 * torch.maximum(a.abs(), b.abs())).all(-1)


def moved_slices(t0: torch.Tensor, t1: torch.Tensor, axis: int, fp0: torch.Tensor | None = None) -> dict[int, int]:
    """{q: src} for the slices along ``axis`` that changed: slice q of ``t1`` is slice src of ``t0``.

    Raises ValueError when a changed slice matches no slice of ``t0`` or several (constant slices).
    """
    fp0 = fingerprints(t0, axis) if fp0 is None else fp0
    fp1 = fingerprints(t1, axis)
    floor = fp0.abs().amax(0).clamp_min(1e-300)
    changed = ~_close(fp0, fp1, floor)
    if not changed.any():
        return {}
    # candidates: the nearest slices of t0 by log sum of squares; confirmed on all three moments
    key0 = torch.log(fp0[:, 1].clamp_min(1e-300))
    key1 = torch.log(fp1[changed, 1].clamp_min(1e-300))
    order = torch.argsort(key0)
    sorted_key = key0[order]
    at = torch.searchsorted(sorted_key, key1).clamp(max=len(sorted_key) - 1)
    below = (at - 1).clamp(min=0)
    want = fp1[changed]
    ok_at = _close(fp0[order[at]], want, floor)
    ok_below = _close(fp0[order[below]], want, floor)
    if not (ok_at | ok_below).all():
        raise ValueError(f"slices along axis {axis} changed in a way that is not a permutation")
    src = torch.where(ok_at, order[at], order[below])
    twins = _close(fp0[order[1:]], fp0[order[:-1]], floor)
    if twins.any():
        raise ValueError(f"slices along axis {axis} are not distinguishable (constant or repeated slices)")
    return dict(zip(torch.nonzero(changed).flatten().tolist(), src.tolist()))


def slice_ratios(t0: torch.Tensor, t1: torch.Tensor, axis: int, positions: np.ndarray) -> torch.Tensor:
    """(n, r) least-squares ratios <t1_q, t0_q> / <t0_q, t0_q> of the slices at ``positions``."""
    a = torch.movedim(t0.detach().to(torch.float64), axis, 0).reshape(t0.shape[axis], -1)
    b = torch.movedim(t1.detach().to(torch.float64), axis, 0).reshape(t1.shape[axis], -1)
    idx = torch.as_tensor(positions.reshape(-1))
    num = (a[idx] * b[idx]).sum(1)
    den = (a[idx] * a[idx]).sum(1)
    if (den <= 0).any():
        raise ValueError(f"a probed slice along axis {axis} is zero; cannot read its scaling")
    return (num / den).reshape(positions.shape)


def label_positions(shift: dict[int, int], first: list[int], n: int) -> np.ndarray:
    """Positions (n, r) from the slices moved by the shift j -> j+1 (``shift``: q -> source) and the slices
    of index 0 (``first``, one per repeat)."""
    succ = {src: q for q, src in shift.items()}
    if len(shift) % n or len(first) * n != len(shift):
        raise ValueError(f"a shift of a space of size {n} moved {len(shift)} slices ({len(first)} of index 0)")
    pos = np.empty((n, len(first)), dtype=np.int64)
    pos[0] = sorted(first)
    for j in range(1, n):
        pos[j] = [succ[q] for q in pos[j - 1]]
    if len(np.unique(pos)) != pos.size:
        raise ValueError("the probed positions of a space are not a set of cycles")
    return pos


def first_by_swap(shift: dict[int, int], swap: set[int] | None) -> list[int]:
    """Index-0 slices from the transposition (0 1): those of its moved slices whose successor it also moved
    (n >= 3); for n = 2 (``swap`` None) the smaller slice of each 2-cycle (the labelling is then free)."""
    succ = {src: q for q, src in shift.items()}
    if swap is None:
        return [q for q in shift if q < succ[q]]
    return [q for q in swap if q in succ and succ[q] in swap]


def first_by_scale(moved: list[int], ratio: torch.Tensor) -> tuple[list[int], float] | None:
    """Index-0 slices and the exponent e from the ratios of the moved slices under diag(4, 2, 2, ...):
    index 0 shows 4**e, the others 2**e. None when e = 0 (the scaling does not reach these slices)."""
    log2 = torch.log2(ratio.abs().clamp_min(1e-300))
    small = log2.abs().argmin()
    e_two = log2[small]
    if e_two.abs() < 1e-9:
        return None
    is_first = (log2 - 2 * e_two).abs() < 1e-6
    if not (is_first | ((log2 - e_two).abs() < 1e-6)).all():
        raise ValueError("a scaling reaches a tensor with different powers per index")
    first = torch.as_tensor(moved)[is_first].tolist()
    return first, round(float(e_two), 6)


# ----------------------------------------------------------------------------------------------------
# Probing
# ----------------------------------------------------------------------------------------------------

class _Prober:
    """Applies elements to a probe model and reads tensors before and after.

    ``read(keys)`` returns {key: tensor} for the keys it can read (all of them when ``keys`` is None).
    ``params=True``: the keys are the model's own state, so only tensors modified in place (their version
    counter moved) need comparing.
    """

    def __init__(self, probe: nn.Module, spec, apply_symmetry: Callable, read: Callable, params: bool):
        self.probe = probe
        self.spec = spec
        self.apply = apply_symmetry
        self.read = read
        self.params = params
        self.inplace = "inplace" in inspect.signature(apply_symmetry).parameters
        self.state = probe.state_dict(keep_vars=True)
        self.state0 = {k: v.detach().clone() for k, v in self.state.items()}
        self.base = {k: v.detach().clone() for k, v in read(None).items()}
        self._fp: dict[tuple[str, int], torch.Tensor] = {}

    def base_fingerprints(self, key: str, axis: int) -> torch.Tensor:
        if (key, axis) not in self._fp:
            self._fp[(key, axis)] = fingerprints(self.base[key], axis)
        return self._fp[(key, axis)]

    def run(self, elements: dict, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
        """{key: tensor} for the keys (among ``keys``) that changed under ``elements`` ({space: (perm, scale)})."""
        if not elements:
            return {}
        versions = {k: v._version for k, v in self.state.items()}
        with torch.no_grad():
            if self.inplace:
                self.apply(self.probe, elements, self.spec, inplace=True)
                touched = [k for k, v in self.state.items() if v._version != versions[k]]
            else:  # pragma: no cover - engines without in-place application
                self.probe.load_state_dict(self.apply(self.probe, elements, self.spec).state_dict())
                touched = list(self.state)
            if self.params:
                keys = set(touched) if keys is None else keys & set(touched)
            now = self.read(keys)
            changed = {k: v.detach().clone() for k, v in now.items() if not torch.equal(v, self.base[k])}
            for k in touched:
                self.state[k].data.copy_(self.state0[k])
        return changed


def _probe_group(prober: _Prober, spaces: dict, owner: Callable[[str, list[str]], str | None],
                 skip_axes: tuple[int, ...] = (), keys: set[str] | None = None) -> dict[str, SpaceAction]:
    """Probe the spaces ``spaces`` ({name: space}) together: no tensor may be moved by two of them
    (``owner(key, names)`` says which one moves a changed tensor, None for none).

    Runs: a cyclic shift; the scaling diag(4, 2, 2, ...) where allowed (it labels index 0 and gives the
    exponents); the transposition (0 1) only where a scaling cannot label (permutation groups, or slices
    a scaling does not reach); the sign flip diag(-1) where allowed.
    """
    names = list(spaces)
    acts = {name: SpaceAction(name, sp.size, sp.group) for name, sp in spaces.items()}
    sizes = {name: sp.size for name, sp in spaces.items()}

    def owned(changed: dict) -> dict[str, dict]:
        out: dict[str, dict] = {name: {} for name in names}
        for key, t in changed.items():
            who = owner(key, names)
            if who is not None:
                out[who][key] = t
        return out

    ones = {nm: torch.ones(n, dtype=torch.float64) for nm, n in sizes.items()}
    ident = {nm: torch.arange(n) for nm, n in sizes.items()}
    shifted = owned(prober.run({nm: ((ident[nm] + 1) % n, ones[nm]) for nm, n in sizes.items() if n >= 2}, keys))
    cycles: dict[str, dict[tuple[str, int], dict[int, int]]] = {nm: {} for nm in names}
    for name in names:
        for key, t1 in shifted[name].items():
            for axis in range(t1.ndim):
                if axis not in skip_axes and t1.shape[axis] >= max(sizes[name], 2):  # n indices need n slices
                    moves = moved_slices(prober.base[key], t1, axis, prober.base_fingerprints(key, axis))
                    if moves:
                        cycles[name][(key, axis)] = moves
    slots: dict[str, dict[tuple[str, int], Slot]] = {nm: {} for nm in names}
    need_swap: dict[str, list[tuple[str, int]]] = {nm: [] for nm in names}
    positive = [nm for nm in names if acts[nm].allows_positive_scaling]
    d = {nm: torch.full((sizes[nm],), 2.0, dtype=torch.float64) for nm in positive}
    for nm in positive:
        d[nm][0] = 4.0 if sizes[nm] >= 2 else 2.0
    scaled = owned(prober.run({nm: (ident[nm], d[nm]) for nm in positive}, keys))
    for name in names:
        for (key, axis), moves in cycles[name].items():
            found = None
            if name in d and key in scaled[name]:
                moved = sorted(moves)
                ratio = slice_ratios(prober.base[key], scaled[name][key], axis, np.array(moved)[:, None])[:, 0]
                found = first_by_scale(moved, ratio)
            if found is None:
                need_swap[name].append((key, axis))
                continue
            first, e = found
            slots[name][(key, axis)] = Slot(key, axis, label_positions(moves, first, sizes[name]), exponent=e)
    swap_names = [nm for nm in names if need_swap[nm]]
    swapped = owned(prober.run({nm: (torch.tensor([1, 0] + list(range(2, sizes[nm]))), ones[nm])
                                for nm in swap_names if sizes[nm] >= 3}, keys))
    for name in swap_names:
        n = sizes[name]
        for key, axis in need_swap[name]:
            moves = cycles[name][(key, axis)]
            sw = set(moved_slices(prober.base[key], swapped[name][key], axis, prober.base_fingerprints(key, axis))) \
                if n >= 3 else None
            slot = Slot(key, axis, label_positions(moves, first_by_swap(moves, sw), n))
            slot.exponent = 0.0 if name in d else None
            slots[name][(key, axis)] = slot
    for name in positive:
        if sizes[name] == 1:
            _find_single(prober, scaled[name], slots[name], skip_axes)
            for (key, axis), slot in slots[name].items():
                ratio = slice_ratios(prober.base[key], scaled[name][key], axis, slot.positions)
                slot.exponent = round(float(torch.log2(ratio.abs()).mean()), 6)
    signed = [nm for nm in names if acts[nm].allows_signs]
    flipped = owned(prober.run({nm: (ident[nm], -ones[nm]) for nm in signed}, keys))
    for name in signed:
        if sizes[name] == 1:
            _find_single(prober, flipped[name], slots[name], skip_axes)
        for (key, axis), slot in slots[name].items():
            if key not in flipped[name]:
                slot.odd = False
                continue
            ratio = slice_ratios(prober.base[key], flipped[name][key], axis, slot.positions)
            neg = ratio < 0
            if neg.any() and not neg.all():
                raise ValueError(f"space {name!r}: a sign flip reaches {key!r} inconsistently")
            slot.odd = bool(neg.all())
    for name, act in acts.items():
        act.slots = list(slots[name].values())
    return acts


def _color(names: list[str], keys: dict[str, set[str]]) -> list[list[str]]:
    """Greedy colouring: groups of spaces that share no key."""
    groups: list[tuple[list[str], set[str]]] = []
    for name in names:
        for members, used in groups:
            if not (keys[name] & used):
                members.append(name)
                used |= keys[name]
                break
        else:
            groups.append(([name], set(keys[name])))
    return [members for members, _ in groups]


def _find_single(prober: _Prober, changed: dict, slots: dict, skip_axes: tuple[int, ...]) -> None:
    """Slots of a size-1 space: the slices that a scaling changed (on an axis where not every slice did,
    else on an axis of length 1)."""
    for key, t1 in changed.items():
        t0 = prober.base[key]
        found = []
        for axis in range(t0.ndim):
            if axis in skip_axes:
                continue
            fp0, fp1 = prober.base_fingerprints(key, axis), fingerprints(t1, axis)
            hit = torch.nonzero(~_close(fp0, fp1, fp0.abs().amax(0).clamp_min(1e-300))).flatten()
            if len(hit) and (len(hit) < t0.shape[axis] or t0.shape[axis] == 1):
                found.append((len(hit) == t0.shape[axis], axis, hit))
        if found:
            _, axis, hit = min(found, key=lambda f: (f[0], f[1]))
            slots.setdefault((key, axis), Slot(key, axis, hit.numpy().reshape(1, -1).astype(np.int64)))


def probe_parameters(model: nn.Module, spec, names: list[str] | None = None, seed: int = 0
                     ) -> dict[str, SpaceAction]:
    """{space: SpaceAction} whose slots are the parameter axes each space acts on (one space at a time)."""
    from intertwiners.symmetries import apply_symmetry

    probe = probe_copy(model, seed)

    params = dict(probe.named_parameters())

    def read(keys):
        return params if keys is None else {k: v for k, v in params.items() if k in keys}  # model order

    out = {}
    with few_threads():
        prober = _Prober(probe, spec, apply_symmetry, read, params=True)
        for name in names or list(spec.spaces):
            out.update(_probe_group(prober, {name: spec.spaces[name]}, lambda key, names: names[0]))
    return out


def probe_sites(model: nn.Module, spec, example_input, names: list[str] | None = None, seed: int = 0
                ) -> dict[str, SpaceAction]:
    """{space: SpaceAction} whose slots are the activation sites (feature axes) each space acts on.

    Spaces that share no site are probed together (features at a site change only under the spaces that
    hold it). Raises ValueError for a space without activation sites (nothing to read features from).
    """
    from intertwiners.symmetries import apply_symmetry

    names = list(names or spec.spaces)
    for name in names:
        if not spec.spaces[name].sites:
            raise ValueError(f"space {name!r} has no activation sites to read features from; align it with "
                             "method='weights', or leave it out with spaces=[...]")
    site_sets = {name: set(spec.spaces[name].sites) for name in names}
    sites = list(dict.fromkeys(s for name in names for s in spec.spaces[name].sites))
    probe = probe_copy(model, seed)
    x = probe_input(example_input, seed=seed)
    calibrate_batch_norms(probe, x)
    extractor = SiteExtractor(probe, sites, example=x[:2])

    def read(keys):
        return dict(zip(extractor.sites, extractor(x)))

    def owner(key, group):
        return next((nm for nm in group if key in site_sets[nm]), None)

    out = {}
    with few_threads():
        prober = _Prober(probe, spec, apply_symmetry, read, params=False)
        for group in _color(names, site_sets):
            out.update(_probe_group(prober, {nm: spec.spaces[nm] for nm in group}, owner, skip_axes=(0,),
                                    keys=set().union(*(site_sets[nm] for nm in group))))
    for name in names:
        act = out[name]
        act.slots = [s for s in act.slots if s.key in site_sets[name]]
        if not act.slots and (act.size > 1 or act.allows_positive_scaling or act.allows_signs):
            raise ValueError(f"space {name!r}: none of its sites {sorted(site_sets[name])} shows its channels "
                             "on the probe input (are they constant?)")
    return out
