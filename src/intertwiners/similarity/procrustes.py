"""Procrustes similarities for the orthogonal, permutation and G_ReLU groups (Definition 5.2).

All three are computed from second moments only -- X'Y, column sums and squared norms, accumulated in
float64 over chunks of rows -- so no normalised copy of the data is ever made and the same statistics
can be streamed over minibatches (:class:`ProcrustesStats`).

* ``grelu`` (Definition 5.2): scale every column to unit norm (X~ = X D_X^-1), delta = min over
  permutations P of |X~ - Y~ P|_F. With unit columns |X~ - Y~P|^2 = 2d - 2 tr(X~'Y~P), so the best P is
  a linear sum assignment on the d x d cross-product (Hungarian, ``scipy.optimize.linear_sum_assignment``).
  Similarity 1 - delta / (2 sqrt d), in [0, 1], equal to 1 iff Y = X P D with D > 0 (plus a translation
  when ``center=True``).
* ``orthogonal``: X, Y scaled to unit Frobenius norm, delta = min over orthogonal Q of |X - Y Q|_F =
  sqrt(2 - 2 |X'Y|_*) (nuclear norm); similarity 1 - delta / 2.
* ``permutation``: unit Frobenius norm, delta = min over permutations; similarity 1 - delta / 2.

``center=True`` first subtracts column means (the measures become invariant to translations).
For (N, C, *spatial) features the groups act on channels: the columns are the channels of the
(N * prod(spatial), C) matrix (Table 2 of the paper).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .._util import resolve_device
from ._validate import channels_last_matrix, check_pair, dead_columns, raise_dead, to_features, unit_scale

GROUPS = ("orthogonal", "permutation", "grelu")


class ProcrustesStats:
    """Running float64 second moments of two feature sets: X'Y, column sums, column sums of squares.

    ``update(x, y)`` takes a batch of features (b, d) or (b, C, *spatial) (converted to the channel
    matrix); ``similarity(group, center)`` evaluates a Procrustes measure from what was accumulated.
    Memory: O(d_x d_y), independent of the number of samples.
    """

    def __init__(self, chunk_rows: int = 8192):
        self.chunk_rows = int(chunk_rows)
        self.rows = 0
        self.xty = self.sx = self.sy = self.sxx = self.syy = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch; x and y are validated tensors with the same number of samples."""
        xm = channels_last_matrix(x)
        ym = channels_last_matrix(y)
        if xm.shape[0] != ym.shape[0]:
            raise ValueError(f"X gives {xm.shape[0]} rows and Y {ym.shape[0]}: the spatial sizes differ, so "
                             "positions cannot be paired; compare features of the same spatial shape")
        if self.xty is None:
            dev = xm.device
            self.xty = torch.zeros((xm.shape[1], ym.shape[1]), dtype=torch.float64, device=dev)
            self.sx = torch.zeros(xm.shape[1], dtype=torch.float64, device=dev)
            self.sy = torch.zeros(ym.shape[1], dtype=torch.float64, device=dev)
            self.sxx = torch.zeros_like(self.sx)
            self.syy = torch.zeros_like(self.sy)
        elif xm.shape[1] != self.xty.shape[0] or ym.shape[1] != self.xty.shape[1]:
            raise ValueError(f"batch has {xm.shape[1]} and {ym.shape[1]} columns but earlier batches had "
                             f"{self.xty.shape[0]} and {self.xty.shape[1]}")
        for i in range(0, xm.shape[0], self.chunk_rows):
            xb = xm[i:i + self.chunk_rows].to(torch.float64)
            yb = ym[i:i + self.chunk_rows].to(torch.float64)
            self.xty += xb.T @ yb
            self.sx += xb.sum(0)
            self.sy += yb.sum(0)
            self.sxx += (xb * xb).sum(0)
            self.syy += (yb * yb).sum(0)
        self.rows += xm.shape[0]

    def moments(self, center: bool, xty: torch.Tensor | None = None):
        """(X'Y, |x_col|^2, |y_col|^2) as float64 NumPy arrays, centred when asked. ``xty`` replaces the
        accumulated X'Y (any leading batch dimensions), e.g. X'Y_pi for Y's samples shuffled by pi: a
        shuffle changes no column sum or norm."""
        if self.xty is None or self.rows == 0:
            raise ValueError("no data was given to the Procrustes statistics")
        xty = self.xty if xty is None else xty
        sxx, syy = self.sxx, self.syy
        if center:
            xty = xty - torch.outer(self.sx, self.sy) / self.rows
            sxx = (sxx - self.sx ** 2 / self.rows).clamp_min(0.0)
            syy = (syy - self.sy ** 2 / self.rows).clamp_min(0.0)
        return xty.cpu().numpy(), sxx.cpu().numpy(), syy.cpu().numpy()

    def similarity(self, group: str = "grelu", center: bool = False, drop_dead: bool = False) -> float:
        """The Procrustes similarity for ``group`` from the accumulated statistics (see module doc)."""
        return float(self.similarities(self.xty[None], group, center, drop_dead)[0])

    def similarities(self, xtys: torch.Tensor, group: str = "grelu", center: bool = False,
                     drop_dead: bool = False) -> np.ndarray:
        """The similarity for ``group`` with the accumulated X'Y replaced by each of ``xtys`` (B, d_x, d_y)
        (float64; the column sums and norms stay those accumulated): (B,) float64."""
        if self.rows < 2:
            raise ValueError(f"Procrustes needs at least 2 rows (samples x positions), got {self.rows}")
        return similarities_from_moments(*self.moments(center, xtys), group=group, center=center,
                                         drop_dead=drop_dead, raw_sxx=self.sxx.cpu().numpy(),
                                         raw_syy=self.syy.cpu().numpy(), rows=self.rows)


def _dead(sq: np.ndarray, raw: np.ndarray) -> np.ndarray:
    return dead_columns(torch.from_numpy(sq), torch.from_numpy(raw).max()).numpy()


def rounding_level(rows: int, width: int = 1) -> float:
    """Relative size of the float64 rounding in a squared distance computed from second moments: a per-column
    delta^2 below this (times the number of unit columns) is zero up to rounding."""
    return 64.0 * float(np.finfo(np.float64).eps) * max(1.0, math.log2(max(rows, 1)), float(width))


def similarity_from_moments(xty: np.ndarray, sxx: np.ndarray, syy: np.ndarray, group: str = "grelu",
                            center: bool = False, drop_dead: bool = False, raw_sxx: np.ndarray | None = None,
                            raw_syy: np.ndarray | None = None, rows: int = 1) -> float:
    """Procrustes similarity from X'Y (d_x, d_y) and the squared column norms (float64).

    delta^2 comes from an identity (|x - y|^2 = |x|^2 + |y|^2 - 2 x'y with unit norms), whose cancellation
    leaves float64 rounding of about eps per column; a delta^2 at that level (:func:`rounding_level`) is
    taken as exactly 0, so that Y = X P D gives exactly 1 rather than 1 - 1e-8.
    """
    return float(similarities_from_moments(np.asarray(xty)[None], sxx, syy, group, center, drop_dead, raw_sxx,
                                           raw_syy, rows)[0])


def similarities_from_moments(xty: np.ndarray, sxx: np.ndarray, syy: np.ndarray, group: str = "grelu",
                              center: bool = False, drop_dead: bool = False, raw_sxx: np.ndarray | None = None,
                              raw_syy: np.ndarray | None = None, rows: int = 1) -> np.ndarray:
    """:func:`similarity_from_moments` for a batch of cross products ``xty`` (B, d_x, d_y) that share the
    squared column norms (e.g. X'Y_pi for shuffles pi of Y's samples): (B,) float64. The norms, the dead
    columns and the normalisation are worked out once; then one batched SVD (orthogonal) or one Hungarian
    solve per matrix (permutation, grelu)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    xty = np.asarray(xty, dtype=np.float64)
    dx, dy = xty.shape[1:]
    if group != "orthogonal" and dx != dy:
        raise ValueError(f"{group} Procrustes matches columns one to one: X has {dx} columns/channels and Y "
                         f"{dy}; use group='orthogonal' to compare different widths")
    what = "constant" if center else "zero"
    if group == "grelu":
        dead = [_dead(s, r if r is not None else s) for s, r in ((sxx, raw_sxx), (syy, raw_syy))]
        if len(dead[0]) or len(dead[1]):
            if not drop_dead:
                for name, idx in zip(("X", "Y"), dead):
                    if len(idx):
                        raise_dead(name, torch.from_numpy(idx), dx, what, "column/channel")
            kx = np.setdiff1d(np.arange(dx), dead[0])
            ky = np.setdiff1d(np.arange(dy), dead[1])
            if len(kx) == 0 or len(ky) == 0:
                raise ValueError("every column/channel is dead in X or Y; nothing is left to compare")
            xty, sxx, syy = xty[:, kx][:, :, ky], sxx[kx], syy[ky]
            dx, dy = xty.shape[1:]
        m = xty / np.sqrt(sxx)[:, None] / np.sqrt(syy)[None, :]
        matched = np.array([mb[linear_sum_assignment(mb, maximize=True)].sum() for mb in m])
        # unmatched columns (only after drop_dead with different counts) contribute |x|^2 = 1 each
        delta_sq = dx + dy - 2.0 * matched
        delta_sq[delta_sq <= (dx + dy) * rounding_level(rows)] = 0.0
        return 1.0 - np.sqrt(delta_sq) / (2.0 * math.sqrt(max(dx, dy)))
    fx, fy = float(sxx.sum()), float(syy.sum())
    for name, f in (("X", fx), ("Y", fy)):
        if not f > 0:
            raise ValueError(f"{name} is {what} everywhere (its Frobenius norm is zero), so it cannot be scaled "
                             "to unit norm for Procrustes")
    scale = math.sqrt(fx * fy)
    if group == "orthogonal":
        inner = np.linalg.svd(xty, compute_uv=False).sum(-1) / scale
    else:
        inner = np.array([mb[linear_sum_assignment(mb, maximize=True)].sum() for mb in xty]) / scale
    delta_sq = 2.0 - 2.0 * inner
    delta_sq[delta_sq <= 2.0 * rounding_level(rows, max(dx, dy) if group == "orthogonal" else 1)] = 0.0
    return 1.0 - np.sqrt(delta_sq) / 2.0


def procrustes(X, Y, group: str = "grelu", center: bool = False, *, drop_dead: bool = False,
               device=None, chunk_rows: int = 8192) -> float:
    """Procrustes similarity in [0, 1] between X and Y (N, d) or (N, C, *spatial), for ``group`` in
    orthogonal | permutation | grelu (Definition 5.2; see the module doc for the normalisations).

    ``center=True`` subtracts column means first. ``drop_dead=True`` (grelu) drops zero (or, centred,
    constant) columns, which cannot be scaled to unit norm and otherwise raise ``ValueError``.
    Statistics are accumulated in float64 over ``chunk_rows`` rows at a time. Returns a float.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    dev = None if device is None else resolve_device(device)
    x = to_features(X, "X", dev, min_samples=2)
    y = to_features(Y, "Y", dev if dev is not None else x.device, min_samples=2)
    check_pair(x, y)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    x, y = unit_scale(x), unit_scale(y)             # scale invariant: any finite scale gives the same value
    stats = ProcrustesStats(chunk_rows=chunk_rows)
    stats.update(x, y)
    return stats.similarity(group, center=center, drop_dead=drop_dead)
