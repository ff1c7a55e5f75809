"""Activation matching: the group element that best carries model A's features onto model B's.

For each space, the features of A (X) and B (Y) at every site of the space are streamed over the data into
:class:`~intertwiners.stitching.matching.ChannelStats` (first and second moments, float64; memory
independent of N). A site slot of the space reads the channels ``positions`` of the site; when B = g·A with
g = P·diag(d), the site's channels obey ``Y[:, pi(j)] = c(d_j) X[:, j]`` with ``c(d) = sign(d)**odd *
|d|**e`` (the slot's power, from the spec: :mod:`.spaces`). The fit is the closed-form P·D match used for
stitching, summed over the sites of a tied space:

* P: the Hungarian algorithm on the sum over sites of the channel cross-correlations (absolute values
  on sites that see signs, where the group has signs);
* |d|: per site, ``c(d_j) = rms(Y_pi(j)) / rms(X_j)`` (the ``rms`` scale fit of
  :func:`~intertwiners.stitching.matching.match_grelu`), turned into d_j through the site's exponent and
  averaged over sites in log space weighted by the channel's energy;
* sign(d): the sign of the summed correlation of the matched pair on sites that see signs;
* GL and unit-row-sum spaces: the least-squares matrix ``H = argmin ||X - Y H^T||`` over all sites
  (phi(A) = A there); unit row sums are then restored by ``H + (1 - H·1)·1^T / n``.

The returned element is g^-1, which moves B into A's basis.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import groups as G
from ..stitching.matching import ChannelStats, hungarian_permutation
from ..symmetries.slots import Slot
from .spaces import SpaceSlots


def slot_columns(features: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The space's channels at one site, as :class:`ChannelStats` reads them: (N, n, *spatial) when the slot is
    the channel axis, else the (rows, n) matrix with one column per index j of the space (rows run over N,
    the other axes and the slot's repeats r).
    """
    n, r = slot.positions.shape
    if slot.axis == 1 and r == 1:  # channels: (N, C, *spatial) with the space's channels, as ChannelStats reads
        pos = slot.positions[:, 0]
        if features.shape[1] == n and (pos == np.arange(n)).all():
            return features
        return features.index_select(1, torch.as_tensor(pos, device=features.device))
    t = torch.movedim(features, slot.axis, -1)
    t = t[..., torch.as_tensor(slot.positions.reshape(-1), device=t.device)]
    t = t.reshape(*t.shape[:-1], n, r).transpose(-1, -2)
    return t.reshape(-1, n)


class SpaceStats:
    """Streaming statistics of one space: one :class:`ChannelStats` per site slot."""

    def __init__(self, action: SpaceSlots):
        self.action = action
        self.stats = [ChannelStats() for _ in action.slots]

    def update(self, feats_a: dict, feats_b: dict) -> None:
        for slot, st in zip(self.action.slots, self.stats):
            st.update(slot_columns(feats_a[slot.tensor], slot), slot_columns(feats_b[slot.tensor], slot))


def _signed_sites(action: SpaceSlots) -> list[bool]:
    return [bool(slot.odd) and action.allows_signs for slot in action.slots]


def fit_monomial(space: SpaceStats, scaling: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, scale) of g with B ~ g·A on this space's sites (``scaling=False``: perm only, scale 1)."""
    action = space.action
    n = action.size
    signed = _signed_sites(action)
    score = torch.zeros(n, n, dtype=torch.float64)
    for st, sg in zip(space.stats, signed):
        corr = st.correlation()
        score += corr.abs() if (sg and scaling) else corr
    pi = hungarian_permutation(score)
    scale = torch.ones(n, dtype=torch.float64)
    if not scaling:
        return pi, scale
    idx = torch.arange(n)
    if action.allows_positive_scaling:
        num = torch.zeros(n, dtype=torch.float64)
        den = torch.zeros(n, dtype=torch.float64)
        for slot, st in zip(action.slots, space.stats):
            if not slot.exponent:
                continue
            xx, yy = st.xx.diagonal(), st.yy.diagonal()[pi]
            ok = (xx > 0) & (yy > 0)
            w = torch.where(ok, xx / st.n, torch.zeros_like(xx))
            log_d = torch.where(ok, 0.5 * torch.log(yy.clamp_min(1e-300) / xx.clamp_min(1e-300)), torch.zeros_like(xx))
            num += w * log_d / slot.exponent
            den += w
        scale = torch.where(den > 0, torch.exp(num / den.clamp_min(1e-300)), scale)
    if action.allows_signs and any(signed):
        total = torch.zeros(n, dtype=torch.float64)
        for st, sg in zip(space.stats, signed):
            if sg:
                total += st.cov_xy()[idx, pi]
        scale = scale * torch.where(total < 0, -1.0, 1.0).to(torch.float64)
    return pi, scale


TWIN_CORRELATION = 1 - 1e-6
"""Two coordinates of one model whose absolute correlation reaches this at a site are the same feature there."""


def _twins(cov: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(n, n) bool: the pairs of coordinates one site cannot tell apart -- both constant, or both varying with
    absolute correlation >= :data:`TWIN_CORRELATION` (copies of one feature, up to scale and sign).
    ``cov``: (n, n) covariance of one model's coordinates at the site; ``alive``: (n,) not constant there."""
    sd = cov.diagonal().clamp_min(0).sqrt()
    r = (cov / torch.outer(sd, sd).clamp_min(1e-300)).abs()
    both_alive = alive[:, None] & alive[None, :]
    return (both_alive & (r >= TWIN_CORRELATION)) | (~alive[:, None] & ~alive[None, :])


def identifiable(space: SpaceStats) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A's coordinates the data can tell apart (n,) bool, B's (n,) bool), or None when it can tell none apart
    (no more samples than coordinates at a site, a single sample included).

    A coordinate cannot be told apart when it is constant at every site of the space (a dead unit; a channel
    constant at some sites only is read at the others) or when another coordinate of the same model is the
    same feature at every site (constant together, or perfectly correlated: twins). How well A's features
    match B's does not enter (that is the fit's residual): two independently trained models are identified as
    long as each model's own coordinates differ."""
    n = space.action.size
    if not space.stats:
        return None
    alive_x = torch.zeros(n, dtype=torch.bool)
    alive_y = torch.zeros(n, dtype=torch.bool)
    twins_x = torch.ones(n, n, dtype=torch.bool)
    twins_y = torch.ones(n, n, dtype=torch.bool)
    for st in space.stats:
        if st.n <= n:
            return None
        cx, cy = st.cov_xx(), st.cov_yy()
        vx, vy = cx.diagonal(), cy.diagonal()
        ax = vx > 1e-12 * vx.abs().max().clamp_min(1e-300)
        ay = vy > 1e-12 * vy.abs().max().clamp_min(1e-300)
        alive_x |= ax
        alive_y |= ay
        twins_x &= _twins(cx, ax)
        twins_y &= _twins(cy, ay)
    off = ~torch.eye(n, dtype=torch.bool)
    return alive_x & ~(twins_x & off).any(1), alive_y & ~(twins_y & off).any(1)


def identified(space: SpaceStats) -> bool:
    """Can the data tell every coordinate of the space apart, in both models (:func:`identifiable`)? When not,
    several elements fit the data equally well on the coordinates it cannot tell apart, and the weights
    decide those."""
    ok = identifiable(space)
    return ok is not None and bool(ok[0].all()) and bool(ok[1].all())


def fit_linear(space: SpaceStats) -> torch.Tensor:
    """The (n, n) least-squares element H that moves B into A's basis: X ~ Y H^T over all sites."""
    n = space.action.size
    yy = torch.zeros(n, n, dtype=torch.float64)
    yx = torch.zeros(n, n, dtype=torch.float64)
    for st in space.stats:
        yy += st.yy
        yx += st.xy.T
    lam = 1e-12 * max(float(yy.diagonal().mean()), 1e-300)
    h = torch.linalg.solve(yy + lam * torch.eye(n, dtype=yy.dtype), yx).T
    if space.action.group.kind == "unit_row_sum":
        h = h + (1 - h.sum(1, keepdim=True)) / n
    return h


def fit_space(space: SpaceStats, scaling: bool = True):
    """The element (perm, scale) or (n, n) matrix that moves B into A's basis on this space."""
    if space.action.group.is_monomial or not scaling:
        perm, scale = fit_monomial(space, scaling)
        return G.monomial_inverse(perm, scale)
    return fit_linear(space)
