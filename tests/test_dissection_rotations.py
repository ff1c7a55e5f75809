"""Haar-random rotations on SO(n) and their powers along the minimal geodesic from I."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

from intertwiners.dissection import random_rotation, rotation_log, rotation_power


def _in_so(q, tol=1e-10):
    q = torch.as_tensor(q, dtype=torch.float64)
    n = q.shape[0]
    return (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < tol and abs(torch.linalg.det(q) - 1) < tol


@given(n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_random_rotation_is_in_so_n(n, seed):
    q = random_rotation(n, torch.Generator().manual_seed(seed))
    assert q.shape == (n, n) and q.dtype == torch.float64
    assert _in_so(q)


def test_random_rotation_is_seeded():
    a = random_rotation(5, torch.Generator().manual_seed(3))
    b = random_rotation(5, torch.Generator().manual_seed(3))
    c = random_rotation(5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _first_entries(sampler, n, count, seed):
    g = torch.Generator().manual_seed(seed)
    return np.array([float(sampler(n, g)[0, 0]) for _ in range(count)])


def test_random_rotation_is_uniform_first_entry_distribution():
    # For Haar Q on SO(n), n >= 2, the first column is uniform on the sphere, so (Q00 + 1) / 2 is
    # Beta((n-1)/2, (n-1)/2). Kolmogorov-Smirnov test, seeded (deterministic).
    n, count = 5, 2000
    x = _first_entries(random_rotation, n, count, seed=0)
    p = scipy.stats.kstest((x + 1) / 2, scipy.stats.beta((n - 1) / 2, (n - 1) / 2).cdf).pvalue
    assert p > 0.01

    # The same test rejects QR without the sign fix (Q00 then always has the sign LAPACK gives it).
    def no_sign_fix(n, g):
        return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]

    y = _first_entries(no_sign_fix, n, count, seed=0)
    assert scipy.stats.kstest((y + 1) / 2, scipy.stats.beta((n - 1) / 2, (n - 1) / 2).cdf).pvalue < 1e-6


def test_random_rotation_trace_moments():
    # Haar on SO(n), n >= 3: E tr Q = 0 and E (tr Q)^2 = 1 (the defining representation is irreducible).
    g = torch.Generator().manual_seed(1)
    tr = np.array([float(torch.trace(random_rotation(4, g))) for _ in range(4000)])
    se = tr.std() / math.sqrt(len(tr))
    assert abs(tr.mean()) < 5 * se
    assert abs((tr**2).mean() - 1.0) < 5 * (tr**2).std() / math.sqrt(len(tr))


def test_random_rotation_rejects_bad_n():
    with pytest.raises(ValueError):
        random_rotation(0)
    with pytest.raises(ValueError):
        random_rotation(2.5)


def _with_minus_ones(n, n_minus, seed):
    """V diag(-1 x n_minus, 1, ...) V^T with a random V in SO(n): eigenvalue -1 of multiplicity n_minus."""
    v = random_rotation(n, torch.Generator().manual_seed(seed))
    d = torch.ones(n, dtype=torch.float64)
    d[:n_minus] = -1
    return v @ torch.diag(d) @ v.T


def _plane_half_turn(n):
    """An exact rotation by pi in the (0, 1) plane, written as a 2x2 rotation block."""
    q = torch.eye(n, dtype=torch.float64)
    c, s = math.cos(math.pi), math.sin(math.pi)
    q[:2, :2] = torch.tensor([[c, -s], [s, c]])
    return q


CASES = {
    "generic": lambda: random_rotation(7, torch.Generator().manual_seed(5)),
    "minus_one_pair": lambda: _with_minus_ones(5, 2, 0),
    "minus_one_four": lambda: _with_minus_ones(6, 4, 1),
    "minus_identity": lambda: -torch.eye(4, dtype=torch.float64),
    "half_turn_block": lambda: _plane_half_turn(4),
    "identity": lambda: torch.eye(3, dtype=torch.float64),
    "so2": lambda: random_rotation(2, torch.Generator().manual_seed(2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_power_endpoints_and_square_root(case):
    q = CASES[case]()
    n = q.shape[0]
    assert torch.equal(rotation_power(q, 0.0), torch.eye(n, dtype=torch.float64))
    assert torch.allclose(rotation_power(q, 1.0), q, atol=1e-12)
    h = rotation_power(q, 0.5)
    assert torch.allclose(h @ h, q, atol=1e-12)
    for a in (0.1, 0.5, 0.9, 1.7):
        p = rotation_power(q, a)
        assert p.dtype == torch.float64 and not p.is_complex()
        assert _in_so(p)


@pytest.mark.parametrize("case", list(CASES))
def test_log_is_skew_with_angles_at_most_pi(case):
    q = CASES[case]()
    a = rotation_log(q)
    assert np.allclose(a, -a.T, atol=1e-12)
    assert np.allclose(scipy.linalg.expm(a), q.numpy(), atol=1e-12)
    # eigenvalues of a skew matrix are +-i*theta; minimal geodesic: every |theta| <= pi
    assert np.abs(np.linalg.eigvals(a).imag).max() <= math.pi + 1e-9


@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(-1.5, 2.5))
def test_power_matches_scipy_expm_logm_for_generic_rotations(seed, alpha):
    # independent slow route: the principal matrix logarithm and the exponential from SciPy
    q = random_rotation(6, torch.Generator().manual_seed(seed)).numpy()
    log = scipy.linalg.logm(q)
    if np.abs(np.imag(log)).max() > 1e-8:  # an angle numerically at pi: no real principal log to compare
        return
    expected = scipy.linalg.expm(alpha * np.real(log))
    assert np.allclose(rotation_power(q, alpha).numpy(), expected, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), a=st.floats(0, 1), b=st.floats(0, 1))
def test_powers_form_a_one_parameter_group(seed, a, b):
    q = _with_minus_ones(6, 2, seed) if seed % 2 else random_rotation(6, torch.Generator().manual_seed(seed))
    lhs = rotation_power(q, a) @ rotation_power(q, b)
    assert torch.allclose(lhs, rotation_power(q, a + b), atol=1e-10)


def test_geodesic_length_scales_with_alpha():
    q = random_rotation(8, torch.Generator().manual_seed(9))
    full = np.linalg.norm(rotation_log(q))
    for a in (0.25, 0.5, 0.75):
        assert np.isclose(np.linalg.norm(rotation_log(rotation_power(q, a))), a * full, rtol=1e-9)


def test_power_accepts_numpy_and_keeps_float32():
    q = random_rotation(4, torch.Generator().manual_seed(0))
    assert torch.allclose(rotation_power(q.numpy(), 0.5), rotation_power(q, 0.5))
    assert rotation_power(q.float(), 0.5).dtype == torch.float32


def test_power_rejects_non_rotations():
    with pytest.raises(ValueError, match="orthogonal"):
        rotation_power(torch.ones(3, 3), 0.5)
    with pytest.raises(ValueError, match="reflection"):
        rotation_power(torch.diag(torch.tensor([-1.0, 1.0, 1.0])), 0.5)
    with pytest.raises(ValueError, match="square"):
        rotation_power(torch.ones(2, 3), 0.5)
    with pytest.raises(ValueError, match="finite"):
        rotation_power(torch.eye(3), float("nan"))
