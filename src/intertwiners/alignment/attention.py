"""Aligning attention blocks: heads matched by weight invariants, per-head maps by least squares.

An attention space (:class:`~intertwiners.symmetries.structured.AttentionGroup`) moves head g's query rows
Q_g -> A_g Q_g, key rows K_g -> A_g^-T K_g, value rows V_g -> B_g V_g and output columns O_g -> O_g B_g^-1,
and permutes heads. Per head, ``Q_g^T K_g`` and ``O_g V_g`` do not change under A_g and B_g, so heads of B
are matched to heads of A by the similarity of these invariants (Hungarian); then A_g and B_g are the
least-squares maps taking B's head onto its partner in A (``A_g Q_B = Q_A``, ``B_g V_B = V_A``), exact for
models that differ by an element of the group. Query/key rows include their biases. Both alignment methods
use this for attention spaces (they have no activation sites to read features from).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..symmetries.slots import HeadBlocks


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
        if not isinstance(slot.reach, HeadBlocks):
            continue
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


def _fit_blocks(kind: str, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """(heads, d, d) maps M_h with M_h source_h ≈ target_h: least squares for ``general_linear``, a scalar
    for ``scalar``, the identity for ``identity``."""
    h, d, _ = source.shape
    eye = torch.eye(d, dtype=torch.float64).expand(h, d, d)
    if kind == "identity":
        return eye.clone()
    if kind == "scalar":
        c = (target * source).sum((1, 2)) / (source * source).sum((1, 2)).clamp_min(1e-300)
        return c[:, None, None] * eye
    # M S = T  <=>  S^T M^T = T^T. The SVD driver: the default (gelsy) of MKL gives results that differ in the
    # last bits from call to call on the same input (with the memory layout), gelsd returns the same bits
    # (CUDA has one driver)
    driver = "gelsd" if source.device.type == "cpu" else None
    return torch.linalg.lstsq(source.mT, target.mT, driver=driver).solution.mT


def align_attention_space(model_a: nn.Module, model_b: nn.Module, spec, space: str,
                          scaling: bool = True) -> torch.Tensor:
    """The (n, n) element of ``space`` moving B's heads onto A's (B's other spaces already aligned)."""
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
    qk = _fit_blocks(qk_kind, qa[perm], qb) if dk else torch.zeros(h, 0, 0, dtype=torch.float64)
    vo = _fit_blocks(vo_kind, va[perm], vb) if dv else torch.zeros(h, 0, 0, dtype=torch.float64)
    return group.block_matrix(perm, qk, vo).dense()


def align_attention(model_a: nn.Module, model_b: nn.Module, spec, spaces: list[str],
                    scaling: bool = True) -> dict[str, torch.Tensor]:
    """{space: element} for every attention space in ``spaces``."""
    return {name: align_attention_space(model_a, model_b, spec, name, scaling) for name in spaces}


__all__ = ["align_attention", "align_attention_space", "head_features"]
