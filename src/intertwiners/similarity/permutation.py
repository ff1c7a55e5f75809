"""Null calibration of a similarity score: is it above what unrelated representations would give?

    r = permutation_test(X, Y, measure="grelu_cka", n_permutations=1000, generator=0)
    r.statistic, r.pvalue, r.null_distribution, r.chance_corrected

The null hypothesis is that the rows of Y are unrelated to the rows of X (the pairing of samples carries
no information). Its distribution is sampled by shuffling the samples of Y, B = ``n_permutations`` times;
the p-value of "more similar than chance" is (1 + #{null >= statistic}) / (1 + B) (valid at every B:
P(p <= alpha) <= alpha under the null). ``chance_corrected`` is statistic - mean(null).

Each statistic is computed once by its own implementation (:func:`.cka.cka_from_grams`,
:func:`.procrustes.procrustes`); the null reuses its pieces:

* CKA (``linear_cka``, ``rbf_cka``, ``grelu_cka``): the Gram matrices K, L and their centred forms K~, L~
  (:func:`.hsic.centred_gram`) are computed once. Shuffling the samples of Y by pi maps L to
  L[pi][:, pi] and, since centring commutes with a permutation of the samples, L~ to L~[pi][:, pi];
  the self-HSICs do not change. So each permuted CKA is one permuted inner product
  sum_ij K~_ij L~_pi(i)pi(j) over the upper triangle (both are symmetric): O(N^2), no new Gram matrix.
* Procrustes (``procrustes_orthogonal``, ``procrustes_permutation``, ``procrustes_grelu``): column sums
  and norms do not change under a shuffle of the samples; only X'Y does, X'Y_pi = X' P Y, one product per
  permutation (in the features' dtype, shared by every group tested at once), evaluated by the same
  :meth:`.procrustes.ProcrustesStats.similarity`. For (N, C, *spatial) features whole samples (images)
  are shuffled, never positions within them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from ..stats import permutation_pvalue
from ._validate import channels_last_matrix, check_pair, check_unbiased_n, to_features
from .cka import cka_from_hsic, degenerate_rtol, gram_scale
from .hsic import _check_estimator, centred_gram, centred_inner, hsic_normaliser
from .kernels import gram
from .procrustes import ProcrustesStats

CKA_KERNELS = {"linear_cka": "linear", "rbf_cka": "rbf", "grelu_cka": "max"}
PROCRUSTES_GROUPS = {"procrustes_orthogonal": "orthogonal", "procrustes_permutation": "permutation",
                     "procrustes_grelu": "grelu"}
MEASURES = tuple(CKA_KERNELS) + tuple(PROCRUSTES_GROUPS)


@dataclass(frozen=True)
class PermutationTestResult:
    """``statistic`` (the measure on X, Y), ``pvalue`` (one-sided, greater), ``null_distribution`` (B,)."""

    statistic: float
    pvalue: float
    null_distribution: np.ndarray
    measure: str

    @property
    def n_permutations(self) -> int:
        return int(self.null_distribution.size)

    @property
    def null_mean(self) -> float:
        return float(self.null_distribution.mean())

    @property
    def chance_corrected(self) -> float:
        """statistic - mean of the null: the part of the score that chance does not explain."""
        return self.statistic - self.null_mean


def permutations(n: int, n_permutations: int, generator=None) -> np.ndarray:
    """(B, n) int64 array of uniform random permutations of range(n).

    ``generator``: None (fresh entropy), an int seed, a ``numpy.random.Generator`` or a ``torch.Generator``.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    if isinstance(generator, torch.Generator):
        keys = torch.rand(n_permutations, n, generator=generator, dtype=torch.float64)
        return torch.argsort(keys, dim=1).numpy().astype(np.int64)
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    return rng.permuted(np.tile(np.arange(n, dtype=np.int64), (n_permutations, 1)), axis=1)


@njit(parallel=True, cache=True, fastmath=False)
def _permuted_inners(kc: np.ndarray, lc: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """out[b] = sum_ij kc[i, j] * lc[p[i], p[j]] for symmetric kc, lc (N, N) and p = perms[b]."""
    n_perm, n = perms.shape
    out = np.empty(n_perm)
    for b in prange(n_perm):
        p = perms[b]
        upper = 0.0
        diag = 0.0
        for i in range(n):
            ki = kc[i]
            li = lc[p[i]]
            diag += ki[i] * li[p[i]]
            acc = 0.0
            for j in range(i + 1, n):
                acc += ki[j] * li[p[j]]
            upper += acc
        out[b] = 2.0 * upper + diag
    return out


def permuted_inners(kc: torch.Tensor, lc: torch.Tensor, perms: np.ndarray) -> np.ndarray:
    """<K~, L~[p][:, p]> for every row p of ``perms`` (B, N); K~, L~ symmetric (N, N). Float64 (B,)."""
    if kc.device.type == "cpu":
        a = np.ascontiguousarray(kc.to(torch.float64).numpy())
        b = np.ascontiguousarray(lc.to(torch.float64).numpy())
        return _permuted_inners(a, b, np.ascontiguousarray(perms, dtype=np.int32))   # int32: less to read
    idx = torch.as_tensor(perms, device=kc.device)
    return np.array([float(centred_inner(kc, lc[p][:, p])) for p in idx])


def _cka_test(x, y, kernel: str, estimator: str, perms: np.ndarray, drop_dead: bool, backend: str):
    """(statistic, null) for CKA with ``kernel``: Gram and centred matrices once, then permuted inner products."""
    _check_estimator(estimator)
    if estimator == "unbiased":
        check_unbiased_n(x.shape[0])
    k = gram(x, kernel, name="X", drop_dead=drop_dead, backend=backend)
    l = gram(y, kernel, name="Y", drop_dead=drop_dead, backend=backend)
    kc, lc = centred_gram(k, estimator), centred_gram(l, estimator)
    norm = hsic_normaliser(k.shape[0], estimator)
    kk, ll = float(centred_inner(kc, kc)) / norm, float(centred_inner(lc, lc)) / norm
    scales = (gram_scale(k) / norm, gram_scale(l) / norm)
    rtol = degenerate_rtol(k.dtype, l.dtype)
    statistic = cka_from_hsic(float(centred_inner(kc, lc)) / norm, kk, ll, estimator, scales=scales, rtol=rtol)
    # the self-HSICs are invariant under the shuffle: CKA_pi = <K~, L~_pi> / norm / sqrt(kk ll)
    null = permuted_inners(kc, lc, perms) / norm / np.sqrt(kk * ll)
    return statistic, null


def _procrustes_test(x, y, groups: tuple[str, ...], center: bool, perms: np.ndarray, drop_dead: bool):
    """{group: (statistic, null)} for Procrustes: moments once; per permutation only X'Y changes, computed
    once for all ``groups`` (in the features' dtype: one gather of Y's samples and one product)."""
    stats = ProcrustesStats()
    stats.update(x, y)
    observed = {g: stats.similarity(g, center=center, drop_dead=drop_dead) for g in groups}
    xm = channels_last_matrix(x)
    ym = channels_last_matrix(y)
    ys = ym.reshape(y.shape[0], -1, ym.shape[1])       # (N, positions, C): whole samples shuffle together
    nulls = {g: np.empty(len(perms)) for g in groups}
    shuffled = copy.copy(stats)
    for b, p in enumerate(torch.as_tensor(perms, device=y.device)):
        shuffled.xty = (xm.T @ ys[p].reshape(ym.shape)).to(torch.float64)
        for g in groups:
            nulls[g][b] = shuffled.similarity(g, center=center, drop_dead=drop_dead)
    return {g: (observed[g], nulls[g]) for g in groups}


def _run(x, y, measures, perms, estimator, center, drop_dead, backend) -> dict[str, PermutationTestResult]:
    """Every measure's test on the same permutations; the Procrustes groups share their X'Y products."""
    out = {m: _cka_test(x, y, CKA_KERNELS[m], estimator, perms, drop_dead, backend)
           for m in measures if m in CKA_KERNELS}
    groups = tuple(PROCRUSTES_GROUPS[m] for m in measures if m in PROCRUSTES_GROUPS)
    if groups:
        found = _procrustes_test(x, y, groups, center, perms, drop_dead)
        out.update({m: found[g] for m, g in PROCRUSTES_GROUPS.items() if g in found})
    return {m: PermutationTestResult(float(t), permutation_pvalue(t, null), null, m) for m, (t, null) in out.items()}


def permutation_test(X, Y, measure: str = "grelu_cka", n_permutations: int = 1000, generator=None, *,
                     estimator: str = "unbiased", center: bool = False, drop_dead: bool = False, device=None,
                     backend: str = "auto") -> PermutationTestResult:
    """Permutation test of "X and Y are more similar than unrelated representations" for ``measure``.

    X, Y: (N, d) or (N, C, *spatial) features of the same N samples (NumPy or torch). ``measure``: one of
    :data:`MEASURES` (``linear_cka``, ``rbf_cka``, ``grelu_cka``, ``procrustes_orthogonal``,
    ``procrustes_permutation``, ``procrustes_grelu``). ``n_permutations`` shuffles of the samples of Y
    drawn from ``generator`` (see :func:`permutations`). ``estimator`` (CKA: unbiased HSIC_1 or biased),
    ``center`` (Procrustes), ``drop_dead`` and ``backend`` as in :func:`.cka.cka` / :func:`.procrustes.procrustes`.

    Returns a :class:`PermutationTestResult` (scipy.stats' names): ``statistic`` equals the measure itself
    (e.g. :func:`.cka.grelu_cka`), ``pvalue`` = (1 + #{null >= statistic}) / (1 + B), ``null_distribution``
    the B permuted values, ``chance_corrected`` = statistic - mean(null). CKA costs its two Gram matrices
    plus O(N^2) per permutation (memory O(N^2)); Procrustes one X'Y product per permutation.
    """
    from .._util import resolve_device

    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    x = to_features(X, "X", None if device is None else resolve_device(device))
    y = to_features(Y, "Y", x.device)     # Y follows X onto its device
    check_pair(x, y)
    if x.shape[0] < 2:
        raise ValueError(f"a permutation test needs at least 2 samples, got {x.shape[0]}")
    perms = permutations(x.shape[0], int(n_permutations), generator)
    return _run(x, y, (measure,), perms, estimator, center, drop_dead, backend)[measure]


def same_layer_tests(model_a, model_b, inputs, sites_a, sites_b=None, measures=("grelu_cka",),
                     n_permutations: int = 1000, n_samples: int | None = 1000, generator=0, *,
                     device: str = "auto", drop_dead: bool = True) -> dict[str, dict[str, list[float]]]:
    """Permutation tests of site k of model A against site k of model B, on the first ``n_samples`` inputs.

    ``inputs``: a dataset with ``.x`` or an (N, ...) tensor. Returns ``{measure: {"pvalue": [...],
    "statistic": [...], "chance_corrected": [...]}}`` with one entry per site pair. Features are extracted
    a few sites at a time (eval mode, :func:`intertwiners.extract_features`), so memory stays bounded.
    """
    from ..features import extract_features

    sites_b = list(sites_a if sites_b is None else sites_b)
    if len(sites_b) != len(sites_a):
        raise ValueError(f"same-layer tests pair sites one to one: {len(sites_a)} and {len(sites_b)} sites")
    x = getattr(inputs, "x", inputs)[:n_samples]
    out = {m: {"pvalue": [], "statistic": [], "chance_corrected": []} for m in measures}
    for m in measures:
        if m not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {m!r}")
    for k in range(0, len(sites_a), 4):
        fa = extract_features(model_a, list(sites_a[k:k + 4]), x, device=device)
        fb = extract_features(model_b, list(sites_b[k:k + 4]), x, device=device)
        for sa, sb in zip(sites_a[k:k + 4], sites_b[k:k + 4]):
            xa, xb = to_features(fa[sa], f"A features at {sa}"), to_features(fb[sb], f"B features at {sb}")
            check_pair(xa, xb)
            perms = permutations(xa.shape[0], int(n_permutations), generator)
            for m, r in _run(xa, xb, measures, perms, "unbiased", False, drop_dead, "auto").items():
                out[m]["pvalue"].append(r.pvalue)
                out[m]["statistic"].append(r.statistic)
                out[m]["chance_corrected"].append(r.chance_corrected)
    return out
