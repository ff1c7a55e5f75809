"""The Hilbert-Schmidt independence criterion between two Gram matrices, in O(N^2) and float64.

Two estimators, both computed without any N x N centring matrix:

* ``"unbiased"`` -- HSIC_1 of Nguyen, Raghu & Kornblith (2021, eq. 3), after Song et al. (2012)::

      HSIC_1(K, L) = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))

  where K~, L~ are K, L with their diagonals set to zero. Needs n >= 4. Equivalently the inner product of
  the *U-centred* matrices divided by n(n-3) (Szekely & Rizzo 2014), which is what :func:`centred_gram`
  returns and what the streaming layer x layer matrix multiplies in one BLAS call.
* ``"biased"`` -- HSIC_0 = tr(K H L H) / (n-1)^2 with H = I - 11'/n (Gretton et al. 2005), i.e. the
  inner product of the double-centred matrices.

HSIC_1(K, K) is a sum of squares of the U-centred matrix over n(n-3), so it is >= 0 up to rounding and
0 for features without variation; HSIC_1(K, L) can be negative. The CKA functions raise ``ValueError``
(never return NaN) when a self-HSIC is not positive.
"""

from __future__ import annotations

import torch

from ._validate import check_unbiased_n

ESTIMATORS = ("unbiased", "biased")


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} (unbiased = HSIC_1 of NRK21 eq. 3), "
                         f"got {estimator!r}")


def _square(k, name: str) -> torch.Tensor:
    """A Gram matrix as a float64 tensor (detached), checked: square, finite."""
    from .._util import as_tensor

    k = as_tensor(k, name=name)
    if k.is_complex():
        raise ValueError(f"{name}: a complex Gram matrix is not supported")
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name}: a Gram matrix must be square (N, N), got shape {tuple(k.shape)}")
    k = k.detach().to(torch.float64)
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name}: the Gram matrix holds NaN or infinite entries")
    return k


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K, L), NRK21 eq. 3, for Gram matrices K, L (N, N); a float64 scalar tensor. O(N^2)."""
    k, l = _square(k, "K"), _square(l, "L")
    n = k.shape[0]
    if l.shape[0] != n:
        raise ValueError(f"K is {n} x {n} but L is {l.shape[0]} x {l.shape[0]}")
    check_unbiased_n(n)
    kt = k - torch.diag(torch.diagonal(k))
    lt = l - torch.diag(torch.diagonal(l))
    ks, ls = kt.sum(1), lt.sum(1)
    trace_term = (kt * lt).sum()
    sum_term = ks.sum() * ls.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (ks @ ls)
    return (trace_term + sum_term - cross_term) / (n * (n - 3))


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_0(K, L) = tr(K H L H) / (N-1)^2 for Gram matrices (N, N); a float64 scalar tensor. O(N^2)."""
    k, l = _square(k, "K"), _square(l, "L")
    n = k.shape[0]
    if l.shape[0] != n:
        raise ValueError(f"K is {n} x {n} but L is {l.shape[0]} x {l.shape[0]}")
    if n < 2:
        raise ValueError("the biased HSIC needs at least 2 samples")
    return (double_centre(k) * l).sum() / (n - 1) ** 2


def double_centre(k: torch.Tensor) -> torch.Tensor:
    """H K H for H = I - 11'/N, from row/column means (no H matrix). (N, N) -> (N, N) float64."""
    k = _square(k, "K")
    row = k.mean(1, keepdim=True)
    col = k.mean(0, keepdim=True)
    return (k - row).sub_(col).add_(k.mean())


def u_centre(k: torch.Tensor) -> torch.Tensor:
    """The U-centred matrix of K (Szekely & Rizzo 2014): zero diagonal and, off the diagonal,

    K~_ij - (sum_l K~_il)/(n-2) - (sum_l K~_lj)/(n-2) + (sum_kl K~_kl)/((n-1)(n-2)), K~ = K with a zero
    diagonal. <u_centre(K), u_centre(L)> / (n(n-3)) = HSIC_1(K, L). (N, N) -> (N, N) float64, N >= 4.
    """
    u = _square(k, "K")
    if isinstance(k, torch.Tensor) and u.data_ptr() == k.data_ptr():
        u = u.clone()                                 # never modify the caller's matrix
    n = u.shape[0]
    check_unbiased_n(n)
    u.fill_diagonal_(0.0)
    r = u.sum(1)
    u.sub_(r[:, None] / (n - 2)).sub_(r[None, :] / (n - 2)).add_(float(r.sum()) / ((n - 1) * (n - 2)))
    u.fill_diagonal_(0.0)
    return u


def centred_gram(k: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """The centred form of K whose inner products give HSIC: U-centred (unbiased) or H K H (biased)."""
    _check_estimator(estimator)
    return u_centre(k) if estimator == "unbiased" else double_centre(k)


def hsic_normaliser(n: int, estimator: str = "unbiased") -> float:
    """HSIC(K, L) = <centred_gram(K), centred_gram(L)> / hsic_normaliser(n)."""
    _check_estimator(estimator)
    return float(n * (n - 3)) if estimator == "unbiased" else float((n - 1) ** 2)


def centred_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<A, B> = sum_ij A_ij B_ij without a temporary (float64 scalar tensor)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def hsic_matrix(grams_x, grams_y=None, estimator: str = "unbiased") -> torch.Tensor:
    """HSIC between every pair of Gram matrices (N, N): (len(grams_x), len(grams_y)), float64.

    Each matrix is centred once; all pairs are then one product of the stacked centred matrices.
    """
    _check_estimator(estimator)
    cx = torch.stack([centred_gram(k, estimator).reshape(-1) for k in grams_x])
    cy = cx if grams_y is None else torch.stack([centred_gram(k, estimator).reshape(-1) for k in grams_y])
    return (cx @ cy.T) / hsic_normaliser(grams_x[0].shape[0], estimator)


def hsic(k: torch.Tensor, l: torch.Tensor, estimator: str = "unbiased") -> torch.Tensor:
    """HSIC between Gram matrices K, L (N, N) with the named estimator; a float64 scalar tensor."""
    _check_estimator(estimator)
    return hsic_unbiased(k, l) if estimator == "unbiased" else hsic_biased(k, l)
