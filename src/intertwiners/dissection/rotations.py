"""Random rotations of a representation basis and fractional powers of them.

``random_rotation(n)`` draws Q uniformly (Haar measure) from SO(n): QR of an n x n standard Gaussian
matrix, columns multiplied by the signs of R's diagonal (Mezzadri 2007; without that fix the
distribution is not uniform), and the last column negated when det Q = -1.

``rotation_power(Q, alpha)`` is Q**alpha = exp(alpha * log Q) along the *minimal geodesic* from I
(alpha = 0) to Q (alpha = 1). It uses the real Schur form Q = Z T Z^T (``scipy.linalg.schur``): for an
orthogonal Q, T is block diagonal with 2x2 rotation blocks (angle theta in (-pi, pi)) and 1x1 blocks
equal to +1 or -1. Each 2x2 block becomes a rotation by ``alpha * theta``; +1 stays 1.

Eigenvalues at -1. Q in SO(n) has an even number of them, and there the minimal geodesic is not
unique (a half-turn in a plane can be reached turning either way, and the -1 eigenvectors can be paired
into planes in many ways). Our choice, deterministic for a given Q: the -1 eigenvectors are taken in
the order of the Schur basis and paired consecutively (1st with 2nd, 3rd with 4th, ...); each pair
(z_i, z_j) is turned by ``+alpha * pi`` from z_i towards z_j. Any such choice is a minimal geodesic
(every angle has modulus <= pi), and the result is real, orthogonal, with det +1 for every alpha.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from .._util import as_tensor

# Tolerance used to decide that Q is orthogonal and that a 1x1 Schur block equals -1.
_ORTHO_TOL = 1e-6


def random_rotation(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                    ) -> torch.Tensor:
    """A matrix (n, n) drawn uniformly (Haar) from SO(n): Q^T Q = I, det Q = +1.

    ``generator`` (a CPU ``torch.Generator``) makes the draw reproducible. The QR factorisation is done
    in float64 and the result cast to ``dtype``.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"random_rotation: n must be a positive integer, got {n!r}")
    n = int(n)
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    q = q * signs  # column j times sign(R_jj): now Haar on O(n)
    if torch.linalg.det(q) < 0:
        q[:, -1] = -q[:, -1]  # a measure-preserving bijection O(n) \ SO(n) -> SO(n)
    return q.to(dtype)


def check_rotation(q, name: str = "Q", tol: float = _ORTHO_TOL) -> np.ndarray:
    """Return ``q`` as a float64 NumPy array after checking it is a square matrix in SO(n)."""
    arr = as_tensor(q, name=name).detach().cpu().double().numpy()
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    err = np.abs(arr.T @ arr - np.eye(arr.shape[0])).max()
    if err > tol * max(1, arr.shape[0]):
        raise ValueError(f"{name} is not orthogonal: max |Q^T Q - I| = {err:.3g}")
    if np.linalg.det(arr) < 0:
        raise ValueError(f"{name} has det -1: it is a reflection, not a rotation (no real power "
                         "connects it to the identity)")
    return arr


def _rotation_angles(t: np.ndarray) -> list[tuple[int, int, float]]:
    """Planes (i, j, theta) of a real Schur form ``t`` of an orthogonal matrix (indices into the Schur basis).

    2x2 blocks give their angle atan2 in (-pi, pi); 1x1 blocks equal to -1 are paired consecutively and
    given the angle +pi. 1x1 blocks equal to +1 are fixed directions and give nothing.
    """
    n = t.shape[0]
    planes: list[tuple[int, int, float]] = []
    minus_ones: list[int] = []
    i = 0
    while i < n:
        if i + 1 < n and abs(t[i + 1, i]) > 0.0:
            # a 2x2 block [[c, -s], [s, c]] (rounding may break the exact symmetry: average it)
            c = 0.5 * (t[i, i] + t[i + 1, i + 1])
            s = 0.5 * (t[i + 1, i] - t[i, i + 1])
            planes.append((i, i + 1, math.atan2(s, c)))
            i += 2
            continue
        if t[i, i] < 0:
            minus_ones.append(i)
        i += 1
    if len(minus_ones) % 2:
        raise ValueError("rotation_power: odd number of eigenvalues at -1 (det Q = -1?)")
    for k in range(0, len(minus_ones), 2):
        planes.append((minus_ones[k], minus_ones[k + 1], math.pi))
    return planes


def rotation_log(q) -> np.ndarray:
    """A real skew-symmetric logarithm A of Q in SO(n) with every rotation angle in [-pi, pi] (float64).

    exp(A) = Q; at eigenvalues -1 the choice is the one described in the module docstring.
    """
    arr = check_rotation(q)
    t, z = scipy.linalg.schur(arr, output="real")
    a = np.zeros_like(arr)
    for i, j, theta in _rotation_angles(t):
        a[j, i], a[i, j] = theta, -theta
    return z @ a @ z.T


def rotation_power(Q, alpha: float) -> torch.Tensor:
    """Q**alpha: the point at time ``alpha`` on the minimal geodesic from I (alpha=0) to Q (alpha=1).

    ``Q``: (n, n) array or tensor in SO(n) (ValueError otherwise). Returns a float64 tensor in SO(n) (its
    dtype is kept when ``Q`` is a floating-point tensor). ``alpha`` may be any real number; the
    experiment of the paper uses 0 <= alpha <= 1. Computed blockwise from the real Schur form, so
    the result is orthogonal to rounding and exactly Q**0 = I.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"rotation_power: alpha must be finite, got {alpha}")
    arr = check_rotation(Q)
    n = arr.shape[0]
    out_dtype = Q.dtype if isinstance(Q, torch.Tensor) and Q.is_floating_point() else torch.float64
    if alpha == 0.0:
        return torch.eye(n, dtype=out_dtype)
    t, z = scipy.linalg.schur(arr, output="real")
    b = np.eye(n)
    for i, j, theta in _rotation_angles(t):
        c, s = math.cos(alpha * theta), math.sin(alpha * theta)
        b[i, i], b[j, j], b[i, j], b[j, i] = c, c, -s, s
    return torch.from_numpy(z @ b @ z.T).to(out_dtype)
