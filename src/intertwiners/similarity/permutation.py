"""Null calibration of a similarity score: is it above what unrelated representations would give?

    r = permutation_test(X, Y, measure="grelu_cka", n_permutations=1000, generator=0)
    r.statistic, r.pvalue, r.null_distribution, r.chance_corrected, r.n_permutations

The null hypothesis is that the rows of Y are unrelated to the rows of X (the pairing of samples carries
no information). Its distribution is sampled by shuffling the samples of Y, B = ``n_permutations`` times;
the p-value of "more similar than chance" is (1 + #{null >= statistic}) / (1 + B) (valid at every B:
P(p <= alpha) <= alpha under the null). ``chance_corrected`` is statistic - mean(null).

``sequential=True`` draws the same permutations in the same order but stops as soon as ``h`` null values
have reached the statistic (Besag & Clifford 1991): p = h / k after k draws, or the fixed-B p-value when
fewer than h of all B reach it (:func:`intertwiners.stats.sequential_pvalue`). A typical (chance-level)
score stops after about h (1 + ln(B / h)) draws; an extreme one runs all B and gets the same p-value as
the fixed test. The null it returns is a prefix of the fixed test's null for the same generator.

Each statistic is computed once by its own implementation (:func:`.cka.cka_from_hsic` on the pieces below,
:class:`.procrustes.ProcrustesStats`); the null reuses those pieces and evaluates permutations in batches:

* CKA through Gram matrices (``rbf_cka``, ``grelu_cka``, and ``linear_cka`` on wide features): K, L and
  their centred forms K~, L~ (:func:`.hsic.centred_gram`) are computed once. Shuffling the samples of Y by
  pi maps L to L[pi][:, pi] and, since centring commutes with a permutation of the samples (U-centring
  subtracts row sums and the total sum, which a shuffle permutes but does not change), L~ to
  L~[pi][:, pi]; the self-HSICs do not change. Each permuted CKA is one re-indexed inner product
  sum_ij K~_ij L~_pi(i)pi(j) over the upper triangle: O(N^2), no new Gram matrix -- a parallel numba loop
  over a batch of permutations on the CPU, a batched gather and contraction on other devices.
* ``linear_cka`` on narrow features (d_x d_y <= :data:`LINEAR_FEATURE_ROUTE` N): HSIC_1 term by term
  (NRK21 eq. 3, as :func:`.cka.cka` computes it without N x N matrices): tr(K~ L~_pi) =
  |X' Y_pi|_F^2 - sum_i K_ii L_pi(i)pi(i), 1'K~_pi 1 = 1'K~1, 1'K~ L~_pi 1 = sum_i r^K_i r^L_pi(i) with r the
  row sums of K~, L~ (permuted, not changed). So a batch of permutations costs one matrix product
  X' [Y_pi1 ... Y_pic] (columns centred once) and two gathered dot products.
* Procrustes (``procrustes_orthogonal``, ``procrustes_permutation``, ``procrustes_grelu``): column sums
  and norms do not change under a shuffle of the samples; only X'Y does, X'Y_pi = X' P Y, computed for a
  batch of permutations as one batched product X' [Y_pi1; ...; Y_pic] (each Y_pi gathers whole samples,
  rows of positions x channels, so the copy is contiguous; in the features' dtype, shared by every group
  tested at once; 1.2-1.9x faster than one product with the permuted copies side by side, whose gather
  copied one channel vector at a time) and evaluated by the same implementation as the statistic
  (:meth:`.procrustes.ProcrustesStats.similarities`: one batched SVD, or one Hungarian solve each). For
  (N, C, *spatial) features whole samples (images) are shuffled, never positions within them.
  With many positions per sample and many permutations, X'Y_pi = sum_i X_i' Y_pi(i) (X_i: sample i's
  positions x channels) is cheaper through the sample-pair blocks T_ij = X_i' Y_j: all of them cost one
  well-shaped product (N^2 P d_x d_y, the price of N permutations the other way, but at several times the
  speed), and then each permutation only sums N gathered d_x x d_y blocks. The blocks are made a band of
  rows at a time (never all N^2 at once). :func:`pairwise_route` says when (``PAIRWISE_POSITIONS``).

Precision: float64 features give every null value to rounding (checked against a loop that calls the
measure on each shuffled Y, to 1e-10); float32 features run the permuted products in float32 (sums in
float64), as the measure computes their Gram matrices, so null values agree with that loop to about 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from .._util import start_numba_threads
from ..stats import permutation_pvalue, sequential_pvalue, sequential_stop
from ._validate import channels_last_matrix, check_pair, check_unbiased_n, check_varies, to_features, unit_scale
from .cka import _linear_hsic_terms, cka_from_hsic, degenerate_rtol, gram_scale
from .hsic import _check_estimator, centred_gram, centred_inner, hsic_normaliser
from .kernels import flatten, gram
from .procrustes import ProcrustesStats

CKA_KERNELS = {"linear_cka": "linear", "rbf_cka": "rbf", "grelu_cka": "max"}
PROCRUSTES_GROUPS = {"procrustes_orthogonal": "orthogonal", "procrustes_permutation": "permutation",
                     "procrustes_grelu": "grelu"}
MEASURES = tuple(CKA_KERNELS) + tuple(PROCRUSTES_GROUPS)
SEQUENTIAL_H = 10            # Besag & Clifford's h: stop once this many null values reach the statistic
# linear CKA's null runs on the features when d_x d_y <= LINEAR_FEATURE_ROUTE * N (one product of
# N d_x d_y per permutation), else on the Gram matrices (N^2 / 2 gathered products, memory bound): on the
# 2-core development machine the two cost the same near d_x d_y = 20 N (benchmarks/bench_permutation_test.py).
LINEAR_FEATURE_ROUTE = 20
BATCH_BYTES = 32 * 2 ** 20   # memory for one batch of permuted copies (features or gathered Gram rows)
# Procrustes nulls through the sample-pair blocks X_i'Y_j once a sample has this many positions and the batch
# holds at least N / 2 permutations: on the 2-core development machine a Myrtle CNN's 16 x 16 layers (N = 400,
# 500 permutations) 2.0-2.7x faster, its 8 x 8 layer 1.1x slower (benchmarks/bench_permutation_test.py)
PAIRWISE_POSITIONS = 128


@dataclass(frozen=True)
class PermutationTestResult:
    """``statistic`` (the measure on X, Y), ``pvalue`` (one-sided, greater), ``null_distribution`` (k,):
    the null values in the order drawn; ``h`` is Besag & Clifford's h for a sequential test (else None)."""

    statistic: float
    pvalue: float
    null_distribution: np.ndarray
    measure: str
    h: int | None = None

    @property
    def n_permutations(self) -> int:
        """How many permutations ran (fewer than asked when a sequential test stopped early)."""
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


# ----------------------------------------------------------------------------------------------------------
# CKA through Gram matrices: re-indexed inner products


@njit(cache=True, fastmath={"reassoc", "contract"})
def _permuted_inner(kc: np.ndarray, lc: np.ndarray, p: np.ndarray) -> float:
    """sum_ij kc[i, j] * lc[p[i], p[j]] for symmetric kc, lc (N, N): the upper triangle twice plus the
    diagonal, products and sums in float64 whatever the matrices' dtype (float32 halves the memory traffic,
    which is what bounds this loop). ``reassoc`` lets LLVM vectorise the inner sum (only the order of the
    float64 additions changes)."""
    n = p.shape[0]
    upper = 0.0
    diag = 0.0
    for i in range(n):
        ki = kc[i]
        li = lc[p[i]]
        diag += np.float64(ki[i]) * np.float64(li[p[i]])
        acc = 0.0
        for j in range(i + 1, n):
            acc += np.float64(ki[j]) * np.float64(li[p[j]])
        upper += acc
    return 2.0 * upper + diag


@njit(parallel=True, cache=True)
def _permuted_inners(kc: np.ndarray, lc: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """out[b] = _permuted_inner(kc, lc, perms[b]), permutations spread over threads."""
    out = np.empty(perms.shape[0])
    for b in prange(perms.shape[0]):
        out[b] = _permuted_inner(kc, lc, perms[b])
    return out


@njit(cache=True)
def _permuted_inners_serial(kc: np.ndarray, lc: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """The same in one thread: for small batches, where waking threads costs more than the work."""
    out = np.empty(perms.shape[0])
    for b in range(perms.shape[0]):
        out[b] = _permuted_inner(kc, lc, perms[b])
    return out


def permuted_inners(kc: torch.Tensor, lc: torch.Tensor, perms: np.ndarray) -> np.ndarray:
    """<K~, L~[p][:, p]> for every row p of ``perms`` (B, N); K~, L~ symmetric (N, N). Float64 (B,).

    CPU: the numba loop (in the matrices' dtype, float64 sums). Other devices: batches of L~[p][:, p]
    gathered under :data:`BATCH_BYTES` and contracted with K~ (one matrix-vector product per batch)."""
    if kc.device.type == "cpu":
        a = np.ascontiguousarray(kc.numpy())
        b = np.ascontiguousarray(lc.numpy())
        parallel = perms.size * a.shape[0] >= 2 ** 20
        if parallel:
            start_numba_threads()
        run = _permuted_inners if parallel else _permuted_inners_serial
        return run(a, b, np.ascontiguousarray(perms, dtype=np.int32))   # int32: less to read
    n = kc.shape[0]
    idx = torch.as_tensor(perms, device=kc.device)
    k64 = kc.reshape(-1).to(torch.float64)
    step = max(1, BATCH_BYTES // (n * n * lc.element_size()))
    out = [(lc[p[:, :, None], p[:, None, :]].reshape(len(p), -1).to(torch.float64) @ k64)
           for p in idx.split(step)]
    return torch.cat(out).cpu().numpy()


class GramNull:
    """CKA with one kernel through its Gram matrices: ``statistic`` and ``null(perms)`` (see module doc)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kernel: str, estimator: str, drop_dead: bool,
                 backend: str):
        k = gram(x, kernel, name="X", drop_dead=drop_dead, backend=backend)
        l = gram(y, kernel, name="Y", drop_dead=drop_dead, backend=backend)
        kc, lc = centred_gram(k, estimator), centred_gram(l, estimator)
        self.norm = hsic_normaliser(k.shape[0], estimator)
        self.kk, self.ll = float(centred_inner(kc, kc)) / self.norm, float(centred_inner(lc, lc)) / self.norm
        scales = (gram_scale(k) / self.norm, gram_scale(l) / self.norm)
        rtol = degenerate_rtol(k.dtype, l.dtype)
        self.statistic = cka_from_hsic(float(centred_inner(kc, lc)) / self.norm, self.kk, self.ll, estimator,
                                       scales=scales, rtol=rtol)
        # the contraction runs in the features' precision (float32 unless either input is float64)
        work = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        self.kc, self.lc = kc.to(work), lc.to(work)

    def null(self, perms: np.ndarray) -> np.ndarray:
        # the self-HSICs are invariant under the shuffle: CKA_pi = <K~, L~_pi> / norm / sqrt(kk ll)
        return permuted_inners(self.kc, self.lc, perms) / self.norm / np.sqrt(self.kk * self.ll)


class LinearFeatureNull:
    """Linear CKA from feature-space products (module doc): ``statistic`` and ``null(perms)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, estimator: str):
        kl, self.kk, self.ll, sk, sl = _linear_hsic_terms(x, y, estimator)
        self.statistic = cka_from_hsic(kl, self.kk, self.ll, estimator, scales=(sk, sl),
                                       rtol=degenerate_rtol(x.dtype, y.dtype))
        self.estimator, self.n = estimator, x.shape[0]
        work = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        # columns centred in float64, then kept in the working dtype; every correction term is computed
        # from exactly those values, so the identities below hold to rounding for the stored features
        xf, yf = flatten(x).to(torch.float64), flatten(y).to(torch.float64)
        self.xc = (xf - xf.mean(0)).to(work)
        self.yc = (yf - yf.mean(0)).to(work)
        x64, y64 = self.xc.to(torch.float64), self.yc.to(torch.float64)
        self.sx, self.sy = x64.sum(0), y64.sum(0)
        self.kdiag, self.ldiag = (x64 * x64).sum(1), (y64 * y64).sum(1)
        self.krow, self.lrow = x64 @ self.sx - self.kdiag, y64 @ self.sy - self.ldiag   # row sums of K~, L~
        self.ksum = float(self.sx @ self.sx) - float(self.kdiag.sum())
        self.lsum = float(self.sy @ self.sy) - float(self.ldiag.sum())

    def null(self, perms: np.ndarray) -> np.ndarray:
        n, dy = self.yc.shape
        idx = torch.as_tensor(perms, device=self.yc.device)
        step = max(1, BATCH_BYTES // (n * dy * self.yc.element_size()))
        out = []
        for p in idx.split(step):
            # X' [Y_p1 ... Y_pc]: one product; Y gathered so that row i of block b is Y[p_b(i)]
            shuffled = self.yc[p.T].reshape(n, -1)
            m = (self.xc.T @ shuffled).reshape(self.xc.shape[1], len(p), dy).transpose(0, 1).to(torch.float64)
            if self.estimator == "biased":       # X'HPY = X'PY - (X'1)(1'Y)/n: H commutes with P
                m = m - torch.outer(self.sx, self.sy)[None] / n
                out.append(torch.linalg.vector_norm(m, dim=(1, 2)) ** 2 / (n - 1) ** 2)
                continue
            fro = torch.linalg.vector_norm(m, dim=(1, 2)) ** 2
            diag = self.ldiag[p] @ self.kdiag
            rows = self.lrow[p] @ self.krow
            out.append((fro - diag + self.ksum * self.lsum / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows)
                       / (n * (n - 3)))
        return torch.cat(out).cpu().numpy() / np.sqrt(self.kk * self.ll)


def cka_null(x: torch.Tensor, y: torch.Tensor, kernel: str, estimator: str, drop_dead: bool, backend: str):
    """The CKA statistic and null evaluator for ``kernel``: the linear kernel on narrow features uses
    feature products, everything else the Gram matrices."""
    _check_estimator(estimator)
    if estimator == "unbiased":
        check_unbiased_n(x.shape[0])
    elif x.shape[0] < 2:
        raise ValueError(f"CKA with the biased estimator needs at least 2 samples, got {x.shape[0]}")
    check_varies(x, "X")
    check_varies(y, "Y")
    x, y = unit_scale(x), unit_scale(y)           # as cka(): scale invariant, so overflow-safe scaling is exact
    if kernel == "linear" and x[0].numel() * y[0].numel() <= LINEAR_FEATURE_ROUTE * x.shape[0]:
        return LinearFeatureNull(x, y, estimator)
    return GramNull(x, y, kernel, estimator, drop_dead, backend)


# ----------------------------------------------------------------------------------------------------------
# Procrustes: one batched X'Y_pi product per batch of permutations


class ProcrustesNull:
    """Procrustes for several groups at once: ``statistics`` and ``null(perms, groups)`` (module doc)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, groups: tuple[str, ...], center: bool, drop_dead: bool):
        x, y = unit_scale(x), unit_scale(y)
        self.stats = ProcrustesStats()
        self.stats.update(x, y)
        self.center, self.drop_dead = center, drop_dead
        self.statistics = {g: self.stats.similarity(g, center=center, drop_dead=drop_dead) for g in groups}
        xm, ym = channels_last_matrix(x), channels_last_matrix(y)     # sample-major rows (N * positions, C)
        n = x.shape[0]
        self.x = xm.reshape(n, xm.shape[0] // n, -1)                   # (N, positions, C_x)
        self.y = ym.reshape(n, xm.shape[0] // n, -1)                   # (N, positions, C_y)

    def null(self, perms: np.ndarray, groups: tuple[str, ...]) -> dict[str, np.ndarray]:
        n, positions, dx = self.x.shape
        idx = torch.as_tensor(perms, device=self.x.device)
        # the float64 X'Y_pi of one batch take 4 BATCH_BYTES at most
        step = max(1, 4 * BATCH_BYTES // (dx * self.y.shape[2] * 8))
        out = {g: [] for g in groups}
        for p in idx.split(step):
            products = pairwise_products if pairwise_route(positions, len(p), n) else batched_products
            xty = products(self.x, self.y, p).to(torch.float64)                     # (b, C_x, C_y)
            for g in groups:
                out[g].append(self.stats.similarities(xty, g, center=self.center, drop_dead=self.drop_dead))
        return {g: np.concatenate(v) for g, v in out.items()}


def pairwise_route(positions: int, permutations: int, n: int) -> bool:
    """Whether :func:`pairwise_products` is the cheaper way to the X'Y_pi of ``permutations`` shuffles of ``n``
    samples with ``positions`` positions each (else :func:`batched_products`)."""
    return positions >= PAIRWISE_POSITIONS and 2 * permutations >= n


def batched_products(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """X'Y_pi for every row pi of ``perms`` (B, N) as batched products: x (N, P, d_x), y (N, P, d_y) (sample,
    position, channel) -> (B, d_x, d_y), where Y_pi's sample i is y[pi(i)]. Block b of a batch holds Y's
    samples in the order pi_b (whole samples copied), so each X'Y_pi is one product."""
    n, positions, dy = y.shape
    xt = x.reshape(n * positions, -1).T.contiguous()                       # (d_x, N * P)
    ys = y.reshape(n, -1)                                                  # (N, P * d_y): one row per sample
    step = max(1, BATCH_BYTES // (ys.numel() * ys.element_size()))
    return torch.cat([torch.matmul(xt, ys[p.reshape(-1)].reshape(len(p), -1, dy)) for p in perms.split(step)])


def pairwise_products(x: torch.Tensor, y: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """:func:`batched_products` through the sample-pair blocks T_ij = x_i' y_j (d_x, d_y): X'Y_pi =
    sum_i T_i,pi(i). The blocks are made for a band of rows i at a time, ``BATCH_BYTES`` at most (with the
    band's gathered blocks for every permutation), as one product (band * d_x, P) @ (P, N * d_y)."""
    n, positions, dx = x.shape
    dy = y.shape[2]
    size = dx * dy * x.element_size()
    band = max(1, min(BATCH_BYTES // (n * size), BATCH_BYTES // (len(perms) * size)))
    xt = x.permute(0, 2, 1).reshape(n * dx, positions)                    # rows (i, channel of x)
    yp = y.permute(1, 0, 2).reshape(positions, n * dy)                    # columns (j, channel of y)
    out = torch.zeros(len(perms), dx, dy, dtype=x.dtype, device=x.device)
    for start in range(0, n, band):
        stop = min(n, start + band)
        blocks = (xt[start * dx:stop * dx] @ yp).view(stop - start, dx, n, dy).permute(0, 2, 1, 3)
        blocks = blocks.reshape((stop - start) * n, dx * dy)              # row i * N + j: T_ij
        rows = torch.arange(stop - start, device=x.device) * n + perms[:, start:stop]    # (B, band): T_i,pi(i)
        out += blocks[rows.reshape(-1)].view(len(perms), stop - start, dx, dy).sum(1)
    return out


# ----------------------------------------------------------------------------------------------------------
# Driving the permutations: fixed B or sequential (Besag & Clifford)


def _sample_nulls(statistics: dict[str, float], evaluate, perms: np.ndarray, h: int | None,
                  batch: int) -> dict[str, np.ndarray]:
    """Null values of every measure on the rows of ``perms``, in order: ``batch`` permutations first, then
    batches twice as large as the one before.

    ``evaluate(perms, measures) -> {measure: values}``. With ``h`` (sequential), a measure stops at the
    draw that brings its h-th null value >= its statistic, and its null is cut there; the others go on.
    """
    found: dict[str, list[np.ndarray]] = {m: [] for m in statistics}
    active = tuple(statistics)
    start = 0
    while start < len(perms):
        values = evaluate(perms[start:start + batch], active)
        start += batch
        batch *= 2       # sequential: each batch doubles, so a long run costs a few large batches
        for m in active:
            found[m].append(values[m])
        if h is not None:
            active = tuple(m for m in active
                           if sequential_stop(statistics[m], np.concatenate(found[m]), h) is None)
            if not active:
                break
    nulls = {m: np.concatenate(v) for m, v in found.items()}
    if h is not None:
        for m, null in nulls.items():
            stop = sequential_stop(statistics[m], null, h)
            nulls[m] = null[:stop] if stop is not None else null
    return nulls


def _run(x, y, measures, perms, estimator, center, drop_dead, backend, h=None) -> dict[str, PermutationTestResult]:
    """Every measure's test on the same permutations; the Procrustes groups share their X'Y products.
    ``h``: a sequential test (Besag & Clifford) with that h; None: all the permutations."""
    batch = len(perms) if h is None else max(2 * h, 32)
    nulls, statistics = {}, {}
    for m in measures:
        if m in CKA_KERNELS:
            test = cka_null(x, y, CKA_KERNELS[m], estimator, drop_dead, backend)
            statistics[m] = test.statistic
            nulls.update(_sample_nulls({m: test.statistic}, lambda p, _, t=test, m=m: {m: t.null(p)}, perms, h,
                                       batch))
    groups = {PROCRUSTES_GROUPS[m]: m for m in measures if m in PROCRUSTES_GROUPS}
    if groups:
        test = ProcrustesNull(x, y, tuple(groups), center, drop_dead)
        stats = {m: test.statistics[g] for g, m in groups.items()}
        statistics.update(stats)

        def evaluate(p, active):
            got = test.null(p, tuple(PROCRUSTES_GROUPS[m] for m in active))
            return {m: got[PROCRUSTES_GROUPS[m]] for m in active}

        nulls.update(_sample_nulls(stats, evaluate, perms, h, batch))
    out = {}
    for m in measures:
        t, null = float(statistics[m]), nulls[m]
        p = permutation_pvalue(t, null) if h is None else sequential_pvalue(t, null, h, len(perms))
        out[m] = PermutationTestResult(t, p, null, m, h)
    return out


def _check_h(sequential: bool, h) -> int | None:
    if not sequential:
        return None
    if isinstance(h, bool) or not isinstance(h, int | np.integer) or h < 1:
        raise ValueError(f"h (stop once h null values reach the statistic) must be a positive integer, got {h!r}")
    return int(h)


def permutation_test(X, Y, measure: str = "grelu_cka", n_permutations: int = 1000, generator=None, *,
                     sequential: bool = False, h: int = SEQUENTIAL_H, estimator: str = "unbiased",
                     center: bool = False, drop_dead: bool = False, device=None,
                     backend: str = "auto") -> PermutationTestResult:
    """Permutation test of "X and Y are more similar than unrelated representations" for ``measure``.

    X, Y: (N, d) or (N, C, *spatial) features of the same N samples (NumPy or torch). ``measure``: one of
    :data:`MEASURES` (``linear_cka``, ``rbf_cka``, ``grelu_cka``, ``procrustes_orthogonal``,
    ``procrustes_permutation``, ``procrustes_grelu``). ``n_permutations`` shuffles of the samples of Y
    drawn from ``generator`` (see :func:`permutations`). ``sequential=True``: the same shuffles in the same
    order, stopping once ``h`` null values reach the statistic (Besag & Clifford 1991; see the module doc);
    ``n_permutations`` is then the most that run. ``estimator`` (CKA: unbiased HSIC_1 or biased),
    ``center`` (Procrustes), ``drop_dead`` and ``backend`` as in :func:`.cka.cka` / :func:`.procrustes.procrustes`.

    Returns a :class:`PermutationTestResult` (scipy.stats' names): ``statistic`` equals the measure itself
    (e.g. :func:`.cka.grelu_cka`), ``pvalue`` = (1 + #{null >= statistic}) / (1 + B) (sequential and
    stopped after k draws: h / k), ``null_distribution`` the permuted values (``n_permutations`` of them),
    ``chance_corrected`` = statistic - mean(null). CKA costs its two Gram matrices (or, for linear CKA on
    narrow features, feature products) plus O(N^2) (or O(N d_x d_y)) per permutation; Procrustes one
    X'Y product per permutation.
    """
    from .._util import resolve_device

    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    hh = _check_h(sequential, h)
    x = to_features(X, "X", None if device is None else resolve_device(device))
    y = to_features(Y, "Y", x.device)     # Y follows X onto its device
    check_pair(x, y)
    if x.shape[0] < 2:
        raise ValueError(f"a permutation test needs at least 2 samples, got {x.shape[0]}")
    perms = permutations(x.shape[0], int(n_permutations), generator)
    return _run(x, y, (measure,), perms, estimator, center, drop_dead, backend, hh)[measure]


def same_layer_tests(model_a, model_b, inputs, sites_a, sites_b=None, measures=("grelu_cka",),
                     n_permutations: int = 1000, n_samples: int | None = 1000, generator=0, *,
                     device: str = "auto", drop_dead: bool = True, sequential: bool = False,
                     h: int = SEQUENTIAL_H) -> dict[str, dict[str, list]]:
    """Permutation tests of site k of model A against site k of model B, on the first ``n_samples`` inputs.

    ``inputs``: a dataset with ``.x`` or an (N, ...) tensor. Returns ``{measure: {"pvalue": [...],
    "statistic": [...], "chance_corrected": [...], "permutations": [...]}}`` with one entry per site pair
    (``permutations``: how many ran; fewer than ``n_permutations`` only when ``sequential`` stopped early,
    see :func:`permutation_test`). Features are extracted a few sites at a time (eval mode,
    :func:`intertwiners.extract_features`), so memory stays bounded.
    """
    from ..features import extract_features

    sites_b = list(sites_a if sites_b is None else sites_b)
    if len(sites_b) != len(sites_a):
        raise ValueError(f"same-layer tests pair sites one to one: {len(sites_a)} and {len(sites_b)} sites")
    hh = _check_h(sequential, h)
    x = getattr(inputs, "x", inputs)[:n_samples]
    out = {m: {"pvalue": [], "statistic": [], "chance_corrected": [], "permutations": []} for m in measures}
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
            for m, r in _run(xa, xb, measures, perms, "unbiased", False, drop_dead, "auto", hh).items():
                out[m]["pvalue"].append(r.pvalue)
                out[m]["statistic"].append(r.statistic)
                out[m]["chance_corrected"].append(r.chance_corrected)
                out[m]["permutations"].append(r.n_permutations)
    return out
