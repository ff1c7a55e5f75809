"""Section 5 properties as hypothesis tests: (0) range, (i) G_ReLU invariance, (ii) alignment, and the
non-invariances that tell G_ReLU measures from orthogonal ones.

Alignment tolerances are 1e-6: Procrustes returns 1 - delta / (2 sqrt d) and delta = sqrt(rounding) ~ 1e-8.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from intertwiners import similarity as sim

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 5)


def grelu_element(rng, d, spread=1.0):
    """A = P D: a random permutation times a positive diagonal (an element of G_ReLU_d)."""
    return np.eye(d)[rng.permutation(d)] * np.exp(spread * rng.standard_normal(d))[None, :]


def rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def data(seed, d, n_per_d=4, extra=6):
    """Generic features and a noisy, nonlinearly related second set of the same N samples."""
    rng = np.random.default_rng(seed)
    n = n_per_d * d + extra
    X = rng.standard_normal((n, d)) + rng.standard_normal(d)
    Y = np.maximum(X @ rng.standard_normal((d, d)), 0) + 0.3 * rng.standard_normal((n, d))
    return rng, X, Y


def grelu_measures(X, Y, center_procrustes):
    return np.array([sim.grelu_cka(X, Y), sim.grelu_cka(X, Y, estimator="biased"),
                     sim.procrustes(X, Y, "grelu", center=center_procrustes)])


@given(seeds, dims)
def test_invariance_i_grelu_and_translations(seed, d):
    """(i): mu(X A + 1 v', Y B + 1 w') = mu(X, Y) for A, B in G_ReLU (CKA centres columns; Procrustes
    with center=True). Without centring, Procrustes is invariant to A, B alone."""
    rng, X, Y = data(seed, d)
    A, B = grelu_element(rng, d), grelu_element(rng, d)
    v, w = 3 * rng.standard_normal(d), 3 * rng.standard_normal(d)
    np.testing.assert_allclose(grelu_measures(X @ A + v, Y @ B + w, True), grelu_measures(X, Y, True),
                               atol=1e-9)
    assert sim.procrustes(X @ A, Y @ B, "grelu") == pytest.approx(sim.procrustes(X, Y, "grelu"), abs=1e-9)


@given(seeds, dims)
def test_alignment_ii(seed, d):
    """(ii): mu(X, X A + 1 v') = 1 for A in G_ReLU."""
    rng, X, _ = data(seed, d)
    A, v = grelu_element(rng, d), 3 * rng.standard_normal(d)
    np.testing.assert_allclose(grelu_measures(X, X @ A + v, True), 1.0, atol=1e-6)
    assert sim.procrustes(X, X @ A, "grelu") == pytest.approx(1.0, abs=1e-6)


@given(seeds, st.integers(1, 4), st.integers(1, 3))
def test_invariance_and_alignment_on_channels(seed, c, hw):
    """(N, C, H, W) features: the group acts on channels (a per-channel scale, permutation and shift)."""
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.standard_normal((8, c, hw, hw)), 0) + 0.1 * rng.standard_normal((8, c, hw, hw))
    Y = X[:, ::-1] + 0.5 * rng.standard_normal(X.shape)

    def act(Z):
        p, s, t = rng.permutation(c), np.exp(rng.standard_normal(c)), rng.standard_normal(c)
        return Z[:, p] * s[None, :, None, None] + t[None, :, None, None]

    np.testing.assert_allclose(grelu_measures(act(X), act(Y), True), grelu_measures(X, Y, True), atol=1e-9)
    np.testing.assert_allclose(grelu_measures(X, act(X), True), 1.0, atol=1e-6)


@given(seeds, st.integers(2, 5))
def test_range_0(seed, d):
    rng, X, Y = data(seed, d)
    for g in ("orthogonal", "permutation", "grelu"):
        for center in (False, True):
            assert 0.0 <= sim.procrustes(X, Y, g, center=center) <= 1.0
    # the biased estimator with a positive semi-definite kernel (linear, RBF) lies in [0, 1]; the max kernel
    # is not PSD (see test_max_kernel_is_not_positive_semidefinite), so G_ReLU-CKA only lies in [-1, 1]
    # (Cauchy-Schwarz for the Frobenius inner product of the centred Gram matrices), for both estimators.
    for kernel in ("linear", "rbf"):
        assert -1e-12 <= sim.cka(X, Y, kernel, "biased") <= 1.0 + 1e-12
    for estimator in ("biased", "unbiased"):
        assert -1.0 - 1e-12 <= sim.grelu_cka(X, Y, estimator) <= 1.0 + 1e-12


def test_max_kernel_is_not_positive_semidefinite():
    """Lemma 5.5 of the paper claims k(x, y) = max(x * y) is a PSD kernel. It is not, even on
    non-negative vectors: for x = (1, 0), (0, 1), (1, 1) the Gram matrix [[1,0,1],[0,1,1],[1,1,1]] has the
    eigenvalue 1 - sqrt(2). Hence G_ReLU-CKA can be (slightly) negative; this pins that fact down."""
    K = sim.max_kernel(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    np.testing.assert_array_equal(K, [[1, 0, 1], [0, 1, 1], [1, 1, 1]])
    assert np.linalg.eigvalsh(K).min() == pytest.approx(1 - np.sqrt(2))
    # ... and a pair of feature sets with a negative biased G_ReLU-CKA (found by the range test)
    rng = np.random.default_rng(2048)
    X = rng.standard_normal((14, 2)) + rng.standard_normal(2)
    Y = np.maximum(X @ rng.standard_normal((2, 2)), 0) + 0.3 * rng.standard_normal((14, 2))
    assert sim.grelu_cka(X, Y, "biased") < 0


@given(seeds, st.integers(3, 5))
def test_rotation_lowers_grelu_measures_but_not_orthogonal_ones(seed, d):
    """Non-invariance: a random rotation is not in G_ReLU, so the G_ReLU measures drop below 1; the
    orthogonal measures (linear CKA, RBF CKA, orthogonal Procrustes) do not notice it."""
    rng, X, Y = data(seed, d, n_per_d=10)
    Q = rotation(rng, d)
    assert sim.grelu_cka(X, X @ Q) < 0.995
    assert sim.procrustes(X, X @ Q, "grelu", center=True) < 0.995
    assert sim.cka(X, X @ Q) == pytest.approx(1.0, abs=1e-9)
    assert sim.cka(X, X @ Q, "rbf") == pytest.approx(1.0, abs=1e-9)
    assert sim.procrustes(X, X @ Q, "orthogonal") == pytest.approx(1.0, abs=1e-6)
    # orthogonal invariance (i) of the classical measures, with isotropic scaling and translations
    Q2 = rotation(rng, d)
    assert sim.cka(2.5 * X @ Q + 1.0, Y @ Q2 - 2.0) == pytest.approx(sim.cka(X, Y), abs=1e-9)
    assert sim.procrustes(2.5 * X @ Q, Y @ Q2, "orthogonal") == pytest.approx(
        sim.procrustes(X, Y, "orthogonal"), abs=1e-9)


@given(seeds, st.integers(2, 5))
def test_anisotropic_scaling_lowers_linear_cka_but_not_grelu_cka(seed, d):
    """Positive diagonal scalings are in G_ReLU but not in the orthogonal group (times isotropic scaling)."""
    rng, X, _ = data(seed, d, n_per_d=10)
    D = np.diag(np.exp(np.linspace(-3, 3, d)))
    assert sim.cka(X, X @ D) < 0.995
    assert sim.grelu_cka(X, X @ D) == pytest.approx(1.0, abs=1e-9)


@given(seeds, dims)
def test_minibatch_grelu_cka_is_grelu_invariant(seed, d):
    rng, X, Y = data(seed, d, n_per_d=6)
    A, v = grelu_element(rng, d), rng.standard_normal(d)
    m1, m2 = sim.MinibatchCKA(kernel="max"), sim.MinibatchCKA(kernel="max")
    for lo in range(0, len(X) - 4, 8):
        m1.update(X[lo:lo + 8], Y[lo:lo + 8])
        m2.update(X[lo:lo + 8] @ A + v, Y[lo:lo + 8])
    assert m1.compute() == pytest.approx(m2.compute(), abs=1e-9)
