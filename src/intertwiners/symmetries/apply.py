"""Sampling group elements and acting with them on a model's parameters (paper Proposition 3.4).

Every :class:`~intertwiners.symmetries.resolve.ParamAction` of a space moves one parameter/buffer along
one axis: ``out`` t -> T t, ``in`` w -> w T^-1, ``scale`` (per-channel factors, batch-norm/layer-norm
gains, layer scale, depthwise filters) w -> P diag(t/s) w, ``perm`` (running variances) permuted, where
T = carried(A, chain) is the transform the value carries (see
:mod:`intertwiners.symmetries.constraints`). Monomial elements are applied as index gathers and
scalings, dense ones (general-linear spaces, attention blocks) as matrix products. Batch norm, with
input transform P·diag(s) (|s| = 1) and output transform P·diag(t)::

    gamma'[P] = t·gamma/s,  beta'[P] = t·beta,  running_mean'[P] = s·running_mean,  running_var'[P] = running_var
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import groups as G
from .blocks import BlockMatrix
from .constraints import DUAL, ONE, carried_scale
from .resolve import ParamAction, Segment
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
    """name -> ("mono" | "raw", perm, scale) or ("dense", A, cache)."""
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
                out[name] = ("dense", el.detach(), {"full": full})  # from random_symmetry, unchanged since
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
        cache = {}
        parts = space.group.decompose(A, 0.0) if hasattr(space.group, "decompose") else None
        if parts is not None:   # exactly block structured: act block by block
            cache["full"] = space.group.block_matrix(*parts)
        out[name] = ("dense", A, cache)
    return out


def _scale(el, chain: tuple, groups) -> torch.Tensor:
    kind, _, scale = el
    if kind == "raw":  # a non-member applied with check=False: as if phi(A) = A
        for entry in chain:
            scale = torch.ones_like(scale) if entry == ONE else (1.0 / scale if entry == DUAL else scale)
        return scale
    return carried_scale(chain, scale, groups)


def _gather(seg: Segment, el, groups, length: int):
    """(src, mult): T x has (T x)[q] = mult[q] x[src[q]] on this segment's positions."""
    _, perm, _ = el
    c = _scale(el, seg.chain, groups)
    pos = torch.from_numpy(seg.positions)             # (n, r), row i = space index seg.index[i]
    dst = pos[perm]                                   # index i moves to perm[i]
    src = torch.arange(length)
    mult = torch.ones(length, dtype=torch.float64)
    src[dst.reshape(-1)] = pos.reshape(-1)
    mult[dst.reshape(-1)] = c.repeat_interleave(pos.shape[1]) if pos.shape[1] > 1 else c
    return src, mult


def _dense(seg: Segment, el, inverse: bool = False) -> BlockMatrix:
    """The carried transform T on this segment's coordinates, or (T^-1)^T when ``inverse`` (for the
    input side of a weight), as a :class:`BlockMatrix`; cached on the element, since q/k/v rows, biases
    and output columns reuse the same blocks."""
    cache = el[2]
    key = (seg.index.tobytes(), seg.chain)
    if key not in cache:
        if seg.index.tobytes() not in cache:   # queries and keys (values and outputs) share the blocks
            idx = torch.from_numpy(seg.index)
            full = cache.get("full")
            T = full.restrict(idx) if full is not None else None
            cache[seg.index.tobytes()] = T if T is not None else BlockMatrix.of(el[1][idx][:, idx])
        T = cache[seg.index.tobytes()]
        for entry in seg.chain:  # activations on a dense space are linear: phi(A) = A
            if entry == DUAL:
                T = T.inverse().transpose()
            elif entry == ONE:
                raise ValueError("a dense element cannot pass a batch norm")
        cache[key] = T
    if inverse and key + (True,) not in cache:
        cache[key + (True,)] = cache[key].inverse().transpose()
    return cache[key + (True,)] if inverse else cache[key]


def _move(t: torch.Tensor, dim: int | None):
    if dim is None:
        return t.reshape(-1), (lambda u: u.reshape(t.shape))
    moved = t.movedim(dim, 0)
    return moved, (lambda u: u.movedim(0, dim))


def _rows(t: torch.Tensor, seg: Segment, el, groups, length: int, inverse: bool) -> torch.Tensor:
    """T t (or the columns of t^T times T^-1 when ``inverse``) along dim 0 of ``t`` (length ``length``)."""
    if el[0] == "dense":
        M = _dense(seg, el, inverse).to(t.device, t.dtype)
        t = t.clone()
        pos = torch.from_numpy(seg.positions).to(t.device)
        flat = t.reshape(length, -1)
        for r in range(pos.shape[1]):
            flat[pos[:, r]] = M.matmul(flat[pos[:, r]])
        return flat.reshape(t.shape)
    src, mult = _gather(seg, el, groups, length)
    if inverse:
        mult = 1.0 / mult
    shape = (-1,) + (1,) * (t.ndim - 1)
    return t.index_select(0, src.to(t.device)) * mult.to(t.device, t.dtype).view(shape)


def _act(t: torch.Tensor, a: ParamAction, el, groups) -> torch.Tensor:
    if a.role in ("scale", "perm") and el[0] == "dense":
        raise ValueError(f"space {a.space!r} passes through a per-channel operation on {a.param!r}: only "
                         "monomial elements (P·D) can be applied there")
    if a.role == "in" and a.groups > 1:
        g = a.groups
        w = t.reshape(g, t.shape[0] // g, *t.shape[1:])
        ci = t.shape[1]
        block = int(a.segment.positions.min()) // ci
        seg = Segment(a.segment.space, a.segment.index, a.segment.positions - block * ci, a.segment.chain)
        w = w.clone()
        moved = w[block].movedim(1, 0)
        w[block] = _rows(moved, seg, el, groups, ci, True).movedim(0, 1)
        return w.reshape(t.shape)
    if el[0] != "dense" and a.role in ("out", "in") and a.dim is not None:
        # monomial: one gather along the parameter's own axis (no transposed copy)
        src, mult = _gather(a.segment, el, groups, a.length)
        moved = t.index_select(a.dim, src.to(t.device))
        if bool((mult == 1).all()):  # a permutation: no second pass over the tensor
            return moved
        if a.role == "in":
            mult = 1.0 / mult
        shape = [1] * t.ndim
        shape[a.dim] = -1
        return moved * mult.to(t.device, t.dtype).view(shape)
    moved, back = _move(t, a.dim)
    if a.role == "out":
        return back(_rows(moved, a.segment, el, groups, a.length, False))
    if a.role == "in":
        return back(_rows(moved, a.segment, el, groups, a.length, True))
    # scale / perm: P diag(t/s)
    src, mult = _gather(a.segment, el, groups, a.length)
    if a.role == "perm":
        mult = torch.ones_like(mult)
    elif a.in_segment is not None:
        _, mult_in = _gather(a.in_segment, el, groups, a.length)
        mult = mult / mult_in
    shape = (-1,) + (1,) * (moved.ndim - 1)
    return back(moved.index_select(0, src.to(t.device)) * mult.to(t.device, t.dtype).view(shape))


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
    new: dict[str, torch.Tensor] = {}
    done = set()
    for a in spec.param_actions:
        el = els.get(a.space)
        if el is None:
            continue
        if a.param not in tensors:
            raise ValueError(f"the model has no parameter {a.param!r}: was the spec made for another model?")
        key = (id(tensors[a.param]), a.dim, a.space, tuple(a.segment.positions.reshape(-1)[:4].tolist()))
        if key in done:
            continue  # a tied parameter seen again (embedding and unembedding): moved once
        done.add(key)
        t = new.get(a.param)
        if t is None:
            t = tensors[a.param].detach()
        new[a.param] = _act(t, a, el, spec.groups)
    if inplace:
        for name, t in new.items():
            tensors[name].copy_(t)
        return model
    memo = {}
    for name, t in new.items():
        old = tensors[name]
        if id(old) in memo:
            continue
        memo[id(old)] = nn.Parameter(t.to(old.dtype), requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else t.to(old.dtype)
    return copy.deepcopy(model, memo)


def dense_symmetry(elements: dict) -> dict:
    """``{name: (n, n) tensor}`` from elements given as matrices or ``(perm, scale)`` pairs."""
    return {k: (G.monomial_matrix(*v) if isinstance(v, tuple | list) else torch.as_tensor(v))
            for k, v in elements.items()}
