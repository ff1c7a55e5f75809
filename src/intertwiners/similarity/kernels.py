"""Gram matrices for CKA: linear, RBF (median-distance bandwidth) and the max kernel of G_ReLU-CKA.

Channel conventions (API.md, Paper section 5) for features of shape (N, C, *spatial):

* ``linear`` and ``rbf`` use the flattened (N, C * prod(spatial)) matrix;
* ``max`` first centres each channel and scales it to unit norm over (N, *spatial) -- the G_ReLU
  normalisation of Definition 5.3 -- then K[i, j] = max_c <x_i[c], x_j[c]>, the largest inner product of
  the spatial maps of one channel. For (N, d) features each column is centred and scaled to unit norm over
  the N samples and K[i, j] = max_k x_ik x_jk.

The normalisation is what makes the max kernel invariant to G_ReLU: a positive scaling of a column is
undone by the unit norm, a permutation of columns does not change a maximum over them, and a translation
(Y = X A + 1 v') is undone by the centring.
"""

from __future__ import annotations

import torch

from ._validate import dead_columns, raise_dead
from .max_kernel import max_gram

KERNELS = ("linear", "rbf", "max")


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, prod(...))."""
    return x.reshape(x.shape[0], -1)


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """K = X X' for X (N, d) or flattened (N, C, *spatial); (N, N) in the dtype of X."""
    f = flatten(x)
    return f @ f.T


def median_bandwidth_sq(sq_dist: torch.Tensor) -> float:
    """Median of the squared distances between distinct samples (pairs i < j; the mean of the two middle
    values for an even count, as NumPy)."""
    n = sq_dist.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=sq_dist.device)
    v = sq_dist[iu[0], iu[1]]
    m = v.numel()
    lo = v.kthvalue((m + 1) // 2).values
    hi = v.kthvalue(m // 2 + 1).values
    return float((lo + hi) / 2)


def rbf_gram(x: torch.Tensor, threshold: float = 1.0, sigma: float | None = None) -> torch.Tensor:
    """K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) in float64, for (N, d) or flattened (N, C, *spatial).

    Unless ``sigma`` is given, sigma^2 = threshold^2 * median over pairs i < j of |x_i - x_j|^2, as in
    Kornblith et al. (2019), who use a fraction ``threshold`` of the median distance (their code takes
    the median over all N^2 entries, diagonal zeros included; here only distinct pairs count, so that
    duplicated samples do not shrink the bandwidth).
    """
    f = flatten(x).to(torch.float64)
    sq = (f * f).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (f @ f.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    if sigma is None:
        if threshold <= 0:
            raise ValueError(f"rbf threshold must be positive, got {threshold}")
        s2 = threshold ** 2 * median_bandwidth_sq(d2)
        if not s2 > 0:
            raise ValueError("rbf kernel: the median distance between samples is zero (most samples are "
                             "identical), so the median bandwidth is undefined; pass sigma= explicitly")
    else:
        if not sigma > 0:
            raise ValueError(f"rbf sigma must be positive, got {sigma}")
        s2 = float(sigma) ** 2
    return torch.exp(d2 / (-2.0 * s2))


def grelu_normalise(x: torch.Tensor, name: str = "X", drop_dead: bool = False,
                    center: bool = True) -> torch.Tensor:
    """Centre each column (or channel) and scale it to unit norm over the samples (and positions).

    x (N, d) -> (N, d'); x (N, C, *spatial) -> (N, C', *spatial); d' < d only with ``drop_dead=True``,
    which drops columns/channels that are constant over the data (their norm after centring is zero,
    e.g. a dead ReLU unit). Otherwise such columns raise ``ValueError``.
    """
    n, c = x.shape[0], x.shape[1]
    xs = x.reshape(n, c, -1)
    count = xs.shape[0] * xs.shape[2]
    # Statistics in the dtype of the data (torch reduces with cascaded sums, accurate to a few ulps),
    # reported in float64; no float64 copy of the data.
    if center:
        mean = xs.mean(dim=(0, 2))
        xc = xs - mean[None, :, None]
    else:
        mean = torch.zeros(c, dtype=x.dtype, device=x.device)
        xc = xs.clone()
    sq = torch.linalg.vector_norm(xc, dim=(0, 2)).to(torch.float64) ** 2
    mean = mean.to(torch.float64)
    raw = sq + count * mean ** 2                       # uncentred sums of squares, for the zero test
    dead = dead_columns(sq, raw.max())
    unit = "channel" if x.ndim > 2 else "column"
    what = "constant" if center else "zero"
    if len(dead):
        if not drop_dead:
            raise_dead(name, dead, c, what, unit)
        keep = torch.ones(c, dtype=torch.bool, device=x.device)
        keep[dead] = False
        if not bool(keep.any()):
            raise ValueError(f"{name}: every {unit} is {what} over the data; nothing is left to compare")
        xc, sq = xc[:, keep], sq[keep]
    xc.mul_((1.0 / sq.sqrt()).to(x.dtype)[None, :, None])
    return xc.reshape((n, xc.shape[1]) + tuple(x.shape[2:]))


def gram(x: torch.Tensor, kernel: str = "linear", *, threshold: float = 1.0, sigma: float | None = None,
         drop_dead: bool = False, name: str = "X", backend: str = "auto") -> torch.Tensor:
    """The (N, N) Gram matrix of features ``x`` for ``kernel`` in linear | rbf | max (see module doc)."""
    if kernel == "linear":
        return linear_gram(x)
    if kernel == "rbf":
        return rbf_gram(x, threshold=threshold, sigma=sigma)
    if kernel == "max":
        return max_gram(grelu_normalise(x, name=name, drop_dead=drop_dead), backend=backend)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
