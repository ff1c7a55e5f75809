"""Sampling group elements and acting with them on a model's weights (paper Proposition 3.4).

For a space with element A = P·D, every module that *produces* the space has its output rows
transformed (W -> T W, b -> T b, where T = P·diag(c(D)) is the transform the value carries, see
:mod:`intertwiners.symmetries.spec`), every module that *consumes* it has its input columns transformed
(W -> W T^-1), and batch norms in between have their affine parameters and running statistics moved
along. Monomial elements are applied as index permutations and scalings; only ``general_linear`` /
``unit_row_sum`` spaces use dense matrix products.

Batch norm, with input transform P·diag(s) (|s| = 1) and output transform P·diag(t)::

    gamma'[P] = t * gamma / s,   beta'[P] = t * beta,   running_mean'[P] = s * running_mean,
    running_var'[P] = running_var

so that BN'(P s x) = P t BN(x) with batch statistics (train mode) and running statistics (eval mode);
the running statistics it accumulates in train mode are the transformed ones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import groups as G
from .spec import ONE, ModuleAction, SymmetrySpec, ValueLayout, eval_chain


def random_symmetry(spec: SymmetrySpec, generator: torch.Generator | None = None, *,
                    monomial: bool = False, dtype: torch.dtype = torch.float64) -> dict:
    """A random element of every space's group: ``{space name: (n, n) tensor}``.

    Monomial groups: a uniform permutation times log-normal scalings (signs uniform where allowed);
    GL / unit-row-sum groups: a well-conditioned dense matrix (see :meth:`IntertwinerGroup.sample`).
    ``monomial=True`` returns ``(perm, scale)`` pairs for monomial spaces instead of dense matrices
    (faster for wide layers; :func:`apply_symmetry` accepts both).
    """
    if not isinstance(spec, SymmetrySpec):
        raise ValueError(f"random_symmetry needs a SymmetrySpec (from symmetry_spec), got {type(spec).__name__}")
    out = {}
    for name, space in spec.spaces.items():
        if space.group.is_monomial:
            perm, scale = space.group.sample_monomial(space.size, generator, dtype)
            out[name] = (perm, scale) if monomial else G.monomial_matrix(perm, scale)
        else:
            out[name] = space.group.sample(space.size, generator, dtype)
    return out


def _normalise(spec: SymmetrySpec, elements: dict, check: bool, atol: float) -> dict:
    """name -> ("mono", perm, scale) or ("dense", A, A^-1)."""
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
            scale = scale.to(torch.float64).cpu()
            member = space.group.allows_scale(scale, atol)
            if check and not member:
                raise ValueError(f"element for {name!r} is not in its group ({space.group.description})")
            out[name] = ("mono" if member else "raw", perm.cpu(), scale)
            continue
        A = torch.as_tensor(el).detach().to(torch.float64).cpu()
        if A.shape != (n, n):
            raise ValueError(f"element for {name!r} has shape {tuple(A.shape)}, the space has size {n}")
        if not torch.isfinite(A).all():
            raise ValueError(f"element for {name!r} has non-finite entries")
        if space.group.is_monomial:
            try:
                perm, scale = G.as_monomial(A, atol)
            except ValueError as err:
                if check:
                    raise ValueError(f"element for {name!r} is not in G ({space.group.kind}: "
                                     f"{space.group.description}): {err}; pass check=False to apply it anyway "
                                     "(the output will then change)") from err
                # check=False with a non-monomial matrix: act with A everywhere (pretend phi(A) = A)
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
        out[name] = ("dense", A, torch.linalg.inv(A))
    return out


def _scales(el: tuple, chain: tuple, groups) -> torch.Tensor:
    """c(scale) for a group element; for a non-member applied with check=False ("raw"), the scale itself
    wherever the value carries a scaled transform (as if phi(A) = A)."""
    kind, _, scale = el
    if kind == "raw":
        return torch.ones_like(scale) if ONE in chain else scale
    return eval_chain(chain, scale, groups)


def _monomial_map(layout: ValueLayout, els: dict, groups) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(src, mult) in gather form: the value x' = T x has x'[q] = mult[q] * x[src[q]]; None for T = I.

    (From x'[dst[p]] = c[p] * x[p]: src = dst^-1 and mult = c[src].)
    """
    src = mult = None
    for seg in layout.segments:
        el = els.get(seg.space)
        if el is None or el[0] not in ("mono", "raw"):
            continue
        if src is None:
            src = torch.arange(layout.length)
            mult = torch.ones(layout.length, dtype=torch.float64)
        pos = torch.from_numpy(seg.positions)
        perm = el[1]
        src[pos[perm]] = pos
        mult[pos[perm]] = _scales(el, seg.chain, groups)
    return None if src is None else (src, mult)


def _dense_blocks(layout: ValueLayout, els: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for seg in layout.segments:
        el = els.get(seg.space)
        if el is not None and el[0] == "dense":
            out.append((torch.from_numpy(seg.positions), el[1], el[2]))
    return out


def _transform_rows(t: torch.Tensor, layout: ValueLayout, els: dict, groups) -> torch.Tensor:
    """T @ t along dim 0 (t: (C, ...)); returns a new tensor or ``t`` itself when T = I."""
    mono = _monomial_map(layout, els, groups)
    if mono is not None:
        src, mult = mono
        shape = (-1,) + (1,) * (t.ndim - 1)
        t = t.index_select(0, src.to(t.device)).mul_(mult.to(t.device, t.dtype).view(shape))
    for pos, A, _ in _dense_blocks(layout, els):
        pos = pos.to(t.device)
        block = t[pos].reshape(len(pos), -1)
        t = t.clone()
        t[pos] = (A.to(t.device, t.dtype) @ block).reshape(t[pos].shape)
    return t


def _transform_columns(w: torch.Tensor, layout: ValueLayout, els: dict, groups) -> torch.Tensor:
    """w @ T^-1 along dim 1 (w: (out, C*repeat) for a Linear after a flatten, or (out, C, k...))."""
    out_features = w.shape[0]
    repeat = w.shape[1] // layout.length
    if repeat * layout.length != w.shape[1]:
        raise ValueError(f"weight with {w.shape[1]} inputs does not match a value of {layout.length} channels")
    v = w.reshape(out_features, layout.length, -1)
    mono = _monomial_map(layout, els, groups)
    if mono is not None:
        # (W T^-1)[:, q] = W[:, src[q]] / mult[q]
        src, mult = mono
        v = v.index_select(1, src.to(w.device)).div_(mult.to(w.device, w.dtype).view(1, -1, 1))
    for pos, _, Ainv in _dense_blocks(layout, els):
        pos = pos.to(w.device)
        v = v.clone()
        v[:, pos] = torch.einsum("ojk,ji->oik", v[:, pos], Ainv.to(w.device, w.dtype))
    return v.reshape(w.shape)


def _bn_maps(action: ModuleAction, els: dict, groups, length: int):
    """(src, s, t) in gather form for a batch norm with input transform P·diag(s), output P·diag(t)."""
    src = torch.arange(length)
    s = torch.ones(length, dtype=torch.float64)
    t = torch.ones(length, dtype=torch.float64)
    touched = False
    for seg_in, seg_out in zip(action.inputs.segments, action.outputs.segments):
        el = els.get(seg_in.space)
        if el is None:
            continue
        if el[0] == "dense":
            raise ValueError(f"space {seg_in.space!r} passes through batch norm {action.module!r}: only "
                             "monomial elements (P·D) can be applied there")
        touched = True
        pos = torch.from_numpy(seg_in.positions)
        dst = pos[el[1]]
        src[dst] = pos
        s[dst] = _scales(el, seg_in.chain, groups)
        t[dst] = _scales(el, seg_out.chain, groups)
    return (src, s, t) if touched else None


def _batch_norm_tensors(bn: nn.Module, action: ModuleAction, els: dict, groups) -> dict[str, torch.Tensor]:
    maps = _bn_maps(action, els, groups, action.inputs.length)
    if maps is None:
        return {}
    src, s, t = maps

    def move(tensor, factor=None):
        out = tensor.detach().index_select(0, src.to(tensor.device))
        return out if factor is None else out.mul_(factor.to(tensor.device, tensor.dtype))

    out = {}
    if bn.affine:
        out["weight"] = move(bn.weight, t / s)
        out["bias"] = move(bn.bias, t)
    elif not torch.equal(s, t):  # pragma: no cover - the analysis never asks for this
        raise ValueError(f"batch norm {action.module!r} without affine parameters cannot absorb a scaling")
    if bn.running_mean is not None:
        out["running_mean"] = move(bn.running_mean, s)
        out["running_var"] = move(bn.running_var)
    return out


def _linear_tensors(mod: nn.Module, action: ModuleAction, els: dict, groups) -> dict[str, torch.Tensor]:
    w = mod.weight.detach()
    out = {}
    if action.outputs is not None and action.outputs.segments:
        w = _transform_rows(w, action.outputs, els, groups)
        if mod.bias is not None:
            out["bias"] = _transform_rows(mod.bias.detach(), action.outputs, els, groups)
    if action.inputs is not None and action.inputs.segments:
        w = _transform_columns(w, action.inputs, els, groups)
    out["weight"] = w
    return {k: v for k, v in out.items() if v.data_ptr() != getattr(mod, k).data_ptr()}


@torch.no_grad()
def apply_symmetry(model: nn.Module, elements: dict, spec: SymmetrySpec, *, check: bool = True,
                   atol: float = 1e-6, inplace: bool = False) -> nn.Module:
    """A transformed copy of ``model`` computing the same function (Proposition 3.4); ``model`` is untouched.

    ``elements``: ``{space name: (n, n) matrix or (perm, scale)}`` (spaces left out get the identity),
    e.g. from :func:`random_symmetry`. Every element is checked against its space's group (ValueError
    otherwise); ``check=False`` applies any invertible matrix anyway, acting with A on both sides of
    every activation (then the output changes in general: useful to test non-invariance).
    ``inplace=True`` transforms ``model`` itself instead of a deep copy.

    The new tensors are computed from ``model`` directly (index gathers and scalings for monomial
    elements) and handed to ``copy.deepcopy`` so the transformed parameters are never copied twice.
    """
    if not isinstance(spec, SymmetrySpec):
        raise ValueError(f"apply_symmetry needs a SymmetrySpec (from symmetry_spec), got {type(spec).__name__}")
    els = _normalise(spec, elements, check, atol)
    groups = spec.groups
    replacements: list[tuple[nn.Module, str, torch.Tensor]] = []
    for action in spec.actions:
        try:
            mod = model.get_submodule(action.module)
        except AttributeError as err:
            raise ValueError(f"the model has no module {action.module!r}: was the spec made for another "
                             "model?") from err
        if action.kind == "batch_norm":
            tensors = _batch_norm_tensors(mod, action, els, groups)
        else:
            tensors = _linear_tensors(mod, action, els, groups)
        replacements += [(mod, name, t) for name, t in tensors.items()]
    if inplace:
        for mod, name, t in replacements:
            getattr(mod, name).copy_(t)
        return model
    memo = {}
    for mod, name, t in replacements:
        old = getattr(mod, name)
        memo[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
    return copy.deepcopy(model, memo)


def dense_symmetry(elements: dict) -> dict:
    """``{name: (n, n) tensor}`` from elements given as matrices or ``(perm, scale)`` pairs."""
    return {k: (G.monomial_matrix(*v) if isinstance(v, tuple | list) else torch.as_tensor(v))
            for k, v in elements.items()}
