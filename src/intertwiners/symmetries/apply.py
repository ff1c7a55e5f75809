"""Sampling group elements and acting with them on a model's parameters (paper Proposition 3.4).

:func:`apply_symmetry` reads the spec's slots and nothing else (:mod:`~intertwiners.symmetries.slots`):
each moves one parameter/buffer along one axis as its reach says -- rows t -> T t, columns w -> w T^-1,
gains w -> P diag(t/s) w, running variances permuted, attention blocks -- with T the transform the slot
carries (a :class:`~intertwiners.symmetries.chains.Power` of the element's scales, computed by the engine).
Monomial elements are applied as one index gather (and one scaling unless the element is a permutation)
per tensor axis, dense ones (general-linear spaces, attention blocks) as block products
(:class:`~intertwiners.symmetries.blocks.BlockMatrix`). Batch norm, with input transform P·diag(s)
(|s| = 1) and output transform P·diag(t)::

    gamma'[P] = t·gamma/s,  beta'[P] = t·beta,  running_mean'[P] = s·running_mean,  running_var'[P] = running_var
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import groups as G
from .blocks import BlockMatrix
from .module_state import clear_caches, copy_model, module_state_restored
from .slots import Columns, Gain, HeadBlocks, Permuted, Rows, Slot
from .spec import SymmetrySpec


def random_symmetry(spec: SymmetrySpec, generator: torch.Generator | None = None, *,
                    monomial: bool = False, dtype: torch.dtype = torch.float64) -> dict:
    """A random element of every space's group: ``{space name: (n, n) tensor}`` (``monomial=True``:
    ``(perm, scale)`` pairs for monomial spaces)."""
    if not isinstance(spec, SymmetrySpec):
        raise ValueError(f"random_symmetry needs a SymmetrySpec (from symmetry_spec), got {type(spec).__name__}")
    out = {}
    for name, space in spec.spaces.items():
        if space.group.is_monomial:
            perm, scale = space.group.sample_monomial(space.size, generator, dtype)
            if monomial:
                out[name] = (perm, scale)
            else:
                A = G.monomial_matrix(perm, scale)
                # remembered so that apply_symmetry need not read the (n, n) matrix back; _version tells
                # whether the matrix was modified in place since
                A._intertwiners_monomial = (perm, scale, A._version)
                out[name] = A
        else:
            out[name] = space.group.sample(space.size, generator, dtype)
    return out


def _normalise(spec: SymmetrySpec, elements: dict, check: bool, atol: float) -> dict:
    """name -> ("mono" | "raw", perm, scale) or ("dense", _Dense)."""
    if not isinstance(elements, dict):
        raise ValueError("elements must be a dict {space name: matrix or (perm, scale)}")
    out = {}
    for name, el in elements.items():
        if name not in spec.spaces:
            if name in spec.pinned:
                raise ValueError(f"space {name!r} is pinned ({spec.pinned[name]}); it has no symmetries")
            raise ValueError(f"unknown space {name!r}; spaces: {list(spec.spaces)}")
        space = spec.spaces[name]
        n = space.size
        if isinstance(el, tuple | list):
            if len(el) != 2:
                raise ValueError(f"element for {name!r}: expected (perm, scale)")
            perm, scale = G._check_monomial_args(*el)
            if perm.numel() != n:
                raise ValueError(f"element for {name!r} has size {perm.numel()}, the space has {n}")
            if not space.group.is_monomial:
                el = G.monomial_matrix(perm, scale.to(torch.float64))
            else:
                scale = scale.to(torch.float64).cpu()
                if not torch.isfinite(scale).all():
                    raise ValueError(f"element for {name!r} has non-finite entries")
                member = space.group.allows_scale(scale, atol)
                if check and not member:
                    raise ValueError(f"element for {name!r} is not in G ({space.group.description})")
                out[name] = ("mono" if member else "raw", perm.cpu(), scale)
                continue
        blocks = getattr(el, "_intertwiners_blocks", None)
        if blocks is not None and blocks[3] == el._version and tuple(el.shape) == (n, n) \
                and hasattr(space.group, "block_matrix") and not space.group.is_monomial:
            full = space.group.block_matrix(*blocks[:3])
            if all(torch.equal(el[r[:, :, None], c[:, None, :]], b)
                   for r, c, b in zip(full.rows, full.cols, full.blocks)):
                out[name] = ("dense", _Dense(el.detach(), full))  # from random_symmetry, unchanged since
                continue
        known = getattr(el, "_intertwiners_monomial", None)
        if known is not None and known[2] == el._version and tuple(el.shape) == (n, n) \
                and torch.equal(el[known[0], torch.arange(n)], known[1]):
            el = known[:2]  # a matrix from random_symmetry, unchanged since: its (perm, scale)
        A = torch.as_tensor(el).detach().to(torch.float64).cpu() if not isinstance(el, tuple) else None
        if A is not None and A.shape != (n, n):
            raise ValueError(f"element for {name!r} has shape {tuple(A.shape)}, the space has size {n}")
        if A is not None and not space.group.is_monomial and not torch.isfinite(A).all():
            raise ValueError(f"element for {name!r} has non-finite entries")
        if space.group.is_monomial:
            try:
                perm, scale = G.as_monomial(A, atol) if A is not None else (el[0], el[1].to(torch.float64))
            except ValueError as err:
                if not torch.isfinite(A).all():
                    raise ValueError(f"element for {name!r} has non-finite entries") from err
                if check:
                    raise ValueError(f"element for {name!r} is not in G ({space.group.kind}: "
                                     f"{space.group.description}): {err}; pass check=False to apply it anyway "
                                     "(the output will then change)") from err
            else:
                member = space.group.allows_scale(scale, atol)
                if check and not member:
                    raise ValueError(f"element for {name!r} is not in G ({space.group.kind}: "
                                     f"{space.group.description}); pass check=False to apply it anyway")
                out[name] = ("mono" if member else "raw", perm, scale)
                continue
        elif check and not space.group.contains(A, atol):
            raise ValueError(f"element for {name!r} is not in G ({space.group.kind}: {space.group.description})"
                             "; pass check=False to apply it anyway (the output will then change)")
        parts = space.group.decompose(A, 0.0) if hasattr(space.group, "decompose") else None
        # exactly block structured: act block by block
        out[name] = ("dense", _Dense(A, space.group.block_matrix(*parts) if parts is not None else None))
    return out


class _Dense:
    """A dense element A with a cache of its blocks restricted to slot coordinates (q/k/v rows, biases and
    output columns reuse the same blocks)."""

    def __init__(self, A: torch.Tensor, full: BlockMatrix | None = None):
        self.A, self.full, self.cache = A, full, {}

    def blocks(self, coords: np.ndarray, dual: bool, inverse: bool) -> BlockMatrix:
        """T = A (or A^-T when ``dual``) restricted to ``coords``; (T^-1)^T when ``inverse`` (the input side of
        a weight)."""
        key = (coords.tobytes(), dual, inverse)
        if key not in self.cache:
            if (coords.tobytes(), dual, False) not in self.cache:
                base_key = (coords.tobytes(), False, False)
                if base_key not in self.cache:
                    idx = torch.from_numpy(coords)
                    T = self.full.restrict(idx) if self.full is not None else None
                    self.cache[base_key] = T if T is not None else BlockMatrix.of(self.A[idx][:, idx])
                if dual:
                    self.cache[(coords.tobytes(), True, False)] = self.cache[base_key].inverse().transpose()
            T = self.cache[(coords.tobytes(), dual, False)]
            if inverse:
                self.cache[key] = T.inverse().transpose()
        return self.cache[key]


def _multipliers(reach, kind: str, scale: torch.Tensor) -> torch.Tensor:
    """The (n,) factor on each coordinate's slice for a monomial element with scales ``scale``; ``kind``
    "raw" (an element outside the group, check=False) acts as if every activation were linear."""
    def c(carried):
        return (carried.power if kind == "mono" else carried.linear)(scale)
    if isinstance(reach, Rows):
        return c(reach.carried)
    if isinstance(reach, Columns):
        return 1.0 / c(reach.carried)
    if isinstance(reach, Gain):
        return c(reach.out) / c(reach.inp)
    return torch.ones_like(scale)  # Permuted


def _gather(slot: Slot, perm: torch.Tensor, mult: torch.Tensor, length: int):
    """(src, m): the permuted tensor has slice q = m[q] * slice src[q] along the slot's axis (coordinate
    coords[i] moves to the positions of coordinate perm[coords[i]])."""
    pos = torch.from_numpy(slot.positions)                        # (k, r), row i = coordinate coords[i]
    coords = torch.from_numpy(slot.coords)
    row_of = torch.full((len(perm),), -1, dtype=torch.long)
    row_of[coords] = torch.arange(len(coords))
    target = row_of[perm[coords]]
    if bool((target < 0).any()):
        raise ValueError(f"the element of {slot.space!r} moves coordinates of {slot.tensor!r} outside the slot")
    dst = pos[target]
    src = torch.arange(length)
    m = torch.ones(length, dtype=torch.float64)
    src[dst.reshape(-1)] = pos.reshape(-1)
    m[dst.reshape(-1)] = mult[coords].repeat_interleave(pos.shape[1])
    return src, m


def _monomial(t: torch.Tensor, slot: Slot, axis: int, length: int, el) -> torch.Tensor:
    kind, perm, scale = el
    src, m = _gather(slot, perm, _multipliers(slot.reach, kind, scale), length)
    moved = t.index_select(axis, src.to(t.device))
    if bool((m == 1).all()):  # a permutation: no second pass over the tensor
        return moved
    shape = [1] * t.ndim
    shape[axis] = -1
    return moved * m.to(t.device, t.dtype).view(shape)


def _dense_transform(slot: Slot, dense: _Dense) -> BlockMatrix:
    reach = slot.reach
    if isinstance(reach, HeadBlocks):
        return dense.blocks(slot.coords, reach.part == "k", reach.part in ("o", "h-"))
    exponent = reach.carried.linear.exponent
    if exponent == 0:
        raise ValueError("a dense element cannot pass a batch norm")
    return dense.blocks(slot.coords, exponent < 0, isinstance(reach, Columns))


def _dense(t: torch.Tensor, slot: Slot, axis: int, length: int, dense: _Dense) -> torch.Tensor:
    M = _dense_transform(slot, dense).to(t.device, t.dtype)
    flat = t.movedim(axis, 0).reshape(length, -1).clone()
    pos = torch.from_numpy(slot.positions).to(t.device)
    for r in range(pos.shape[1]):
        flat[pos[:, r]] = M.matmul(flat[pos[:, r]])
    return flat.reshape(t.movedim(axis, 0).shape).movedim(0, axis)


def _monomial_part(slot: Slot, dense: _Dense) -> tuple:
    """A dense element as a monomial one on the coordinates of a gain or permuted slot (an attention element on
    queries/keys with one coordinate per head: a head permutation times a scalar per head); the identity on the
    other coordinates. ValueError when it is not monomial there."""
    coords = torch.from_numpy(slot.coords)
    try:
        perm, scale = G.as_monomial(dense.A[coords][:, coords], 0.0)
    except ValueError as err:
        raise ValueError(f"space {slot.space!r} passes through a per-channel operation on {slot.tensor!r}: only "
                         "monomial elements (P·D) can be applied there") from err
    n = dense.A.shape[0]
    full_perm, full_scale = torch.arange(n), torch.ones(n, dtype=torch.float64)
    full_perm[coords], full_scale[coords] = coords[perm], scale
    return "mono", full_perm, full_scale


def _act(t: torch.Tensor, slot: Slot, el) -> torch.Tensor:
    """``t`` moved by the element ``el`` of its space along the slot."""
    if el[0] == "dense" and isinstance(slot.reach, Gain | Permuted):
        el = _monomial_part(slot, el[1])

    def along(u, axis, length):
        return _dense(u, slot, axis, length, el[1]) if el[0] == "dense" else _monomial(u, slot, axis, length, el)

    if slot.block is not None:   # only the part start:stop of another axis moves
        axis, start, stop = slot.block
        t = t.clone()
        part = t.narrow(axis, start, stop - start)
        part.copy_(along(part, slot.axis, slot.length))
        return t
    if slot.axis is None:
        return along(t.reshape(-1), 0, slot.length).reshape(t.shape)
    return along(t, slot.axis, slot.length)


SLICE = 1 << 22  # entries: apply_symmetry(inplace=True) moves larger tensors in slices of about this many


def _slicing_axis(t: torch.Tensor, slots: list[Slot], els: dict) -> int | None:
    """The longest axis of ``t`` that none of its slots acts on, when ``t`` has more than ``SLICE`` entries and
    every slot's element is monomial along an axis of its own (an entry moves and is multiplied, nothing is
    summed): then moving ``t`` in slices along that axis gives the whole tensor's result bit for bit. None
    otherwise (the tensor is moved whole)."""
    if t.numel() <= SLICE or any(els[s.space][0] == "dense" or s.axis is None or s.block is not None
                                 for s in slots):
        return None
    free = [d for d in range(t.ndim) if all(s.axis != d for s in slots)]
    return max(free, key=lambda d: t.shape[d]) if free else None


@torch.no_grad()
def apply_symmetry(model: nn.Module, elements: dict, spec: SymmetrySpec, *, check: bool = True,
                   atol: float = 1e-6, inplace: bool = False) -> nn.Module:
    """A transformed copy of ``model`` computing the same function (Proposition 3.4); ``model`` is untouched.

    ``elements``: ``{space name: (n, n) matrix or (perm, scale)}`` (spaces left out get the identity), e.g.
    from :func:`random_symmetry`. Elements are checked against their groups (ValueError otherwise);
    ``check=False`` applies any invertible matrix, acting with A on both sides of every activation (useful
    to show non-invariance). ``inplace=True`` transforms ``model`` itself. Tied parameters (an embedding
    shared with the unembedding) are transformed once.
    """
    if not isinstance(spec, SymmetrySpec):
        raise ValueError(f"apply_symmetry needs a SymmetrySpec (from symmetry_spec), got {type(spec).__name__}")
    els = _normalise(spec, elements, check, atol)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    by_tensor: dict[str, list[Slot]] = {}  # each tensor's slots in the spec's order (the order they act in)
    for slot in spec.all_slots:
        if els.get(slot.space) is None or slot.kind == "site":
            continue
        if slot.tensor not in tensors:
            raise ValueError(f"the model has no parameter {slot.tensor!r}: was the spec made for another model?")
        by_tensor.setdefault(slot.tensor, []).append(slot)

    def moved(name: str, t: torch.Tensor | None = None) -> torch.Tensor:
        t = tensors[name].detach() if t is None else t
        for slot in by_tensor[name]:
            t = _act(t, slot, els[slot.space])
        return t

    if inplace:  # one tensor at a time (a large one in slices): at most one moved slice exists besides the model
        for name in by_tensor:
            whole = tensors[name].detach()
            axis = _slicing_axis(whole, by_tensor[name], els)
            if axis is None:
                whole.copy_(moved(name))
                continue
            step = max(1, SLICE * whole.shape[axis] // whole.numel())
            for i in range(0, whole.shape[axis], step):
                part = whole.narrow(axis, i, min(step, whole.shape[axis] - i))
                part.copy_(moved(name, part))
        clear_caches(model)    # tensors a forward cached from the old parameters
        return model
    new = {name: moved(name) for name in by_tensor}
    memo = {}
    for name, t in new.items():
        old = tensors[name]
        if id(old) in memo:
            continue
        memo[id(old)] = nn.Parameter(t.to(old.dtype), requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else t.to(old.dtype)
    with module_state_restored(model):   # the copy starts without caches of the old parameters
        clear_caches(model)
        return copy_model(model, memo)


def dense_symmetry(elements: dict) -> dict:
    """``{name: (n, n) tensor}`` from elements given as matrices or ``(perm, scale)`` pairs."""
    return {k: (G.monomial_matrix(*v) if isinstance(v, tuple | list) else torch.as_tensor(v))
            for k, v in elements.items()}
