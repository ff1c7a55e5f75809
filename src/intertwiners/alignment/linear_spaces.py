"""GL spaces in weight matching: the products that hide them, and their element in closed form.

A GL space (no activation between two linear maps: h = W1 x + b1, y = W2 h + b2) is moved by any
invertible T: the slots that carry it as rows (``W1 -> T W1``, ``b1 -> T b1``) and as columns
(``W2 -> W2 T^-1``). The neighbouring spaces' slices on W1 and W2 are mixed by T, so matching them there (as
weight matching does for monomial spaces) compares slices in bases that differ by an unknown T, and T itself
is determined only jointly with those neighbours. Two steps separate them:

1. :func:`collapse_linear_spaces`: the product of every consumer with every producer over the space's axis
   (``W2·W1``, ``W2·b1``; for any shapes, the contraction of the two tensors along the space's axis, each
   occurrence of a coordinate -- a channel repeated by a flatten -- kept as an axis of its own) does not
   change under T. Each GL space's tensors are replaced by these products, carrying the other spaces' slots
   of the tensors they came from, so the other spaces are matched (and put in canonical form) on quantities
   that T does not reach. A space whose slots cannot be contracted this way (a slot on part of an axis, on a
   flattened tensor, or a tensor that is both producer and consumer) is left as it is: its neighbours are
   then matched on the mixed slices, and the residual of step 2 shows it.
2. :func:`solve_linear_space`: with the other spaces matched and applied to B, T enters linearly: rows
   ``T R_B = R_A`` (R: the rows slots side by side, (n, p)) and columns ``C_A T = C_B`` (C: the columns
   slots stacked, (m, n); from ``C_B T^-1 = C_A``). T = I + D with D the minimum-norm least-squares solution
   of both at once, from the normal equations ``(C_Aᵀ C_A) D + D (R_B R_Bᵀ) = Q`` diagonalised by the
   eigenvectors of the two Gram matrices. Directions that neither side determines (a GL space wider than
   what its producers and consumers span) stay at the identity: every such T moves B onto A's parameters
   when the models are in one orbit, so the parameters are recovered although the element is not unique,
   and the report says how many directions were left. The fit's residual (``||T R_B - R_A||`` and
   ``||C_B T^-1 - C_A||`` over ``||R_A||`` and ``||C_A||``) is reported; when T leaves B farther from A than
   the identity, or is numerically singular, the identity is kept and the report says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..symmetries.slots import Columns, Rows
from .canonical import slot_rows
from .spaces import SpaceSlots

MAX_CONDITION = 1e8  # a least-squares element worse conditioned than this is not applied


def is_linear_space(act: SpaceSlots) -> bool:
    """Is the space's group the general linear group (the spaces this module handles)?"""
    return act.group.kind == "general_linear"


def _contractible(act: SpaceSlots, slots_on: dict[str, list], params: dict) -> tuple[list, list] | None:
    """(rows slots, columns slots) of a GL space when every pair can be contracted (module docstring), else
    None."""
    rows = [s for s in act.slots if isinstance(s.reach, Rows)]
    cols = [s for s in act.slots if isinstance(s.reach, Columns)]
    if not rows or not cols or len(rows) + len(cols) != len(act.slots):
        return None
    tensors = [s.tensor for s in rows + cols]
    if len(set(tensors)) != len(tensors):
        return None  # a tensor on both sides (a self-map) or twice on one
    for s in rows + cols:
        if s.axis is None or s.positions.size != params[s.tensor].shape[s.axis]:
            return None  # a flattened tensor, or an axis the space covers in part
        if any(o.axis is None or o.axis == s.axis for o in slots_on[s.tensor] if o is not s):
            return None
    return rows, cols


def _gather(t: torch.Tensor, slot) -> torch.Tensor:
    """``t`` with the slot's axis split into (n, r): coordinate j's occurrence k at [..., j, k, ...]."""
    n, r = slot.positions.shape
    t = t.index_select(slot.axis, torch.as_tensor(slot.positions.reshape(-1), device=t.device))
    return t.reshape(*t.shape[:slot.axis], n, r, *t.shape[slot.axis + 1:])


def collapse_linear_spaces(params_a: dict, params_b: dict, actions: dict[str, SpaceSlots]
                           ) -> tuple[dict, dict, dict[str, SpaceSlots], list[str]]:
    """(params A, params B, actions, collapsed GL spaces): the GL spaces of ``actions`` replaced by the
    products of their consumers and producers (module docstring, step 1). The dicts returned are new (the
    input dicts and tensors are not modified); the products are named ``"<consumer> · <producer>"``."""
    pa, pb, acts = dict(params_a), dict(params_b), dict(actions)
    collapsed = []
    for name in [n for n, a in actions.items() if is_linear_space(a)]:
        act = acts[name]
        slots_on: dict[str, list] = {}
        for a in acts.values():
            for s in a.slots:
                slots_on.setdefault(s.tensor, []).append(s)
        pair = _contractible(act, slots_on, pb)
        if pair is None:
            continue
        rows, cols = pair
        added: dict[str, list] = {}  # space -> its slots on the products
        for c in cols:
            for r in rows:
                key = f"{c.tensor} · {r.tensor}"
                za = torch.tensordot(_gather(pa[c.tensor], c), _gather(pa[r.tensor], r), dims=([c.axis], [r.axis]))
                zb = torch.tensordot(_gather(pb[c.tensor], c), _gather(pb[r.tensor], r), dims=([c.axis], [r.axis]))
                pa[key], pb[key] = za, zb
                # the product's axes: the consumer's (its GL axis now the r repeats of each coordinate), then the
                # producer's (likewise), so the other slots keep their axis, offset by the consumer's ndim
                nc = pb[c.tensor].ndim
                for o in slots_on[c.tensor]:
                    if o is not c:
                        added.setdefault(o.space, []).append(dataclasses.replace(o, tensor=key))
                for o in slots_on[r.tensor]:
                    if o is not r:
                        added.setdefault(o.space, []).append(dataclasses.replace(o, tensor=key, axis=nc + o.axis))
        gone = {s.tensor for s in rows + cols}
        del acts[name]
        for n, a in acts.items():
            kept = [s for s in a.slots if s.tensor not in gone] + added.get(a.name, [])
            acts[n] = dataclasses.replace(a, slots=kept)
        for k in gone:
            if not any(s.tensor == k for a in acts.values() for s in a.slots):
                pa.pop(k, None)
                pb.pop(k, None)
        collapsed.append(name)
    return pa, pb, acts, collapsed


@dataclass
class LinearFit:
    """The element of one GL space found by :func:`solve_linear_space`: ``element`` (n, n) float64 moving B
    into A's basis, ``how`` (for ``AlignResult.found_by``) and ``residual`` (relative, of the fit)."""

    element: torch.Tensor
    how: str
    residual: float


def _sides(params: dict, act: SpaceSlots, slots=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(R (n, p): rows slots side by side, K (n, m): columns slots side by side (C = Kᵀ)), float64; None for
    a side with no slot."""
    slots = act.slots if slots is None else slots
    rows = [slot_rows(params[s.tensor], s).double().cpu() for s in slots if isinstance(s.reach, Rows)]
    cols = [slot_rows(params[s.tensor], s).double().cpu() for s in slots if isinstance(s.reach, Columns)]
    return (torch.cat(rows, 1) if rows else None), (torch.cat(cols, 1) if cols else None)


def fit_residual(params_a: dict, params_b: dict, act: SpaceSlots, element: torch.Tensor, slots=None) -> float:
    """sqrt((||T R_B - R_A||² + ||C_B T^-1 - C_A||²) / (||R_A||² + ||C_A||²)) over the space's rows and columns
    slots (``slots``: a subset), with T = ``element`` (the distance to A of B moved by T on those slots)."""
    ra, ka = _sides(params_a, act, slots)
    rb, kb = _sides(params_b, act, slots)
    num = den = 0.0
    if ra is not None:
        num += float((element @ rb - ra).pow(2).sum())
        den += float(ra.pow(2).sum())
    if ka is not None:  # columns: C T^-1, i.e. K -> T^-T K
        num += float((torch.linalg.solve(element.T, kb) - ka).pow(2).sum())
        den += float(ka.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def least_squares_element(ra, rb, ka, kb, eps: float) -> tuple[torch.Tensor, int]:
    """(T = I + D, number of directions of D left at 0): D the minimum-norm minimiser of
    ``||D R_B - (R_A - R_B)||² + ||C_A D - (C_B - C_A)||²`` with R (n, p) the rows and K = Cᵀ (n, m) the columns
    (either side may be None), from the normal equations ``(C_Aᵀ C_A) D + D (R_B R_Bᵀ) = Q`` in the
    eigenvectors of the two Gram matrices; a direction whose eigenvalue sum is below ``100 n eps`` times the
    largest is left at 0 (``eps``: the rounding unit of the parameters)."""
    n = (ra if ra is not None else ka).shape[0]
    zero = torch.zeros(n, n, dtype=torch.float64)
    gram_c = ka @ ka.T if ka is not None else zero  # C_Aᵀ C_A
    gram_r = rb @ rb.T if rb is not None else zero  # R_B R_Bᵀ
    rhs = zero.clone()
    if ka is not None:
        rhs += ka @ (kb - ka).T  # C_Aᵀ (C_B - C_A)
    if rb is not None:
        rhs += (ra - rb) @ rb.T
    a, u = torch.linalg.eigh(gram_c)
    b, v = torch.linalg.eigh(gram_r)
    a, b = a.clamp_min(0), b.clamp_min(0)
    tol = float(a.max() + b.max()) * 100 * n * eps
    denom = a[:, None] + b[None, :]
    known = denom > tol
    d = torch.where(known, (u.T @ rhs @ v) / denom.clamp_min(1e-300), zero)
    return torch.eye(n, dtype=torch.float64) + u @ d @ v.T, int((~known).sum())


def solve_linear_space(params_a: dict, params_b: dict, act: SpaceSlots, slots=None) -> LinearFit:
    """The element T moving B into A's basis on one GL space (module docstring, step 2), fitted on the
    space's rows and columns slots (``slots``: a subset of ``act.slots``), B's other spaces already aligned."""
    n = act.size
    eye = torch.eye(n, dtype=torch.float64)
    ra, ka = _sides(params_a, act, slots)
    rb, kb = _sides(params_b, act, slots)
    dtype = next((t.dtype for t in params_b.values() if t.is_floating_point()), torch.float64)
    element, free = least_squares_element(ra, rb, ka, kb, torch.finfo(dtype).eps)
    where = f"{free} of {n * n} directions not determined by the weights, kept at the identity" if free \
        else "determined by the weights"
    cond = float(torch.linalg.cond(element)) if bool(torch.isfinite(element).all()) else float("inf")
    base = fit_residual(params_a, params_b, act, eye, slots)
    if not cond <= MAX_CONDITION:
        return LinearFit(eye, f"weights (GL: identity kept, residual {base:.3g}; the least-squares element is "
                              f"singular, condition {cond:.3g})", base)
    res = fit_residual(params_a, params_b, act, element, slots)
    if not res <= base:
        return LinearFit(eye, f"weights (GL: identity kept, residual {base:.3g}; the least-squares element fits "
                              f"worse: {res:.3g})", base)
    return LinearFit(element, f"weights (GL: least squares on rows and columns, {where}; residual {res:.3g})", res)
