"""Aligning attention blocks: heads matched by weight invariants, per-head maps by least squares.

An attention space (:class:`~intertwiners.symmetries.structured.AttentionGroup`) moves head g's query rows
Q_g -> A_g Q_g, key rows K_g -> A_g^-T K_g, value rows V_g -> B_g V_g and output columns O_g -> O_g B_g^-1,
and permutes heads. Per head, ``Q_g^T K_g`` and ``O_g V_g`` do not change under A_g and B_g, so heads of B
are matched to heads of A by the similarity of these invariants (Hungarian); then each of A_g and B_g is
chosen by the distance of both sides it moves (``||A_g Q_B - Q_A||² + ||A_g^-T K_B - K_A||²``) among the
least-squares map of either side alone (exact for models that differ by an element of the group), the
orthogonal Procrustes map of both sides, and the identity, never with a condition number above
:data:`MAX_CONDITION` (a least-squares map of one side of two unrelated heads can be nearly singular, and its
inverse then blows the other side up). Query/key rows include their biases. Both alignment methods
use this for attention spaces (they have no activation sites to read features from).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..symmetries.slots import HeadBlocks
from ..symmetries.structured import MONOMIAL_INNER


def head_features(model: nn.Module, spec, space: str) -> dict[str, torch.Tensor]:
    """Rows per coordinate of an attention space: ``q``/``k`` (heads·dk, F) query and key rows (weights and
    biases concatenated), ``v`` (heads·dv, F) value rows, ``o`` (heads·dv, F) output columns (float64),
    read from the spec's :class:`~intertwiners.symmetries.slots.HeadBlocks` slots."""
    group = spec.spaces[space].group
    nq, nv = group.heads * group.dk, group.heads * group.dv
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    parts: dict[str, list] = {"q": [], "k": [], "v": [], "o": []}
    for slot in spec.slots(space):
        if not isinstance(slot.reach, HeadBlocks) or slot.reach.part not in parts:
            continue   # a per-head parameter (a relative position bias) follows the heads matched here
        t = tensors[slot.tensor].detach().to(torch.float64)
        rows = t.reshape(-1, 1) if slot.axis is None else t.movedim(slot.axis, 0).reshape(t.shape[slot.axis], -1)
        feats = rows[torch.from_numpy(slot.positions)].reshape(len(slot.coords), -1)   # (coordinates, r·F)
        part = slot.reach.part
        offset, n = (0, nq) if part in ("q", "k") else (nq, nv)
        full = torch.zeros(n, feats.shape[1], dtype=torch.float64)
        full[torch.from_numpy(slot.coords) - offset] = feats
        parts[part].append(full)
    return {k: torch.cat(v, 1) if v else None for k, v in parts.items()}


def _per_head(m: torch.Tensor | None, heads: int, d: int) -> torch.Tensor | None:
    return None if m is None or d == 0 else m.reshape(heads, d, -1)


def _invariant_similarity(xa, ya, xb, yb) -> torch.Tensor:
    """(heads_a, heads_b) cosine similarity of the per-head invariants X_h^T Y_h, computed from the small
    Gram blocks: <Xa^T Ya, Xb^T Yb>_F = sum((Xa Xb^T) * (Ya Yb^T))."""
    cross = (torch.einsum("aif,bjf->abij", xa, xb) * torch.einsum("aif,bjf->abij", ya, yb)).sum((-1, -2))
    na = (torch.einsum("aif,ajf->aij", xa, xa) * torch.einsum("aif,ajf->aij", ya, ya)).sum((-1, -2))
    nb = (torch.einsum("aif,ajf->aij", xb, xb) * torch.einsum("aif,ajf->aij", yb, yb)).sum((-1, -2))
    return cross / (na.clamp_min(1e-300).sqrt()[:, None] * nb.clamp_min(1e-300).sqrt()[None, :])


MAX_CONDITION = 1e3
"""Per-head maps with a larger condition number are never taken: a map M applied to one side of a head and
M^-T to the other loses about cond(M) times the rounding of the model's precision in its outputs."""


def _lstsq(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(heads, d, d) least-squares maps M_h with M_h source_h ≈ target_h (source, target (heads, d, F))."""
    # M S = T  <=>  S^T M^T = T^T. The SVD driver: the default (gelsy) of MKL gives results that differ in the
    # last bits from call to call on the same input (with the memory layout), gelsd returns the same bits
    # (CUDA has one driver)
    driver = "gelsd" if source.device.type == "cpu" else None
    return torch.linalg.lstsq(source.mT, target.mT, driver=driver).solution.mT


def _scalar(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(heads,) least-squares scalars c_h with c_h source_h ≈ target_h."""
    return (target * source).sum((1, 2)) / (source * source).sum((1, 2)).clamp_min(1e-300)


def _candidate_blocks(kind: str, xt, xs, yt, ys, names: tuple[str, str]) -> dict[str, torch.Tensor]:
    """{how: (heads, d, d) maps M_h} to choose from for one side of an attention space, where M acts on the
    rows ``x`` (queries or values) and M^-T on the rows ``y`` (keys or output columns); targets (A's heads,
    already permuted) ``xt``/``yt``, sources (B's) ``xs``/``ys``, each (heads, d, F) or None.

    ``general_linear``: the least-squares map of either side alone (``M xs ≈ xt``, or ``N ys ≈ yt`` and
    M = N^-T; both exact for heads that differ by an element of the group), the orthogonal map maximising
    ``<M, xt xs^T + yt ys^T>`` (Procrustes: for orthogonal M, M^-T = M, so it fits both sides at once), and the
    identity. ``scalar``: the same for c·I (the orthogonal one is ±I); ``positive``: the least-squares c·I where
    c > 0; ``sign``: ±I, the sign of the heads' inner product; the monomial kinds: a permutation within each
    head matched by similarity, with least-squares factors (:func:`_monomial_maps`). ``identity``: the
    identity."""
    ref = xs if xs is not None else ys
    h, d = ref.shape[0], ref.shape[1]
    eye = torch.eye(d, dtype=torch.float64).expand(h, d, d)
    out = {}
    if kind == "general_linear":
        if xs is not None:
            out[f"least squares on {names[0]}"] = _lstsq(xs, xt)
        if ys is not None:
            out[f"least squares on {names[1]}"] = torch.linalg.pinv(_lstsq(ys, yt)).mT
        corr = sum(t @ s.mT for t, s in ((xt, xs), (yt, ys)) if s is not None)
        u, _, vh = torch.linalg.svd(corr)
        out["orthogonal"] = u @ vh
    elif kind in ("scalar", "positive"):
        allowed = (lambda c: c != 0) if kind == "scalar" else (lambda c: c > 0)
        if xs is not None:
            c = _scalar(xs, xt)
            out[f"least squares on {names[0]}"] = torch.where(allowed(c), c, 1.0)[:, None, None] * eye
        if ys is not None:
            c = _scalar(ys, yt)
            out[f"least squares on {names[1]}"] = torch.where(allowed(c), 1 / c, 1.0)[:, None, None] * eye
    if kind in ("scalar", "sign"):
        dot = sum((t * s).sum((1, 2)) for t, s in ((xt, xs), (yt, ys)) if s is not None)
        out["orthogonal"] = torch.where(dot < 0, -1.0, 1.0)[:, None, None] * eye
    if kind in MONOMIAL_INNER:
        out["matched within heads"] = _monomial_maps(kind, xt, xs, yt, ys)
    out["identity"] = eye.clone()
    return out


def _monomial_maps(kind: str, xt, xs, yt, ys) -> torch.Tensor:
    """(heads, d, d) maps M = P·D within each head for a monomial ``kind`` (see :func:`_candidate_blocks`):
    source coordinate i goes to the target coordinate perm(i) of the most similar rows (cosines of both sides
    summed; their absolute values where a negative factor is allowed; Hungarian per head), scaled by the
    least-squares factor of the x side (else the inverse of the y side's), kept only where the kind allows it
    (non-zero, positive, its sign, none)."""
    signed = kind in ("monomial", "signed_permutation")
    h, d = (xs if xs is not None else ys).shape[:2]
    sim = torch.zeros(h, d, d, dtype=torch.float64)
    for t, src in ((xt, xs), (yt, ys)):
        if src is not None:
            cos = torch.einsum("hjf,hif->hji", t, src) / (
                t.norm(dim=2)[:, :, None] * src.norm(dim=2)[:, None, :]).clamp_min(1e-300)
            sim += cos.abs() if signed else cos
    maps = torch.zeros(h, d, d, dtype=torch.float64)
    for g in range(h):
        rows, cols = linear_sum_assignment(sim[g].numpy(), maximize=True)   # target rows[k] <- source cols[k]
        target = torch.empty(d, dtype=torch.long)
        target[torch.from_numpy(cols)] = torch.from_numpy(rows)
        if xs is not None:
            c = _scalar(xs[g][:, None, :], xt[g][target][:, None, :])
        else:
            c = 1 / _scalar(ys[g][:, None, :], yt[g][target][:, None, :])
        c = torch.nan_to_num(c, nan=1.0, posinf=1.0, neginf=1.0)
        c = {"monomial": torch.where(c != 0, c, 1.0), "positive_monomial": torch.where(c > 0, c, 1.0),
             "signed_permutation": torch.where(c < 0, -1.0, 1.0), "permutation": torch.ones_like(c)}[kind]
        maps[g, target, torch.arange(d)] = c
    return maps


def head_costs(maps: torch.Tensor, xt, xs, yt, ys) -> torch.Tensor:
    """(..., heads) ``||M xs - xt||² + ||M^-T ys - yt||²`` per head for maps (..., heads, d, d) (the squared
    distance of B's head, moved, to A's); inf where a map is singular, not finite, or has a condition number
    above :data:`MAX_CONDITION`."""
    u, sv, vh = torch.linalg.svd(maps)
    cost = torch.zeros(maps.shape[:-2], dtype=torch.float64)
    if xs is not None:
        cost = cost + (maps @ xs - xt).pow(2).sum((-1, -2))
    if ys is not None:
        inv_t = (u / sv[..., None, :]) @ vh  # M^-T = U S^-1 V^T
        cost = cost + (inv_t @ ys - yt).pow(2).sum((-1, -2))
    ok = (sv[..., -1] > 0) & (sv[..., 0] <= MAX_CONDITION * sv[..., -1]) & torch.isfinite(cost)
    return torch.where(ok, cost, torch.inf)


def _fit_blocks(kind: str, xt, xs, yt, ys, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(maps (heads, d, d), their costs (heads,), {how: number of heads}): per head, the candidate of
    :func:`_candidate_blocks` with the smallest :func:`head_costs` (the identity is always a candidate, so no
    head ends farther from A's than without its map)."""
    cands = _candidate_blocks(kind, xt, xs, yt, ys, names)
    hows = list(cands)
    stacked = torch.stack([cands[k] for k in hows])
    costs = head_costs(stacked, xt, xs, yt, ys)                         # (candidates, heads)
    best = costs.argmin(0)
    heads = torch.arange(stacked.shape[1])
    counts = {hows[i]: int((best == i).sum()) for i in range(len(hows)) if (best == i).any()}
    return stacked[best, heads], costs[best, heads], counts


def _side(kind, d, h, xa, ya, xb, yb, perm, names):
    """One side (queries/keys or values/outputs) of an attention space: (maps, chosen cost, identity cost,
    counts) with A's heads permuted by ``perm``."""
    if d == 0 or (xb is None and yb is None):
        return torch.eye(d, dtype=torch.float64).expand(h, d, d).clone(), 0.0, 0.0, {}
    xt, yt = (None if t is None else t[perm] for t in (xa, ya))
    maps, costs, counts = _fit_blocks(kind, xt, xb, yt, yb, names)
    eye = torch.eye(d, dtype=torch.float64).expand(h, d, d)
    unmoved = float(head_costs(eye, xa, xb, ya, yb).sum())   # no permutation, no maps
    return maps, float(costs.sum()), unmoved, counts


def align_attention_space(model_a: nn.Module, model_b: nn.Module, spec, space: str,
                          scaling: bool = True) -> tuple[torch.Tensor, str]:
    """(the (n, n) element of ``space`` moving B's heads onto A's (B's other spaces already aligned), how it
    was found).

    Heads are matched by their invariants, then each head's maps are chosen by :func:`_fit_blocks`; if the
    element found leaves B's attention weights farther from A's than the identity does, the identity is
    kept. ``how`` says which: ``"attention weights (queries/keys: least squares on queries 3, orthogonal 1;
    values/outputs: ...)"`` (heads per kind of map), or ``"attention weights (identity: ...)"``."""
    group = spec.spaces[space].group
    h, dk, dv = group.heads, group.dk, group.dv
    fa, fb = head_features(model_a, spec, space), head_features(model_b, spec, space)
    qa, ka, va, oa = (_per_head(fa[k], h, d) for k, d in (("q", dk), ("k", dk), ("v", dv), ("o", dv)))
    qb, kb, vb, ob = (_per_head(fb[k], h, d) for k, d in (("q", dk), ("k", dk), ("v", dv), ("o", dv)))
    sim = torch.zeros(h, h, dtype=torch.float64)
    if qa is not None and ka is not None:
        sim += _invariant_similarity(qa, ka, qb, kb)
    if va is not None and oa is not None:
        sim += _invariant_similarity(oa, va, ob, vb)
    if group.permute_heads:
        rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
        perm = torch.empty(h, dtype=torch.long)
        perm[torch.from_numpy(cols)] = torch.from_numpy(rows)   # B's head g moves to A's head perm[g]
    else:
        perm = torch.arange(h)
    qk_kind, vo_kind = (group.qk, group.vo) if scaling else ("identity", "identity")
    qk, qk_cost, qk_unmoved, qk_counts = _side(qk_kind, dk, h, qa, ka, qb, kb, perm, ("queries", "keys"))
    vo, vo_cost, vo_unmoved, vo_counts = _side(vo_kind, dv, h, va, oa, vb, ob, perm, ("values", "outputs"))
    if qk_unmoved + vo_unmoved < qk_cost + vo_cost:
        eye = torch.eye(group.size, dtype=torch.float64)
        return eye, ("attention weights (identity: the matched element left B's attention weights farther "
                     "from A's)")
    parts = [f"{what}: " + ", ".join(f"{k} {n}" for k, n in counts.items())
             for what, counts in (("queries/keys", qk_counts), ("values/outputs", vo_counts)) if counts]
    return group.block_matrix(perm, qk, vo).dense(), f"attention weights ({'; '.join(parts)})"


def align_attention(model_a: nn.Module, model_b: nn.Module, spec, spaces: list[str],
                    scaling: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({space: element}, {space: how it was found}) for every attention space in ``spaces``."""
    found = {name: align_attention_space(model_a, model_b, spec, name, scaling) for name in spaces}
    return {n: el for n, (el, _) in found.items()}, {n: how for n, (_, how) in found.items()}


__all__ = ["align_attention", "align_attention_space", "head_features"]
