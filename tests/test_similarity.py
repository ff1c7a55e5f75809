"""Similarity measures (paper section 5) against slow, obviously-correct implementations written here."""

import itertools
import math

import numpy as np
import pytest
import torch

from intertwiners import similarity as sim
from intertwiners.similarity.hsic import double_centre, hsic_biased, hsic_unbiased, u_centre
from intertwiners.similarity.max_kernel import max_product_numba, max_product_torch

# ------------------------------------------------------------------------------------------------
# Slow references: explicit H matrices, explicit loops, brute force over permutations.


def slow_hsic_unbiased(K, L):
    """NRK21 eq. 3, transcribed literally with explicit matrices."""
    n = K.shape[0]
    Kt = K - np.diag(np.diag(K))
    Lt = L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def slow_hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def slow_cka(K, L, estimator="unbiased"):
    h = slow_hsic_unbiased if estimator == "unbiased" else slow_hsic_biased
    return h(K, L) / math.sqrt(h(K, K) * h(L, L))


def slow_max_kernel(X, Y):
    K = np.empty((X.shape[0], Y.shape[0]))
    for i in range(X.shape[0]):
        for j in range(Y.shape[0]):
            K[i, j] = max(X[i, k] * Y[j, k] for k in range(X.shape[1]))
    return K


def slow_grelu_gram(X):
    """Definition 5.3: centre and unit-normalise each column/channel, then the max kernel."""
    X = np.asarray(X, dtype=np.float64)
    n, c = X.shape[:2]
    Xs = X.reshape(n, c, -1).copy()
    for ch in range(c):
        Xs[:, ch] -= Xs[:, ch].mean()
        Xs[:, ch] /= np.sqrt((Xs[:, ch] ** 2).sum())
    K = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            K[i, j] = max(float(Xs[i, ch] @ Xs[j, ch]) for ch in range(c))
    return K


def slow_rbf_gram(X, threshold=1.0):
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    n = len(X)
    D = np.array([[((X[i] - X[j]) ** 2).sum() for j in range(n)] for i in range(n)])
    med = np.median([D[i, j] for i in range(n) for j in range(i + 1, n)])
    return np.exp(-D / (2 * threshold ** 2 * med))


def channel_matrix(X):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        return X
    return np.moveaxis(X.reshape(X.shape[0], X.shape[1], -1), 1, 2).reshape(-1, X.shape[1])


def slow_procrustes(X, Y, group, center=False):
    X, Y = channel_matrix(X), channel_matrix(Y)
    if center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    d = X.shape[1]
    if group == "grelu":
        X = X / np.linalg.norm(X, axis=0)
        Y = Y / np.linalg.norm(Y, axis=0)
    else:
        X, Y = X / np.linalg.norm(X), Y / np.linalg.norm(Y)
    if group == "orthogonal":
        U, _, Vt = np.linalg.svd(Y.T @ X)
        Q = U @ Vt                        # argmin_Q |X - Y Q| (Schoenemann)
        delta = np.linalg.norm(X - Y @ Q)
    else:
        delta = min(np.linalg.norm(X - Y[:, list(p)]) for p in itertools.permutations(range(d)))
    return 1 - delta / (2 * math.sqrt(d)) if group == "grelu" else 1 - delta / 2


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------
# HSIC


@pytest.mark.parametrize("n", [4, 5, 11])
def test_hsic_estimators_match_explicit_formulas(rng, n):
    A, B = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    K, L = A @ A.T + 0.3, np.exp(-((B[:, None] - B[None]) ** 2).sum(-1))
    Kt, Lt = torch.tensor(K), torch.tensor(L)
    assert float(hsic_unbiased(Kt, Lt)) == pytest.approx(slow_hsic_unbiased(K, L), rel=1e-10, abs=1e-12)
    assert float(hsic_biased(Kt, Lt)) == pytest.approx(slow_hsic_biased(K, L), rel=1e-10, abs=1e-12)
    # the U-centred and double-centred forms give the same numbers
    assert float((u_centre(Kt) * u_centre(Lt)).sum() / (n * (n - 3))) == pytest.approx(
        slow_hsic_unbiased(K, L), rel=1e-10, abs=1e-12)
    H = np.eye(n) - 1.0 / n
    np.testing.assert_allclose(double_centre(Kt).numpy(), H @ K @ H, atol=1e-12)


def test_hsic_unbiased_is_unbiased_for_independent_features(rng):
    # E[HSIC_1] = 0 under independence: the mean over many small batches is ~0, the biased one is not.
    vals_u, vals_b = [], []
    for _ in range(300):
        A, B = rng.standard_normal((8, 2)), rng.standard_normal((8, 2))
        K, L = torch.tensor(A @ A.T), torch.tensor(B @ B.T)
        vals_u.append(float(hsic_unbiased(K, L)))
        vals_b.append(float(hsic_biased(K, L)))
    se = np.std(vals_u) / np.sqrt(len(vals_u))
    assert abs(np.mean(vals_u)) < 4 * se
    assert np.mean(vals_b) > 4 * np.std(vals_b) / np.sqrt(len(vals_b))


# ------------------------------------------------------------------------------------------------
# Max kernel


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (5, 7, 3), (13, 9, 33), (8, 8, 700), (6, 3, 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_kernel_matches_loops(rng, n, m, d, dtype):
    X, Y = rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((m, d)).astype(dtype)
    ref = slow_max_kernel(X.astype(np.float64), Y.astype(np.float64))
    tol = 0 if dtype == np.float64 else 1e-5
    K = sim.max_kernel(X, Y)
    assert isinstance(K, np.ndarray) and K.shape == (n, m) and K.dtype == dtype
    np.testing.assert_allclose(K, ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(max_product_numba(X), slow_max_kernel(X, X), rtol=tol, atol=tol)
    np.testing.assert_allclose(max_product_torch(torch.tensor(X), torch.tensor(Y), temp_bytes=64).numpy(),
                               ref, rtol=tol, atol=tol)


def test_max_kernel_symmetric_path_equals_general_path(rng):
    X = rng.standard_normal((37, 50))
    np.testing.assert_array_equal(max_product_numba(X), max_product_numba(X, X.copy()))
    K = sim.max_kernel(torch.tensor(X))
    assert isinstance(K, torch.Tensor)
    np.testing.assert_array_equal(K.numpy(), K.numpy().T)


def test_max_kernel_conv_features_max_over_channel_inner_products(rng):
    X, Y = rng.standard_normal((6, 5, 3, 2)), rng.standard_normal((7, 5, 3, 2))
    ref = np.empty((6, 7))
    for i in range(6):
        for j in range(7):
            ref[i, j] = max(float((X[i, c] * Y[j, c]).sum()) for c in range(5))
    np.testing.assert_allclose(sim.max_kernel(X, Y), ref, atol=1e-12)
    np.testing.assert_allclose(sim.max_kernel(X), sim.max_kernel(X, X.copy()), atol=1e-12)
    # 1x1 spatial maps are (N, C) features
    np.testing.assert_allclose(sim.max_kernel(X[:, :, :1, :1]), slow_max_kernel(X[:, :, 0, 0], X[:, :, 0, 0]))


def test_max_kernel_conv_symmetric_row_blocks_and_small_buffers(rng):
    from intertwiners.similarity.max_kernel import max_inner_over_channels
    X = torch.tensor(rng.standard_normal((23, 5, 4)))
    ref = max_inner_over_channels(X, X.clone(), temp_bytes=1 << 30)
    for blocks in (1, 2, 3, 7):
        for temp in (8, 1 << 30):                 # temp=8: one channel per batched matmul
            K = max_inner_over_channels(X, None, temp, blocks).numpy()
            np.testing.assert_allclose(K, ref.numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(K, K.T, rtol=1e-12, atol=1e-12)


def test_max_kernel_shape_mismatch_raises(rng):
    with pytest.raises(ValueError, match="feature shape"):
        sim.max_kernel(rng.standard_normal((4, 3)), rng.standard_normal((4, 5)))


# ------------------------------------------------------------------------------------------------
# CKA


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_linear_and_rbf_cka_match_reference(rng, estimator):
    X = rng.standard_normal((12, 2, 2, 2))
    Y = X.reshape(12, -1)[:, :5] @ rng.standard_normal((5, 3)) + 0.5 * rng.standard_normal((12, 3))
    Xf = X.reshape(12, -1)
    assert sim.cka(X, Y, "linear", estimator) == pytest.approx(
        slow_cka(Xf @ Xf.T, Y @ Y.T, estimator), rel=1e-9)
    assert sim.cka(X, Y, "rbf", estimator) == pytest.approx(
        slow_cka(slow_rbf_gram(X), slow_rbf_gram(Y), estimator), rel=1e-9)
    assert sim.cka(X, Y, "rbf", estimator, threshold=0.5) == pytest.approx(
        slow_cka(slow_rbf_gram(X, 0.5), slow_rbf_gram(Y, 0.5), estimator), rel=1e-9)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("n,dx,dy", [(6, 2, 3), (40, 3, 5), (9, 30, 2)])
def test_linear_cka_feature_route_equals_gram_route(rng, estimator, n, dx, dy):
    X = rng.standard_normal((n, dx)) + 5.0                   # a large mean: no cancellation trouble
    Y = X[:, :1] @ rng.standard_normal((1, dy)) + rng.standard_normal((n, dy))
    ref = slow_cka(X @ X.T, Y @ Y.T, estimator)
    for route in ("features", "gram", "auto"):
        assert sim.cka(X, Y, estimator=estimator, linear_route=route) == pytest.approx(ref, rel=1e-9)
        assert sim.cka(X.astype(np.float32), Y.astype(np.float32), estimator=estimator,
                       linear_route=route) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="linear_route"):
        sim.cka(X, Y, linear_route="fast")


@pytest.mark.parametrize("shape", [(10, 4), (9, 3, 2, 2), (8, 2, 3)])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_grelu_cka_matches_definition_5_3(rng, shape, estimator):
    X = np.maximum(rng.standard_normal(shape), 0) + 0.01 * rng.standard_normal(shape)
    Y = X + 0.7 * rng.standard_normal(shape)
    ref = slow_cka(slow_grelu_gram(X), slow_grelu_gram(Y), estimator)
    assert sim.grelu_cka(X, Y, estimator=estimator) == pytest.approx(ref, rel=1e-9)
    assert sim.cka(X, Y, kernel="max", estimator=estimator) == pytest.approx(ref, rel=1e-9)
    assert sim.grelu_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32),
                         estimator=estimator) == pytest.approx(ref, rel=1e-4)
    assert sim.grelu_cka(X, Y, estimator=estimator, backend="torch") == pytest.approx(ref, rel=1e-9)


def test_cka_of_unrelated_features_is_small_and_of_identical_is_one(rng):
    X, Y = rng.standard_normal((400, 6)), rng.standard_normal((400, 6))
    for kernel in ("linear", "rbf", "max"):
        assert abs(sim.cka(X, Y, kernel)) < 0.1
        assert sim.cka(X, X, kernel) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Procrustes


@pytest.mark.parametrize("group", ["orthogonal", "permutation", "grelu"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("shape", [(9, 4), (5, 3, 2, 2)])
def test_procrustes_matches_brute_force(rng, group, center, shape):
    X = rng.standard_normal(shape) + 0.5
    Y = 0.6 * X[:, ::-1] + rng.standard_normal(shape)
    val = sim.procrustes(X, Y, group=group, center=center)
    assert val == pytest.approx(slow_procrustes(X, Y, group, center), abs=1e-9)
    assert 0.0 <= val <= 1.0


def test_orthogonal_procrustes_is_the_best_rotation(rng):
    X, Y = rng.standard_normal((20, 3)), rng.standard_normal((20, 3))
    best = sim.procrustes(X, Y, "orthogonal")
    Xn, Yn = X / np.linalg.norm(X), Y / np.linalg.norm(Y)
    for _ in range(200):
        Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        assert 1 - np.linalg.norm(Xn - Yn @ Q) / 2 <= best + 1e-12


def test_procrustes_extremes(rng):
    x = np.abs(rng.standard_normal((30, 1)))
    assert sim.procrustes(x, -x, "grelu") == pytest.approx(0.0, abs=1e-12)     # delta = 2 sqrt(d)
    X = np.abs(rng.standard_normal((30, 4)))
    assert sim.procrustes(X, -X, "orthogonal") == pytest.approx(1.0)          # -I is orthogonal
    assert sim.procrustes(X, X, "grelu") == pytest.approx(1.0)


def test_procrustes_large_n_chunks_agree(rng):
    X, Y = rng.standard_normal((1000, 5)), rng.standard_normal((1000, 5))
    for g in ("orthogonal", "grelu"):
        assert sim.procrustes(X, Y, g, chunk_rows=77) == pytest.approx(sim.procrustes(X, Y, g), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Minibatch CKA


@pytest.mark.parametrize("kernel", ["linear", "max"])
def test_minibatch_cka_is_the_ratio_of_mean_per_batch_hsic(rng, kernel):
    X = rng.standard_normal((30, 4))
    Y = X @ rng.standard_normal((4, 3)) + rng.standard_normal((30, 3))
    m = sim.MinibatchCKA(kernel=kernel)
    hs = []
    for lo, hi in [(0, 10), (10, 17), (17, 30)]:
        xb, yb = X[lo:hi], Y[lo:hi]
        m.update(torch.tensor(xb), yb)
        K, L = ((xb @ xb.T, yb @ yb.T) if kernel == "linear" else (slow_grelu_gram(xb), slow_grelu_gram(yb)))
        hs.append((slow_hsic_unbiased(K, L), slow_hsic_unbiased(K, K), slow_hsic_unbiased(L, L)))
    kl, kk, ll = np.mean(hs, axis=0)
    assert m.n_batches == 3 and m.n_samples == 30
    np.testing.assert_allclose(m.hsic_values, (kl, kk, ll), rtol=1e-10)
    assert m.compute() == pytest.approx(kl / math.sqrt(kk * ll), rel=1e-10)
    # one batch is plain CKA
    one = sim.MinibatchCKA(kernel=kernel)
    one.update(X, Y)
    assert one.compute() == pytest.approx(sim.cka(X, Y, kernel), rel=1e-10)
    one.reset()
    with pytest.raises(ValueError, match="before any update"):
        one.compute()


# ------------------------------------------------------------------------------------------------
# Bad input raises, never NaN


def test_bad_input_raises(rng):
    X, Y = rng.standard_normal((10, 3)), rng.standard_normal((10, 3))
    for bad in (np.nan, np.inf, -np.inf):
        Z = X.copy()
        Z[3, 1] = bad
        for f in (lambda a, b: sim.cka(a, b), lambda a, b: sim.grelu_cka(a, b),
                  lambda a, b: sim.procrustes(a, b), lambda a, b: sim.max_kernel(a, b),
                  lambda a, b: sim.MinibatchCKA().update(a, b)):
            with pytest.raises(ValueError, match="NaN or infinite"):
                f(Z, Y)
            with pytest.raises(ValueError, match="NaN or infinite"):
                f(X, torch.tensor(Z))
    with pytest.raises(ValueError, match="samples"):
        sim.cka(X, Y[:9])
    with pytest.raises(ValueError, match="samples"):
        sim.procrustes(X, Y[:9])
    with pytest.raises(ValueError, match="at least 4 samples"):
        sim.cka(X[:3], Y[:3])
    assert math.isfinite(sim.cka(X[:3], Y[:3], estimator="biased"))
    m = sim.MinibatchCKA()
    m.update(X[:5], Y[:5])
    with pytest.raises(ValueError, match="batch 1"):
        m.update(X[5:8], Y[5:8])
    with pytest.raises(ValueError, match="shape"):
        sim.cka(X[:, 0], Y)
    with pytest.raises(ValueError, match="kernel"):
        sim.cka(X, Y, kernel="cosine")
    with pytest.raises(ValueError, match="estimator"):
        sim.cka(X, Y, estimator="debiased")
    with pytest.raises(ValueError, match="group"):
        sim.procrustes(X, Y, group="rotation")
    with pytest.raises(ValueError, match="columns"):
        sim.procrustes(X, Y[:, :2], group="grelu")
    assert 0 <= sim.procrustes(X, Y[:, :2], group="orthogonal") <= 1


def test_dead_units_raise_or_are_dropped(rng):
    X = np.maximum(rng.standard_normal((20, 5)), 0)
    Y = np.maximum(X @ rng.standard_normal((5, 5)), 0)
    Xd = X.copy()
    Xd[:, 2] = 0.0                                 # a dead ReLU unit
    with pytest.raises(ValueError, match=r"dead units.*\[2\].*drop_dead=True"):
        sim.grelu_cka(Xd, Y)
    with pytest.raises(ValueError, match=r"dead units.*\[2\]"):
        sim.procrustes(Xd, Y, group="grelu")
    keep = [0, 1, 3, 4]
    assert sim.grelu_cka(Xd, Y, drop_dead=True) == pytest.approx(sim.grelu_cka(X[:, keep], Y), rel=1e-12)
    assert sim.procrustes(Xd, Y, "grelu", drop_dead=True) == pytest.approx(
        1 - math.sqrt(max(0.0, 9 - 2 * _best_match(X[:, keep], Y))) / (2 * math.sqrt(5)), rel=1e-12)
    # a constant (not zero) column is dead once centred
    Xc = X.copy()
    Xc[:, 4] = 3.0
    with pytest.raises(ValueError, match=r"constant.*\[4\]"):
        sim.grelu_cka(Xc, Y)
    assert sim.procrustes(Xc, Y, "grelu") > 0                  # not centred: the column is fine
    with pytest.raises(ValueError, match=r"constant.*\[4\]"):
        sim.procrustes(Xc, Y, "grelu", center=True)
    # conv features: a dead channel
    Xconv = np.maximum(rng.standard_normal((6, 3, 2, 2)), 0)
    Xconv[:, 1] = 0
    with pytest.raises(ValueError, match=r"channel"):
        sim.grelu_cka(Xconv, Xconv + 1)
    # linear CKA needs no normalisation of columns, but features without any variation raise
    for route in ("features", "gram"):
        with pytest.raises(ValueError, match="identical features"):
            sim.cka(np.ones((20, 3)), Y, linear_route=route)
    with pytest.raises(ValueError, match="Frobenius"):
        sim.procrustes(np.zeros((20, 5)), Y, "orthogonal")


def _best_match(X, Y):
    Xn, Yn = X / np.linalg.norm(X, axis=0), Y / np.linalg.norm(Y, axis=0)
    M = Xn.T @ Yn
    best = -np.inf
    for cols in itertools.permutations(range(Y.shape[1]), X.shape[1]):
        best = max(best, sum(M[i, c] for i, c in enumerate(cols)))
    return best


def test_rbf_with_identical_samples_raises():
    X = np.ones((10, 3))
    X[0] = 2
    with pytest.raises(ValueError, match="median"):
        sim.cka(X, np.random.default_rng(0).standard_normal((10, 2)), kernel="rbf")
