"""Centred kernel alignment: CKA with linear, RBF or max kernels, and G_ReLU-CKA (Definition 5.3).

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

with K, L the Gram matrices of X and Y (:mod:`.kernels`) and HSIC the unbiased HSIC_1 of Nguyen, Raghu &
Kornblith (2021, eq. 3) by default, or the biased HSIC_0 (:mod:`.hsic`). G_ReLU-CKA is CKA with the max
kernel after each column/channel is centred and scaled to unit norm; it is invariant to permutations and
positive scalings of the columns (G_ReLU) and to translations, and equals 1 when Y = X A + 1 v' with A in
G_ReLU. Linear CKA is invariant to orthogonal transformations and isotropic scaling instead.

The max kernel is not positive semi-definite (Lemma 5.5 is false: x = (1,0), (0,1), (1,1) gives the
eigenvalue 1 - sqrt 2; docs/similarity.md), so G_ReLU-CKA lies in [-1, 1] (Cauchy-Schwarz), not always
in [0, 1].
"""

from __future__ import annotations

import math

import torch

from .._util import resolve_device
from ._validate import check_pair, check_unbiased_n, check_varies, to_features, unit_scale
from .hsic import _check_estimator, centred_gram, centred_inner, hsic_normaliser
from .kernels import KERNELS, gram


def check_min_samples(n: int, estimator: str, what: str = "CKA") -> None:
    """N >= 4 for the unbiased HSIC_1, N >= 2 for the biased HSIC_0 (it divides by (N-1)^2)."""
    if estimator == "unbiased":
        check_unbiased_n(n, f"{what} with the unbiased estimator")
    elif n < 2:
        raise ValueError(f"{what} with the biased estimator needs at least 2 samples, got {n}")


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, estimator: str = "unbiased") -> float:
    """CKA from two (N, N) Gram matrices; raises ``ValueError`` rather than returning NaN."""
    _check_estimator(estimator)
    check_min_samples(k.shape[0], estimator)
    if k.shape != l.shape:
        raise ValueError(f"Gram matrices of different sizes: {tuple(k.shape)} and {tuple(l.shape)}")
    # centre each Gram matrix once (U-centring for HSIC_1, H K H for HSIC_0), then three inner products
    kc, lc = centred_gram(k, estimator), centred_gram(l, estimator)
    norm = hsic_normaliser(k.shape[0], estimator)
    kl, kk, ll = (float(centred_inner(a, b)) / norm for a, b in ((kc, lc), (kc, kc), (lc, lc)))
    scales = (gram_scale(k) / norm, gram_scale(l) / norm)
    return cka_from_hsic(kl, kk, ll, estimator, scales=scales, rtol=degenerate_rtol(k.dtype, l.dtype))


def gram_scale(k: torch.Tensor) -> float:
    """|K|_F^2 in float64: the scale against which a self-HSIC counts as zero."""
    return float(torch.linalg.vector_norm(k, dtype=torch.float64)) ** 2


def degenerate_rtol(*dtypes: torch.dtype) -> float:
    """A self-HSIC below rtol * |K|_F^2 / normaliser is rounding noise: (100 eps)^2 of the Gram dtype."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return (100.0 * eps) ** 2


def cka_from_hsic(kl: float, kk: float, ll: float, estimator: str = "unbiased", what: str = "",
                  scales: tuple[float, float] = (0.0, 0.0), rtol: float = 0.0) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with an explanation when a self-HSIC is not positive.

    A self-HSIC at or below ``rtol * scale`` (the Gram matrix's |K|_F^2 over the HSIC normaliser) is
    treated as zero: constant features give exactly zero up to rounding.
    """
    for label, v, sc in (("X", kk, scales[0]), ("Y", ll, scales[1])):
        if not v > rtol * sc or not math.isfinite(v):
            hint = ("the features carry no variation under this kernel (constant features?), or the "
                    "unbiased HSIC_1 estimate is degenerate for so few samples; use more samples (larger "
                    "batches), or estimator='biased'"
                    if estimator == "unbiased" else "the features carry no variation under this kernel")
            raise ValueError(f"CKA is undefined{what}: HSIC({label}, {label}) = {v:.3g} is not positive "
                             f"({estimator} estimator); {hint}")
    return kl / math.sqrt(kk * ll)


def _linear_hsic_terms(x: torch.Tensor, y: torch.Tensor, estimator: str, chunk_rows: int = 4096):
    """HSIC(K, L), HSIC(K, K), HSIC(L, L), |K|_F^2, |L|_F^2 for linear kernels K = X X', L = Y Y' without
    forming any N x N matrix: O(N (d_x + d_y)^2) time, O((d_x + d_y)^2 + N) memory, float64 sums.

    Unbiased (eq. 3 term by term): tr(K~L~) = |X'Y|_F^2 - sum_i K_ii L_ii; 1'K~1 = |X'1|^2 - tr K;
    1'K~L~1 = (X X'1 - diag K)'(Y Y'1 - diag L). Biased: |Xc'Yc|_F^2 / (n-1)^2 with centred columns.
    """
    n = x.shape[0]
    xf, yf = x.reshape(n, -1), y.reshape(n, -1)
    dev = x.device
    dx, dy = xf.shape[1], yf.shape[1]
    # Column means first (float64): HSIC_1 and HSIC_0 of linear kernels are invariant to translating the
    # columns, and centred columns avoid the cancellation of large uncentred terms (features with a large
    # common offset, or constant ones, would otherwise leave rounding noise of the size of the offset).
    mx = sum(xf[i:i + chunk_rows].sum(0, dtype=torch.float64) for i in range(0, n, chunk_rows)) / n
    my = sum(yf[i:i + chunk_rows].sum(0, dtype=torch.float64) for i in range(0, n, chunk_rows)) / n
    xx = torch.zeros((dx, dx), dtype=torch.float64, device=dev)
    yy = torch.zeros((dy, dy), dtype=torch.float64, device=dev)
    xy = torch.zeros((dx, dy), dtype=torch.float64, device=dev)
    sx = torch.zeros(dx, dtype=torch.float64, device=dev)
    sy = torch.zeros(dy, dtype=torch.float64, device=dev)
    kd, ld = [], []                                             # diagonals K_ii, L_ii
    for i in range(0, n, chunk_rows):
        xb, yb = xf[i:i + chunk_rows].to(torch.float64) - mx, yf[i:i + chunk_rows].to(torch.float64) - my
        xx += xb.T @ xb
        yy += yb.T @ yb
        xy += xb.T @ yb
        sx += xb.sum(0)
        sy += yb.sum(0)
        kd.append((xb * xb).sum(1))
        ld.append((yb * yb).sum(1))
    kdiag, ldiag = torch.cat(kd), torch.cat(ld)
    fro = lambda m: float((m * m).sum())                       # noqa: E731
    if estimator == "biased":
        xxc = xx - torch.outer(sx, sx) / n
        yyc = yy - torch.outer(sy, sy) / n
        xyc = xy - torch.outer(sx, sy) / n
        norm = (n - 1) ** 2
        return fro(xyc) / norm, fro(xxc) / norm, fro(yyc) / norm, fro(xx) / norm, fro(yy) / norm
    # row sums of K~ and L~: X (X'1) - diag K, computed chunk by chunk
    kr = torch.cat([(xf[i:i + chunk_rows].to(torch.float64) - mx) @ sx for i in range(0, n, chunk_rows)]) - kdiag
    lr = torch.cat([(yf[i:i + chunk_rows].to(torch.float64) - my) @ sy for i in range(0, n, chunk_rows)]) - ldiag
    ksum, lsum = float(sx @ sx) - float(kdiag.sum()), float(sy @ sy) - float(ldiag.sum())
    norm = n * (n - 3)

    def h(tr_prod, diag_prod, s1, s2, r1, r2):
        return (tr_prod - diag_prod + s1 * s2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(r1 @ r2)) / norm

    kl = h(fro(xy), float(kdiag @ ldiag), ksum, lsum, kr, lr)
    kk = h(fro(xx), float(kdiag @ kdiag), ksum, ksum, kr, kr)
    ll = h(fro(yy), float(ldiag @ ldiag), lsum, lsum, lr, lr)
    return kl, kk, ll, fro(xx) / norm, fro(yy) / norm


def cka(X, Y, kernel: str = "linear", estimator: str = "unbiased", *, threshold: float = 1.0,
        sigma: float | None = None, drop_dead: bool = False, device=None, backend: str = "auto",
        linear_route: str = "auto") -> float:
    """Centred kernel alignment between features X (N, ...) and Y (N, ...) of the same N samples.

    kernel: ``linear`` (flattened features), ``rbf`` (flattened; bandwidth sigma^2 = threshold^2 x the
    median squared distance between distinct samples, as Kornblith et al. 2019, unless ``sigma`` is given)
    or ``max`` (the G_ReLU max kernel after each column/channel is centred and unit-normalised; the same as
    :func:`grelu_cka`). estimator: ``unbiased`` (HSIC_1, NRK21 eq. 3; needs N >= 4; the value can be
    slightly negative for unrelated features) or ``biased`` (HSIC_0 = tr(KHLH)/(N-1)^2).
    ``drop_dead=True`` drops columns/channels that are constant over the data before the max kernel
    (otherwise they raise). X and Y may have different feature shapes. Returns a float.
    The linear kernel is computed from feature-space products (X'Y, X'X, Y'Y; no N x N matrix, so exact
    CKA on N = 10^5 samples fits in memory) when that is cheaper (``linear_route="auto"``), else from the
    Gram matrices; ``linear_route`` = ``"features"`` / ``"gram"`` forces one. Both give the same value.
    """
    if linear_route not in ("auto", "features", "gram"):
        raise ValueError(f"linear_route must be 'auto', 'features' or 'gram', got {linear_route!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    _check_estimator(estimator)
    dev = None if device is None else resolve_device(device)
    x = to_features(X, "X", dev)
    y = to_features(Y, "Y", dev if dev is not None else x.device)
    check_pair(x, y)
    check_min_samples(x.shape[0], estimator)
    check_varies(x, "X")
    check_varies(y, "Y")
    if not (kernel == "rbf" and sigma is not None):    # scale invariant: any finite scale gives the same value
        x, y = unit_scale(x), unit_scale(y)
    if kernel == "linear":
        n, dx, dy = x.shape[0], x[0].numel(), y[0].numel()
        if linear_route == "features" or (linear_route == "auto" and dx * dx + dy * dy + dx * dy < n * (dx + dy)):
            kl, kk, ll, sk, sl = _linear_hsic_terms(x, y, estimator)
            rtol = degenerate_rtol(x.dtype, y.dtype)
            return cka_from_hsic(kl, kk, ll, estimator, scales=(sk, sl), rtol=rtol)
    opts = dict(threshold=threshold, sigma=sigma, drop_dead=drop_dead, backend=backend)
    k = gram(x, kernel, name="X", **opts)
    l = gram(y, kernel, name="Y", **opts)
    return cka_from_grams(k, l, estimator)


def grelu_cka(X, Y, estimator: str = "unbiased", *, drop_dead: bool = False, device=None,
              backend: str = "auto") -> float:
    """G_ReLU-CKA (Definition 5.3): CKA with the max kernel on centred, unit-norm columns.

    X (N, d) / Y (N, d'): each column is centred and scaled to unit norm over the N samples, then
    K[i, j] = max_k x_ik x_jk. X (N, C, *spatial): each channel is centred and scaled to unit norm over
    (N, *spatial), then K[i, j] = max_c <x_i[c], x_j[c]> (inner products of the spatial maps). The
    unbiased HSIC_1 by default. A column/channel that is constant over the data (a dead ReLU unit)
    cannot be normalised: it raises ``ValueError`` unless ``drop_dead=True``. Returns a float.
    """
    return cka(X, Y, kernel="max", estimator=estimator, drop_dead=drop_dead, device=device, backend=backend)
