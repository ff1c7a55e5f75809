"""Closed-form initial stitching layers from the two models' features at the site.

Features are compared channel by channel: a feature tensor (N, C, *spatial) is read as the
(N * prod(spatial), C) matrix whose columns are channels (the group acts on channels). Statistics are
accumulated batch by batch in float64 (:class:`ChannelStats`), so nothing of size N is ever held.

Writing X for front's (N', C_in) matrix and Y for back's (N', C_out) matrix, every match returns
(M, b) with Y ~ X M^T + b (M is (C_out, C_in), b is (C_out,) or None):

* ``grelu``: P by the Hungarian algorithm on the (C_in, C_out) Pearson cross-correlation of the columns
  (maximised), then a positive scale per channel: by default d_i = ||y_pi(i)|| / ||x_i|| (root mean
  squares, no centring), or the least-squares d_i = <x_i, y_pi(i)> / <x_i, x_i>; floored at a small
  positive value; dead channels get d = 1. M = P D. When Y = X (P D)^T exactly, this recovers P D exactly
  (up to ties in correlation).
* ``permutation``: the same P, no scales.
* ``full``: affine least squares, M = Cov(Y, X) Cov(X)^-1 (with a tiny ridge), b = mean(Y) - M mean(X).
* ``low_rank``: reduced-rank regression: M_r = V_r V_r^T M, V_r the top-r eigenvectors of the fitted
  values' covariance M Cov(X) M^T (the best rank-r affine fit in the least-squares sense).
* ``orthogonal``: orthogonal Procrustes without centring: Q = U V^T from Y^T X = U S V^T.
* ``identity``: I.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def channel_columns(h: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C); (N, C, *spatial) -> (N * prod(spatial), C): one row per sample and position."""
    if h.ndim < 2:
        raise ValueError(f"features must be (N, C, ...), got shape {tuple(h.shape)}")
    if h.ndim == 2:
        return h
    return torch.movedim(h, 1, -1).reshape(-1, h.shape[1])


@dataclass
class ChannelStats:
    """Running first and second moments of front (x) and back (y) channel columns, float64 on the CPU."""

    n: int = 0
    sum_x: torch.Tensor | None = None
    sum_y: torch.Tensor | None = None
    xx: torch.Tensor | None = None
    yy: torch.Tensor | None = None
    xy: torch.Tensor | None = field(default=None)

    def update(self, hx: torch.Tensor, hy: torch.Tensor) -> ChannelStats:
        """Add a batch: hx (N, C_in, *spatial) from front, hy (N, C_out, *spatial) from back."""
        if hx.shape[0] != hy.shape[0] or hx.shape[2:] != hy.shape[2:]:
            raise ValueError(f"front and back features disagree in shape: {tuple(hx.shape)} vs {tuple(hy.shape)}")
        x = channel_columns(hx).double()
        y = channel_columns(hy).double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("features contain NaN or Inf; cannot match channels")
        parts = (x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)
        if self.sum_x is None:
            self.sum_x, self.sum_y, self.xx, self.yy, self.xy = (p.cpu() for p in parts)
        else:
            for name, p in zip(("sum_x", "sum_y", "xx", "yy", "xy"), parts):
                setattr(self, name, getattr(self, name) + p.cpu())
        self.n += x.shape[0]
        return self

    def _check(self):
        if self.n < 2:
            raise ValueError("channel matching needs at least 2 feature rows")

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / self.n

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sum_y / self.n

    def cov_xx(self) -> torch.Tensor:
        return self.xx / self.n - torch.outer(self.mean_x, self.mean_x)

    def cov_yy(self) -> torch.Tensor:
        return self.yy / self.n - torch.outer(self.mean_y, self.mean_y)

    def cov_xy(self) -> torch.Tensor:
        """(C_in, C_out) covariance of front and back channels."""
        return self.xy / self.n - torch.outer(self.mean_x, self.mean_y)

    def correlation(self) -> torch.Tensor:
        """(C_in, C_out) Pearson correlation; a constant channel correlates 0 with everything."""
        self._check()
        sx = self.cov_xx().diagonal().clamp_min(0).sqrt()
        sy = self.cov_yy().diagonal().clamp_min(0).sqrt()
        denom = torch.outer(sx, sy)
        corr = torch.where(denom > 1e-12 * max(float(denom.max()), 1e-300), self.cov_xy() / denom.clamp_min(1e-300),
                           torch.zeros_like(denom))
        return corr


def features_stats(pairs) -> ChannelStats:
    """ChannelStats over an iterable of (front batch, back batch) feature pairs."""
    stats = ChannelStats()
    for hx, hy in pairs:
        stats.update(hx, hy)
    if stats.n == 0:
        raise ValueError("no feature batches to match")
    return stats


def hungarian_permutation(score: torch.Tensor) -> torch.Tensor:
    """pi (C_in,) long: front channel i goes to back channel pi[i], maximising sum_i score[i, pi[i]].
    score: (C_in, C_out) with C_in == C_out."""
    if score.shape[0] != score.shape[1]:
        raise ValueError(f"a permutation match needs square scores, got {tuple(score.shape)}")
    rows, cols = linear_sum_assignment(np.asarray(score.double()), maximize=True)
    pi = torch.empty(score.shape[0], dtype=torch.long)
    pi[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return pi


def permutation_matrix(pi: torch.Tensor) -> torch.Tensor:
    """(C, C) matrix P with P[pi[i], i] = 1, so (P x)[pi[i]] = x[i]."""
    c = len(pi)
    p = torch.zeros(c, c, dtype=torch.float64)
    p[pi, torch.arange(c)] = 1.0
    return p


SCALE_FITS = ("rms", "lstsq")


def match_grelu(stats: ChannelStats, scale_fit: str = "rms", min_scale: float = 1e-6) -> torch.Tensor:
    """M = P D (C, C): Hungarian on the cross-correlation, then a positive scale per matched channel.

    ``scale_fit="rms"``: d_i = ||y_pi(i)|| / ||x_i|| (matches each channel's second moment; unbiased when the
    match is imperfect). ``"lstsq"``: d_i = <x_i, y_pi(i)> / <x_i, x_i> (least squares, which shrinks
    towards 0 as the correlation drops). Both are exact when Y = X (P D)^T.
    """
    if scale_fit not in SCALE_FITS:
        raise ValueError(f"scale_fit must be one of {SCALE_FITS}, got {scale_fit!r}")
    pi = hungarian_permutation(stats.correlation())
    idx = torch.arange(len(pi))
    xx = stats.xx.diagonal()
    dead = xx <= 1e-12 * max(float(xx.max()), 1e-300)
    if scale_fit == "rms":
        raw = (stats.yy.diagonal()[pi] / xx.clamp_min(1e-300)).sqrt()
    else:
        raw = stats.xy[idx, pi] / xx.clamp_min(1e-300)
    d = torch.where(dead, torch.ones_like(xx), raw.clamp_min(min_scale))
    return permutation_matrix(pi) * d[None, :]


def match_permutation(stats: ChannelStats) -> torch.Tensor:
    """M = P (C, C) from the Hungarian algorithm on the cross-correlation."""
    return permutation_matrix(hungarian_permutation(stats.correlation()))


def match_full(stats: ChannelStats, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine least squares (M (C_out, C_in), b (C_out,)); ``ridge`` is relative to the mean variance."""
    stats._check()
    cxx = stats.cov_xx()
    lam = ridge * max(float(cxx.diagonal().mean()), 1e-12)
    cxx = cxx + lam * torch.eye(len(cxx), dtype=cxx.dtype)
    m = torch.linalg.solve(cxx, stats.cov_xy()).T
    return m, stats.mean_y - m @ stats.mean_x


def match_low_rank(stats: ChannelStats, rank: int, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: the least-squares affine fit with rank(M) <= ``rank``."""
    m, _ = match_full(stats, ridge)
    fitted = m @ stats.cov_xx() @ m.T
    _, vecs = torch.linalg.eigh((fitted + fitted.T) / 2)
    v = vecs[:, -rank:]
    m_r = v @ (v.T @ m)
    return m_r, stats.mean_y - m_r @ stats.mean_x


def match_orthogonal(stats: ChannelStats) -> torch.Tensor:
    """Orthogonal Procrustes without centring: argmin_Q ||Y - X Q^T||_F = U V^T with Y^T X = U S V^T."""
    stats._check()
    u, _, vh = torch.linalg.svd(stats.xy.T)
    return u @ vh


def closed_form_match(kind: str, stats: ChannelStats, rank: int | None = None, scale_fit: str = "rms"
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M, b) for ``kind`` (see the module docstring); float64 on the CPU; b is None for bias-free kinds."""
    if kind == "grelu":
        return match_grelu(stats, scale_fit), None
    if kind == "permutation":
        return match_permutation(stats), None
    if kind == "full":
        return match_full(stats)
    if kind == "low_rank":
        if rank is None:
            raise ValueError("low_rank matching needs a rank")
        return match_low_rank(stats, rank)
    if kind == "orthogonal":
        return match_orthogonal(stats), None
    if kind == "identity":
        return torch.eye(len(stats.sum_x), dtype=torch.float64), None
    raise ValueError(f"no closed-form match for stitching kind {kind!r}")
