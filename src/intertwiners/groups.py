"""Intertwiner groups of elementwise activations (paper §3.1, Lemma 3.1, Table 1).

For an elementwise activation sigma the intertwiner group is

    G_sigma = {A in GL_n : sigma(A x) = B sigma(x) for all x, for some B in GL_n},

and ``phi_sigma(A) = sigma(A) sigma(I_n)^-1`` is the B that goes with A (Lemma 3.1; the group is only
defined when sigma(I_n) is invertible). :func:`intertwiner_group` uses exact rules for the activation names
and the built-in ``torch.nn`` activation modules, in-place or not, for every setting of their parameters
(:func:`module_rule`; e.g. ``Hardtanh(-10, 10)`` is odd but not linear); any other callable is classified
from elementary properties checked numerically on copies of probes spanning 1e-6 … 1e6
(:func:`activation_properties`). Both follow these rules:

* sigma linear (sigma(x) = a x)                       -> ``general_linear``, phi(A) = A;
* sigma affine, not linear (a x + c, c != 0)           -> ``unit_row_sum`` {A : A 1 = 1}, phi(A) = A;
* otherwise G_sigma consists of monomial matrices A = P·D. A diagonal entry c is allowed when
  sigma(c x) = b(c) sigma(x) for all x, and then phi(P·D) = P·diag(b(D)):

  - positively homogeneous of degree k and neither even nor odd -> ``positive_scaled_permutation``,
    b(c) = c**k (ReLU, LeakyReLU with slope != ±1);
  - positively homogeneous of degree k and even or odd -> ``scaled_permutation``,
    b(c) = |c|**k, times sign(c) when sigma is odd (x**3: A⊙A⊙A; |x| and x**2: abs(A)⊙k);
  - not homogeneous but even (b = 1) or odd (b(c) = c) -> ``signed_permutation``
    (Gaussian/RBF: abs(A); tanh: A);
  - none of these -> ``permutation`` (sigmoid, GELU, SiLU, ELU, softplus).

  sigma(c·0) = b(c) sigma(0) forces b = 1 whenever sigma(0) != 0, so in every case the closed form
  P·diag(b(D)) equals Lemma 3.1's sigma(A) sigma(I)^-1 (the tests check this).

Only the six kinds below are considered. An exotic sigma whose allowed scalings form some other subgroup
of the non-zero reals (e.g. only powers of 2) is given the largest of the six kinds contained in its group,
so a returned element is always a true symmetry.

The kinds, with their inclusions (a partial order; :func:`meet_kind` gives intersections)::

    permutation ⊂ signed_permutation ⊂ scaled_permutation ⊂ general_linear
    permutation ⊂ positive_scaled_permutation ⊂ scaled_permutation
    permutation ⊂ unit_row_sum ⊂ general_linear
    (unit_row_sum ∩ scaled_permutation = permutation)

Monomial convention (used throughout the library, e.g. by :mod:`intertwiners.symmetries`)
------------------------------------------------------------------------------------------
A monomial matrix is stored as ``(perm, scale)``: ``perm`` a LongTensor (n,) holding a permutation of
0..n-1 and ``scale`` a float Tensor (n,) with non-zero entries. It stands for A = P·D with D = diag(scale)
and P[perm[j], j] = 1, i.e.

    A[perm[j], j] = scale[j]        and        (A x)[perm[j]] = scale[j] * x[j].

So column j of A has its single non-zero entry in row perm[j]; ``A @ x == (scale * x)[argsort(perm)]``.
:func:`monomial_matrix` builds A, :func:`as_monomial` reads (perm, scale) back, :func:`monomial_compose`
and :func:`monomial_inverse` multiply and invert in that form, and ``G.scale_map(scale)`` gives b(scale),
so that phi(P·D) = P·diag(b(scale)), i.e. ``(perm, G.scale_map(scale))``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ._util import as_tensor

KINDS = ("permutation", "signed_permutation", "positive_scaled_permutation", "scaled_permutation",
         "unit_row_sum", "general_linear")
"""The six kinds of intertwiner group, smallest first (see the module docstring for the inclusions)."""

MONOMIAL_KINDS = ("permutation", "signed_permutation", "positive_scaled_permutation", "scaled_permutation")

# The kinds that contain each kind (reflexive): KIND_SUPERSETS[k] = {k' : k ⊆ k'}.
_SUPERSETS = {
    "permutation": set(KINDS),
    "signed_permutation": {"signed_permutation", "scaled_permutation", "general_linear"},
    "positive_scaled_permutation": {"positive_scaled_permutation", "scaled_permutation", "general_linear"},
    "scaled_permutation": {"scaled_permutation", "general_linear"},
    "unit_row_sum": {"unit_row_sum", "general_linear"},
    "general_linear": {"general_linear"},
}

_DESCRIPTIONS = {
    "general_linear": "GL_n: every invertible n×n matrix",
    "unit_row_sum": "invertible A with unit row sums (A·1 = 1)",
    "permutation": "P, a permutation matrix",
    "signed_permutation": "P·D, D diagonal with entries in {±1}",
    "positive_scaled_permutation": "P·D, D diagonal with positive entries",
    "scaled_permutation": "P·D, D diagonal with non-zero entries",
}


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown group kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def kind_leq(a: str, b: str) -> bool:
    """True when every matrix of kind ``a`` is of kind ``b`` (a ⊆ b)."""
    return _check_kind(b) in _SUPERSETS[_check_kind(a)]


def meet_kind(*kinds: str) -> str:
    """The kind of the intersection of groups of the given kinds (the largest kind below all of them)."""
    if not kinds:
        raise ValueError("meet_kind needs at least one kind")
    for k in kinds:
        _check_kind(k)
    # the common lower bounds, then the largest of them (the lower bounds always form a chain here)
    lower = [k for k in KINDS if all(kind_leq(k, other) for other in kinds)]
    best = lower[0]
    for k in lower[1:]:
        if kind_leq(best, k):
            best = k
    return best


# ----------------------------------------------------------------------------------------------------
# Monomial matrices in (perm, scale) form
# ----------------------------------------------------------------------------------------------------

def _check_monomial_args(perm: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = as_tensor(perm, name="perm").long()
    scale = as_tensor(scale, name="scale")
    if not scale.is_floating_point():
        scale = scale.to(torch.float64)
    if perm.ndim != 1 or scale.shape != perm.shape:
        raise ValueError(f"perm and scale must both have shape (n,), got {tuple(perm.shape)} and "
                         f"{tuple(scale.shape)}")
    n = perm.numel()
    if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
        raise ValueError("perm must be a permutation of 0..n-1")
    return perm, scale


def monomial_matrix(perm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The (n, n) matrix A = P·diag(scale) with A[perm[j], j] = scale[j] (dtype and device of ``scale``)."""
    perm, scale = _check_monomial_args(perm, scale)
    n = perm.numel()
    A = torch.zeros(n, n, dtype=scale.dtype, device=scale.device)
    A[perm.to(scale.device), torch.arange(n, device=scale.device)] = scale
    return A


def as_monomial(A: torch.Tensor, atol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an (n, n) monomial matrix as ``(perm, scale)`` (A[perm[j], j] = scale[j]).

    Entries with ``|a| <= atol`` count as zero; every column and every row must then hold exactly one
    non-zero entry, otherwise ValueError.
    """
    A = as_tensor(A, name="A")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        A = A.to(torch.float64)
    n = A.shape[0]
    fast = _exact_monomial(A, atol)
    if fast is not None:
        return fast
    magnitude = A.abs()
    if not torch.isfinite(magnitude.sum()):
        raise ValueError("matrix has non-finite entries")
    nonzero = magnitude > atol
    if not (nonzero.sum(0) == 1).all() or not (nonzero.sum(1) == 1).all():
        raise ValueError("matrix is not monomial (each row and each column needs exactly one non-zero entry)")
    perm = nonzero.to(torch.float32).argmax(0).long()
    scale = A[perm, torch.arange(n, device=A.device)]
    return perm.cpu(), scale


def _exact_monomial(A: torch.Tensor, atol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(perm, scale) when A has exactly n non-zero entries, one per row and column, all finite and above
    ``atol`` (two passes over A instead of several: the common case of a sampled element); None otherwise."""
    n = A.shape[0]
    if int(torch.count_nonzero(A)) != n:
        return None
    rows, cols = A.nonzero(as_tuple=True)    # NaN and inf count as non-zero
    if not (torch.bincount(cols, minlength=n) == 1).all() or not (torch.bincount(rows, minlength=n) == 1).all():
        return None
    perm = torch.empty(n, dtype=torch.long, device=A.device)
    perm[cols] = rows
    scale = A[perm, torch.arange(n, device=A.device)]
    if not (torch.isfinite(scale).all() and (scale.abs() > atol).all()):
        return None
    return perm.cpu(), scale


def monomial_compose(first: tuple[torch.Tensor, torch.Tensor],
                     second: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, scale) of the product A1·A2 where ``first`` = A1 and ``second`` = A2 (A2 acts first)."""
    p1, s1 = _check_monomial_args(*first)
    p2, s2 = _check_monomial_args(*second)
    if p1.numel() != p2.numel():
        raise ValueError(f"monomial sizes differ: {p1.numel()} and {p2.numel()}")
    return p1[p2], s1[p2.to(s1.device)] * s2


def monomial_inverse(perm: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, scale) of A^-1 for A = P·diag(scale)."""
    perm, scale = _check_monomial_args(perm, scale)
    if (scale == 0).any():
        raise ValueError("a monomial matrix with a zero scale is not invertible")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    new_scale = torch.empty_like(scale)
    new_scale[perm.to(scale.device)] = 1.0 / scale
    return inv, new_scale


# ----------------------------------------------------------------------------------------------------
# The group object
# ----------------------------------------------------------------------------------------------------

def _power_text(base: str, d: float) -> str:
    if d == 1:
        return base
    if float(d).is_integer() and 2 <= d <= 4:
        return "⊙".join([base] * int(d))
    return f"{base}^⊙{int(d) if float(d).is_integer() else d}"


def _scale_text(kind: str, degree: float, odd: bool) -> str:
    """phi's rule as text, e.g. 'A', 'abs(A)', 'A⊙A⊙A' (b(c) = |c|**degree · sign(c)**odd)."""
    if kind in ("general_linear", "unit_row_sum", "permutation"):
        return "A"
    if kind == "signed_permutation":
        return "A" if odd else "abs(A)"
    if degree == 0:
        return "sign(A)" if (odd and kind == "scaled_permutation") else "P (the support of A)"
    if kind == "positive_scaled_permutation":
        return _power_text("A", degree)
    if float(degree).is_integer() and (int(degree) % 2 == 1) == odd:
        return _power_text("A", degree)  # b(c) = c**d exactly
    inner = _power_text("abs(A)", degree)
    return f"sign(A)⊙{inner}" if odd else inner


@dataclass(frozen=True)
class IntertwinerGroup:
    """G_sigma and phi_sigma for one activation (see the module docstring).

    ``kind`` is one of :data:`KINDS`. For monomial kinds phi(P·D) = P·diag(b(D)) with
    b(c) = |c|**degree · (sign(c) if odd else 1); for ``general_linear`` and ``unit_row_sum``
    phi(A) = A (degree 1, odd). ``sigma0``/``sigma1`` are sigma(0) and sigma(1) when the group comes
    from an activation (they decide for which n sigma(I_n) is invertible); None for constraint groups
    built with :func:`kind_group`.
    """

    kind: str
    name: str
    degree: float = 1.0
    odd: bool = True
    sigma: Callable | None = field(default=None, compare=False, repr=False)
    sigma0: float | None = None
    sigma1: float | None = None

    def __post_init__(self):
        _check_kind(self.kind)

    # -- descriptions ---------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        """Human-readable group, e.g. 'P·D, D diagonal with positive entries'."""
        return _DESCRIPTIONS[self.kind]

    @property
    def phi_rule(self) -> str:
        """phi as text, e.g. 'A', 'abs(A)', 'A⊙A⊙A'."""
        return _scale_text(self.kind, self.degree, self.odd)

    @property
    def is_monomial(self) -> bool:
        """True when every element is a monomial matrix P·D."""
        return self.kind in MONOMIAL_KINDS

    def __str__(self) -> str:
        return f"G_{self.name}: {self.kind} ({self.description}); phi(A) = {self.phi_rule}"

    # -- sizes ----------------------------------------------------------------------------------------
    def check_size(self, n: int) -> int:
        """Validate n; ValueError when sigma(I_n) is singular (then the group is undefined for this n)."""
        if int(n) != n or n < 1:
            raise ValueError(f"group size must be a positive integer, got {n!r}")
        n = int(n)
        if self.sigma0 is not None and self.sigma1 is not None:
            s0, s1 = self.sigma0, self.sigma1
            # sigma(I_n) = s0·J + (s1 - s0)·I has eigenvalues s1 - s0 (n-1 times) and s1 + (n-1)·s0
            eigs = [s1 + (n - 1) * s0] + ([s1 - s0] if n > 1 else [])
            scale = max(abs(s0), abs(s1), 1e-300)
            if min(abs(e) for e in eigs) <= 1e-9 * scale:
                raise ValueError(f"sigma(I_{n}) is singular for {self.name} (sigma(0)={s0:g}, "
                                 f"sigma(1)={s1:g}); the intertwiner group is undefined "
                                 "(Lemma 3.1 needs sigma(I_n) invertible)")
        return n

    def dimension(self, n: int) -> int:
        """Dimension of G as a Lie group in GL_n: n² (GL), n²-n (unit row sums), n (scalings), 0 (finite)."""
        n = self.check_size(n)
        return {"general_linear": n * n, "unit_row_sum": n * n - n, "positive_scaled_permutation": n,
                "scaled_permutation": n}.get(self.kind, 0)

    # -- scalings -------------------------------------------------------------------------------------
    def allows_scale(self, scale: torch.Tensor, atol: float = 1e-6) -> bool:
        """True when every entry of ``scale`` is an allowed diagonal entry of a monomial element."""
        scale = as_tensor(scale, name="scale")
        if not scale.is_floating_point():
            scale = scale.to(torch.float64)
        if not torch.isfinite(scale).all():
            return False
        if self.kind == "permutation" or self.kind == "unit_row_sum":
            return bool(((scale - 1).abs() <= atol).all())
        if self.kind == "signed_permutation":
            return bool(((scale.abs() - 1).abs() <= atol).all())
        if self.kind == "positive_scaled_permutation":
            return bool((scale > atol).all())
        return bool((scale.abs() > atol).all())  # scaled_permutation, general_linear

    def scale_map(self, scale: torch.Tensor) -> torch.Tensor:
        """b(scale): phi(P·diag(scale)) = P·diag(b(scale)). Elementwise; ValueError on disallowed entries."""
        scale = as_tensor(scale, name="scale")
        if not scale.is_floating_point():
            scale = scale.to(torch.float64)
        if not self.allows_scale(scale):
            raise ValueError(f"scale has entries outside {self.kind} (allowed: {self.description})")
        if self.kind in ("permutation", "unit_row_sum"):
            return torch.ones_like(scale)
        if self.kind == "signed_permutation":
            return torch.sign(scale) if self.odd else torch.ones_like(scale)
        out = scale.abs() ** self.degree
        return out * torch.sign(scale) if self.odd else out

    # -- membership and phi ---------------------------------------------------------------------------
    def _matrix(self, A) -> torch.Tensor:
        A = as_tensor(A, name="A")
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            A = A.to(torch.float64)
        if not torch.isfinite(A).all():
            raise ValueError("matrix has non-finite entries")
        self.check_size(A.shape[0])
        return A

    def _why_not(self, A: torch.Tensor, atol: float, monomial: list | None = None) -> str | None:
        """None when A is in G, else the reason. For monomial kinds, (perm, scale) is put in ``monomial``."""
        if self.is_monomial:
            try:
                perm, scale = as_monomial(A, atol)
            except ValueError as err:
                return str(err)
            if not self.allows_scale(scale, atol):
                return f"its diagonal factor has entries outside {self.description}"
            if monomial is not None:
                monomial[:] = [perm, scale]
            return None
        sv = torch.linalg.svdvals(A.to(torch.float64))
        if sv.min() <= atol * max(1.0, float(sv.max())):
            return "matrix is singular (not in GL_n)"
        if self.kind == "unit_row_sum":
            err = float((A.sum(1) - 1).abs().max())
            if err > atol:
                return f"row sums differ from 1 by up to {err:.3g}"
        return None

    def contains(self, A, atol: float = 1e-6) -> bool:
        """True when the square matrix A lies in G (up to ``atol``)."""
        try:
            A = self._matrix(A)
        except ValueError:
            return False
        return self._why_not(A, atol) is None

    def phi(self, A, atol: float = 1e-6) -> torch.Tensor:
        """phi_sigma(A) as an (n, n) tensor (dtype and device of A); ValueError if A is not in G."""
        A = self._matrix(A)
        monomial: list = []
        reason = self._why_not(A, atol, monomial)
        if reason is not None:
            raise ValueError(f"A is not in G_{self.name} ({self.kind}): {reason}")
        if not self.is_monomial:
            return A.clone()
        perm, scale = monomial
        return monomial_matrix(perm, self.scale_map(scale))

    def phi_monomial(self, perm: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi in (perm, scale) form: (perm, b(scale))."""
        perm, scale = _check_monomial_args(perm, scale)
        self.check_size(perm.numel())
        return perm, self.scale_map(scale)

    # -- sampling -------------------------------------------------------------------------------------
    def sample_monomial(self, n: int, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """A random monomial element (perm, scale) (CPU tensors).

        The permutation is uniform; scalings are log-normal, exp(z) with z ~ N(0, 1), and signs are
        uniform where the kind allows them. For ``general_linear``/``unit_row_sum`` the monomial part of
        the group is sampled (scaled permutations, respectively permutations).
        """
        n = self.check_size(n)
        perm = torch.randperm(n, generator=generator)
        ones = torch.ones(n, dtype=dtype)
        kind = {"general_linear": "scaled_permutation",
                "unit_row_sum": "permutation"}.get(self.kind, self.kind)
        if kind == "permutation":
            return perm, ones
        sign = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0).to(dtype)
        if kind == "signed_permutation":
            return perm, sign
        magnitude = torch.exp(torch.randn(n, generator=generator, dtype=torch.float64)).to(dtype)
        if kind == "positive_scaled_permutation":
            return perm, magnitude
        return perm, sign * magnitude

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A random element of G as an (n, n) matrix.

        General linear: U·diag(s)·V with U, V random orthogonal and singular values s = exp(u),
        u ~ U(-1/2, 1/2), so the condition number is at most e. Unit row sums: such a matrix M shifted to
        M + (1 - M·1)·1ᵀ/n (then A·1 = 1), redrawn until its smallest singular value exceeds 0.1.
        Monomial kinds: :meth:`sample_monomial`.
        """
        n = self.check_size(n)
        if self.is_monomial:
            return monomial_matrix(*self.sample_monomial(n, generator, dtype))
        for _ in range(100):
            u = _random_orthogonal(n, generator)
            v = _random_orthogonal(n, generator)
            s = torch.exp(torch.rand(n, generator=generator, dtype=torch.float64) - 0.5)
            M = u @ torch.diag(s) @ v
            if self.kind == "general_linear":
                return M.to(dtype)
            if n == 1:
                return torch.ones(1, 1, dtype=dtype)
            A = M + (1 - M.sum(1, keepdim=True)) / n
            if torch.linalg.svdvals(A).min() > 0.1:
                return A.to(dtype)
        raise RuntimeError("could not draw a well-conditioned unit-row-sum matrix")  # pragma: no cover

    # -- subgroups ------------------------------------------------------------------------------------
    def restrict(self, kind: str) -> IntertwinerGroup:
        """The intersection of G with the group of ``kind``, keeping phi (e.g. relu -> "permutation")."""
        new_kind = meet_kind(self.kind, kind)
        if new_kind == self.kind:
            return self
        degree, odd = self.degree, self.odd
        if self.kind in ("general_linear", "unit_row_sum"):
            degree, odd = 1.0, True  # phi(A) = A on every subgroup
        return replace(self, kind=new_kind, degree=degree, odd=odd)


def kind_group(kind: str, name: str | None = None) -> IntertwinerGroup:
    """The group of ``kind`` with phi(A) = A: a constraint from an operation that commutes with it.

    E.g. ``kind_group("positive_scaled_permutation", "max_pool")`` for max-pooling, ``kind_group(
    "permutation", "layer_norm")`` for LayerNorm. No sigma: every size n is allowed.
    """
    return IntertwinerGroup(kind=_check_kind(kind), name=name or kind, degree=1.0, odd=True)


def intersection(*groups: IntertwinerGroup) -> IntertwinerGroup:
    """The intersection of several groups acting on one space; phi is the FIRST group's phi.

    The kind is :func:`meet_kind` of the kinds. Put the activation's group first so that phi is the
    activation's; later groups only constrain which elements are allowed. The sigma(I_n) condition
    of every group that has one is kept (an n singular for any of them is rejected).
    """
    if not groups:
        raise ValueError("intersection needs at least one group")
    first = groups[0]
    result = first.restrict(meet_kind(*(g.kind for g in groups)))
    if len(groups) > 1:
        result = replace(result, name=" ∩ ".join(g.name for g in groups))
    others = [g for g in groups[1:] if g.sigma0 is not None]
    if others:
        result = _Intersection(**{f: getattr(result, f) for f in
                                  ("kind", "name", "degree", "odd", "sigma", "sigma0", "sigma1")},
                               others=tuple(others))
    return result


@dataclass(frozen=True)
class _Intersection(IntertwinerGroup):
    """An intersection that must also respect other groups' sigma(I_n) condition."""

    others: tuple = ()

    def check_size(self, n: int) -> int:
        for g in self.others:
            g.check_size(n)
        return super().check_size(n)


def _random_orthogonal(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Haar-random orthogonal (n, n) float64 matrix: QR of a Gaussian with the sign fix."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(n, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Deriving the group of an activation: numerically, for any elementwise callable
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Properties:
    """The elementary properties of sigma found by :func:`activation_properties` (all checked numerically)."""

    sigma0: float
    sigma1: float
    linear: bool
    affine: bool
    even: bool
    odd: bool
    degree: float | None  # degree k of positive homogeneity sigma(c x) = c**k sigma(x), c > 0; None if none


_RTOL = 1e-9
"""Relative tolerance of every numerical property check (float64 evaluation)."""

CORE = 6.0
"""sigma must be finite on [-CORE, CORE]; beyond it, points where sigma overflows are left out of the checks."""

PROBE_DECADES = (-6, 6)
"""Probe points reach from 10**-6 to 10**6 in magnitude (both signs), so a breakpoint far from 0
(``Hardtanh(-10, 10)``, a clamp at 1e5) is seen."""


def probe_points() -> torch.Tensor:
    """The float64 points sigma is probed at (1-D, deterministic).

    0 and ±1; a fine grid on [-10, 10] (step 0.05, breakpoints of the usual activations included:
    0, ±1, ±3, ±6); m·10**e for e = -6..6 and m in {1, 1.5, 2, 3, 5, 7}, both signs; 300 N(0, 2²)
    and 100 N(0, 100²) draws.
    """
    g = torch.Generator().manual_seed(12345)
    mant = torch.tensor([1.0, 1.5, 2.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    exps = torch.arange(PROBE_DECADES[0], PROBE_DECADES[1] + 1, dtype=torch.float64)
    decades = (mant[:, None] * 10.0 ** exps[None, :]).reshape(-1)
    return torch.cat([torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64),
                      torch.linspace(-10, 10, 401, dtype=torch.float64),
                      decades, -decades,
                      torch.randn(300, generator=g, dtype=torch.float64) * 2.0,
                      torch.randn(100, generator=g, dtype=torch.float64) * 100.0])


def _eval(sigma: Callable, x: torch.Tensor) -> torch.Tensor:
    """sigma on a COPY of x (in-place activations must not alias or change the probe), as float64."""
    try:
        with torch.no_grad():
            y = sigma(x.clone())
    except Exception as err:
        raise ValueError(f"could not evaluate sigma on a float64 tensor: "
                         f"{type(err).__name__}: {err}") from err
    y = as_tensor(y, name="sigma(x)")
    if y.shape != x.shape:
        raise ValueError(f"sigma must act elementwise: input shape {tuple(x.shape)} gave {tuple(y.shape)}")
    return y.detach().to(torch.float64).clone()


def _agree(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, atol: float) -> bool:
    """a == b up to _RTOL (relative, per point) + atol, at every point where both are finite.

    A non-finite value on one side only, at a base point x in [-CORE, CORE], is a disagreement.
    """
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not ((fa & fb) | (x.abs() > CORE)).all():
        return False
    both = fa & fb
    a, b = a[both], b[both]
    return bool(((a - b).abs() <= _RTOL * (a.abs() + b.abs()) + atol).all())


def _snap(k: float) -> float:
    for denom in (1, 2, 3, 4):
        r = round(k * denom) / denom
        if abs(k - r) < 1e-6:
            return float(r)
    return float(k)


def _float64_copy(sigma: Callable) -> Callable:
    """A CPU float64 deep copy of a module with parameters or buffers of another dtype or on another device
    (PReLU's float32 slope, a module on CUDA), else sigma itself (the probes are CPU float64 tensors)."""
    if isinstance(sigma, nn.Module) and any(
            t.is_floating_point() and (t.dtype != torch.float64 or t.device.type != "cpu")
            for t in [*sigma.parameters(), *sigma.buffers()]):
        return copy.deepcopy(sigma).to(device="cpu", dtype=torch.float64)
    return sigma


class NotFiniteError(ValueError):
    """sigma is not finite somewhere on [-6, 6] (``rsqrt``, ``log``): no group can be derived from its values
    on the whole line."""


def activation_properties(sigma: Callable) -> Properties:
    """Linearity, affinity, parity and positive homogeneity of an elementwise sigma, checked numerically.

    sigma is evaluated (float64, no grad, always on a copy of its input so that in-place activations are
    judged correctly) at :func:`probe_points` — magnitudes 1e-6 … 1e6, both signs, a fine grid on
    [-10, 10] — and at scaled copies c·x for 16 factors c in [0.1, 10]. Every property must hold at every
    probe to a relative 1e-9. sigma must be finite on [-6, 6] (else ValueError); further out, points
    where it overflows (exp(1e6)) are left out. ValueError when sigma is not elementwise.
    """
    sigma = _float64_copy(sigma)
    g = torch.Generator().manual_seed(54321)
    x_all = probe_points()
    y_all = _eval(sigma, x_all)
    bad = ~torch.isfinite(y_all) & (x_all.abs() <= CORE)
    if bad.any():
        raise NotFiniteError(f"sigma is not finite at x = {x_all[bad][0].item():g}")
    keep = torch.isfinite(y_all)
    x, y = x_all[keep], y_all[keep]
    # elementwise: the same values in another order, another shape, and on a part of the input
    perm = torch.randperm(x.numel(), generator=g)
    tiny = 1e-300
    if not _agree(_eval(sigma, x[perm]), y[perm], x[perm], tiny) or \
            not _agree(_eval(sigma, x.reshape(-1, 1)).reshape(-1), y, x, tiny) or \
            not _agree(_eval(sigma, x[:7]), y[:7], x[:7], tiny):
        raise ValueError("sigma must act elementwise (its values changed with the order or shape of "
                         "the input)")
    s0, s1 = (float(v) for v in _eval(sigma, torch.tensor([0.0, 1.0], dtype=torch.float64)))
    unit = float(y[x.abs() <= 1].abs().max())
    atol = 1e-14 * max(unit, tiny)

    affine = _agree(y, s0 + (s1 - s0) * x, x, atol)
    linear = affine and abs(s0) <= atol
    y_neg = _eval(sigma, -x)
    even = _agree(y_neg, y, x, atol)
    odd = _agree(y_neg, -y, x, atol)

    # positive homogeneity: estimate k from sigma(2x)/sigma(x), then verify for many c > 0
    degree = None
    y2 = _eval(sigma, 2 * x)
    ok = torch.isfinite(y2) & (y.abs() > 1e-12 * unit) & (y2.abs() > 1e-12 * unit) & (x != 0)
    ratio = y2[ok] / y[ok]
    if ok.any() and (ratio > 0).all():
        k = _snap(float(torch.log2(ratio).median()))
        factors = torch.tensor([0.1, 0.25, 1 / 3, 0.5, 0.9, 1.5, 2.0, 3.0, 7.0, 10.0], dtype=torch.float64)
        factors = torch.cat([factors, torch.exp(torch.randn(6, generator=g, dtype=torch.float64))])
        if all(_agree(_eval(sigma, c * x), c**k * y, x, atol * max(1.0, float(c) ** k)) for c in factors):
            degree = k
    return Properties(sigma0=s0, sigma1=s1, linear=linear, affine=affine, even=even, odd=odd, degree=degree)


def _check_invertible(name: str, s0: float, s1: float) -> None:
    scale = max(abs(s0), abs(s1), 1e-300)
    if abs(s1 - s0) <= 1e-9 * scale:
        raise ValueError(f"sigma(I_n) is singular for {name} for every n >= 2 (sigma(0) = sigma(1) = "
                         f"{s0:g}); the intertwiner group is undefined (Lemma 3.1)")


def _group(entry: tuple[str, float, bool], name: str, sigma, s0: float, s1: float) -> IntertwinerGroup:
    if not (math.isfinite(s0) and math.isfinite(s1)):
        raise ValueError(f"{name} is not finite at 0 or 1 (sigma(0) = {s0}, sigma(1) = {s1})")
    _check_invertible(name, s0, s1)
    kind, degree, odd = entry
    return IntertwinerGroup(kind=kind, name=name, degree=degree, odd=odd, sigma=sigma, sigma0=s0, sigma1=s1)


def derive_group(sigma: Callable, name: str = "sigma") -> IntertwinerGroup:
    """G_sigma from :func:`activation_properties` (the rules in the module docstring), for any callable."""
    p = activation_properties(sigma)
    if p.linear:
        entry = ("general_linear", 1.0, True)
    elif p.affine:
        entry = ("unit_row_sum", 1.0, True)
    elif p.degree is not None:
        entry = (("scaled_permutation", p.degree, p.odd) if (p.even or p.odd)
                 else ("positive_scaled_permutation", p.degree, False))
    else:
        entry = ("signed_permutation", 0.0, p.odd) if (p.even or p.odd) else PERMUTATION
    return _group(entry, name, sigma, p.sigma0, p.sigma1)


# ----------------------------------------------------------------------------------------------------
# Exact rules: names (Table 1) and the parametrised built-in activation modules
# ----------------------------------------------------------------------------------------------------

GENERAL_LINEAR = ("general_linear", 1.0, True)
RELU_LIKE = ("positive_scaled_permutation", 1.0, False)  # positively homogeneous of degree 1
ABS_LIKE = ("scaled_permutation", 1.0, False)            # |x|
SIGNED_ODD = ("signed_permutation", 0.0, True)           # odd, not homogeneous: tanh, hardtanh(-a, a)
SIGNED_EVEN = ("signed_permutation", 0.0, False)         # even, not homogeneous: gaussian
PERMUTATION = ("permutation", 0.0, False)                # none of the above

def _finite(owner: str, what: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: {what} must be a number, got {value!r}") from err
    if not math.isfinite(v):
        raise ValueError(f"{owner}: {what} must be finite, got {v}")
    return v


def leaky_relu_entry(slope: float) -> tuple[str, float, bool]:
    """LeakyReLU(s) = max(x, 0) + s·min(x, 0): GL_n for s = 1 (identity), |x| for s = -1, else positive
    scalings (sigma(c x) = c sigma(x) for c > 0 only)."""
    slope = _finite("leaky_relu", "the slope", slope)
    if slope == 1.0:
        return GENERAL_LINEAR
    if slope == -1.0:
        return ABS_LIKE
    return RELU_LIKE


def power_entry(degree: int) -> tuple[str, float, bool]:
    """x**D: GL_n for D = 1, else non-zero scalings with b(c) = c**D."""
    d = int(degree)
    return GENERAL_LINEAR if d == 1 else ("scaled_permutation", float(d), d % 2 == 1)


def _clamp_entry(owner: str, lo, hi) -> tuple[str, float, bool]:
    """clamp(x, lo, hi) (Hardtanh, ReLU6): GL for (-inf, inf), ReLU's group for (0, inf), odd for (-a, a),
    else permutations only (any scaling c != 1 moves a breakpoint; c = -1 maps the interval onto itself
    only when it is symmetric)."""
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise ValueError(f"{owner}: needs min_val < max_val, got ({lo}, {hi})")
    if lo == -math.inf and hi == math.inf:
        return GENERAL_LINEAR
    if lo == 0 and hi == math.inf:
        return RELU_LIKE
    if lo == -hi:
        return SIGNED_ODD
    return PERMUTATION


def _shrink_entry(owner: str, lambd) -> tuple[str, float, bool]:
    """Softshrink/Hardshrink(λ): odd; the identity when λ <= 0 (Hardshrink) or λ = 0 (Softshrink)."""
    lam = _finite(owner, "lambd", lambd)
    return GENERAL_LINEAR if lam <= 0 else SIGNED_ODD


def _prelu_entry(m: nn.PReLU) -> tuple[str, float, bool]:
    w = m.weight.detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(w).all():
        raise ValueError("PReLU: its slopes must be finite")
    if w.numel() > 1 and not bool((w == w[0]).all()):
        raise ValueError(f"PReLU with {w.numel()} different per-channel slopes is not one elementwise "
                         "function: a permutation would move the slopes between channels, so it has no "
                         "intertwiner group. Its channel-wise symmetries are positive diagonal scalings "
                         "without permutation (sigma(d x) = d sigma(x), d > 0); analyse it as such or "
                         "give every channel the same slope")
    return leaky_relu_entry(float(w[0]))


def _threshold_entry(m: nn.Threshold) -> tuple[str, float, bool]:
    """Threshold(t, v): x if x > t else v. ReLU for t = v = 0, the identity for t = -inf."""
    t = float(m.threshold)
    v = _finite("Threshold", "value", m.value)
    if math.isnan(t):
        raise ValueError("Threshold: threshold must not be NaN")
    if t == -math.inf:
        return GENERAL_LINEAR
    if t == 0 and v == 0:
        return RELU_LIKE
    return PERMUTATION


def _elu_entry(m: nn.ELU) -> tuple[str, float, bool]:
    alpha = _finite("ELU", "alpha", m.alpha)
    return RELU_LIKE if alpha == 0 else PERMUTATION  # ELU(alpha=0) is ReLU


def _celu_entry(m: nn.CELU) -> tuple[str, float, bool]:
    if _finite("CELU", "alpha", m.alpha) == 0:
        raise ValueError("CELU: alpha must not be 0")
    return PERMUTATION


def _softplus_entry(m: nn.Softplus) -> tuple[str, float, bool]:
    if _finite("Softplus", "beta", m.beta) == 0:
        raise ValueError("Softplus: beta must not be 0")
    if math.isnan(float(m.threshold)):
        raise ValueError("Softplus: threshold must not be NaN")
    return PERMUTATION


def _gelu_entry(m: nn.GELU) -> tuple[str, float, bool]:
    if m.approximate not in ("none", "tanh"):
        raise ValueError(f"GELU: unknown approximate={m.approximate!r}")
    return PERMUTATION


def _rrelu_entry(m: nn.Module) -> tuple[str, float, bool]:
    raise ValueError("RReLU draws a random slope per element in training mode, so it is not one elementwise "
                     "function; use LeakyReLU((lower + upper) / 2) for its evaluation-mode function")


def _module_rules() -> dict[type, tuple[str, Callable]]:
    """Built-in activation module types -> (group name, rule module -> (kind, degree, odd)).

    Exact: no numerical probing. A rule is used only when the module's class does not override the
    built-in ``forward`` and no hooks are registered; anything else is derived numerically.
    """
    from .activations import Abs, Gaussian, Power

    def const(entry):
        return lambda m: entry

    return {
        nn.Identity: ("identity", const(GENERAL_LINEAR)),
        nn.ReLU: ("relu", const(RELU_LIKE)),
        nn.LeakyReLU: ("leaky_relu", lambda m: leaky_relu_entry(m.negative_slope)),
        nn.PReLU: ("prelu", _prelu_entry),
        nn.ReLU6: ("relu6", lambda m: _clamp_entry("ReLU6", m.min_val, m.max_val)),
        nn.Hardtanh: ("hardtanh", lambda m: _clamp_entry("Hardtanh", m.min_val, m.max_val)),
        nn.Threshold: ("threshold", _threshold_entry),
        nn.ELU: ("elu", _elu_entry),
        nn.CELU: ("celu", _celu_entry),
        nn.SELU: ("selu", const(PERMUTATION)),
        nn.GELU: ("gelu", _gelu_entry),
        nn.SiLU: ("silu", const(PERMUTATION)),
        nn.Mish: ("mish", const(PERMUTATION)),
        nn.Hardswish: ("hardswish", const(PERMUTATION)),
        nn.Hardsigmoid: ("hardsigmoid", const(PERMUTATION)),
        nn.Sigmoid: ("sigmoid", const(PERMUTATION)),
        nn.LogSigmoid: ("logsigmoid", const(PERMUTATION)),
        nn.Softplus: ("softplus", _softplus_entry),
        nn.Tanh: ("tanh", const(SIGNED_ODD)),
        nn.Softsign: ("softsign", const(SIGNED_ODD)),
        nn.Tanhshrink: ("tanhshrink", const(SIGNED_ODD)),
        nn.Softshrink: ("softshrink", lambda m: _shrink_entry("Softshrink", m.lambd)),
        nn.Hardshrink: ("hardshrink", lambda m: _shrink_entry("Hardshrink", m.lambd)),
        nn.RReLU: ("rrelu", _rrelu_entry),
        Gaussian: ("gaussian", const(SIGNED_EVEN)),
        Abs: ("abs", const(ABS_LIKE)),
        Power: ("power", lambda m: power_entry(m.degree)),
    }


_RULES: dict[type, tuple[str, Callable]] | None = None


def module_rule(module: nn.Module) -> tuple[str, tuple[str, float, bool]] | None:
    """(group name, (kind, degree, odd)) for a built-in activation module by its exact rule, or None.

    None for modules without a rule, subclasses that override ``forward`` and modules with hooks (those
    are derived numerically). ValueError for non-finite or nonsensical settings (LeakyReLU(nan),
    per-channel PReLU with different slopes, RReLU).
    """
    global _RULES
    if _RULES is None:
        _RULES = _module_rules()
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    for cls in type(module).__mro__:
        if cls in _RULES:
            if type(module).forward is not cls.forward:
                return None
            name, rule = _RULES[cls]
            entry = rule(module)
            if name == "leaky_relu":
                name = f"leaky_relu:{float(module.negative_slope)}"
            elif name == "power":
                name = f"power:{module.degree}"
            return name, entry
    return None


def _values_at_0_and_1(sigma: Callable) -> tuple[float, float]:
    if isinstance(sigma, nn.PReLU):  # one slope (all channels equal, checked by its rule)
        sigma = nn.LeakyReLU(float(sigma.weight.detach().reshape(-1)[0]))
    s0, s1 = _eval(_float64_copy(sigma), torch.tensor([0.0, 1.0], dtype=torch.float64))
    return float(s0), float(s1)


def named_group(name: str) -> IntertwinerGroup:
    """G_sigma for an activation name of :func:`intertwiners.activations.make_activation` (Table 1: the
    exact rule of the module the name builds).

    ValueError for unknown names and for non-finite or out-of-range parameters (``leaky_relu:nan``,
    ``leaky_relu:inf``, ``power:nan``, ``power:2000``).
    """
    from .activations import make_activation

    module = make_activation(name)  # validates the name and its parameter
    rule = module_rule(module)
    if rule is None:  # pragma: no cover - every name builds a module with a rule
        raise ValueError(f"unknown activation {name!r}")
    return _group(rule[1], rule[0], module, *_values_at_0_and_1(module))


_FUNCTIONAL = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh, "leaky_relu": nn.LeakyReLU,
    "prelu": None, "elu": nn.ELU, "celu": nn.CELU, "selu": nn.SELU, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish,
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid, "logsigmoid": nn.LogSigmoid,
    "tanh": nn.Tanh, "softsign": nn.Softsign, "tanhshrink": nn.Tanhshrink, "softshrink": nn.Softshrink,
    "hardshrink": nn.Hardshrink, "softplus": nn.Softplus, "threshold": nn.Threshold,
}


def functional_group(op: str, *args, **kwargs) -> IntertwinerGroup:
    """G_sigma of a functional activation call, by the exact rule of its module.

    ``op`` is the function's name as torch.nn.functional, torch or aten spell it, with or without the
    in-place underscore (``"relu_"``, ``"hardtanh"``, ``"gelu"``); ``args``/``kwargs`` are its arguments after
    the input, as the function takes them (``functional_group("hardtanh", -10.0, 10.0)``,
    ``functional_group("leaky_relu", 0.2)``, ``functional_group("gelu", approximate="tanh")``). ``inplace``
    is ignored. ValueError for unknown ops, arguments the module does not take and bad values.
    """
    name = op.rsplit(".", 1)[-1].removesuffix("_").lower()
    cls = _FUNCTIONAL.get(name)
    if cls is None:
        raise ValueError(f"no exact rule for the functional activation {op!r}; known: "
                         f"{', '.join(k for k, v in _FUNCTIONAL.items() if v is not None)}")
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    args = tuple(a for a in args if not isinstance(a, bool))  # a positional inplace flag
    try:
        module = cls(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ValueError(f"{op}: arguments {args!r} {kwargs!r} not understood ({err})") from err
    return intertwiner_group(module)


def intertwiner_group(sigma, *, n: int | None = None) -> IntertwinerGroup:
    """The intertwiner group G_sigma of an elementwise activation, with phi_sigma (paper §3.1).

    ``sigma``: a name (``"relu"``, ``"leaky_relu:0.2"``, ``"power:3"``, ... see
    :mod:`intertwiners.activations`), a ``torch.nn`` activation module, or any elementwise callable on
    float64 tensors. Names and the built-in modules (ReLU, ReLU6, Hardtanh(min, max), LeakyReLU(s),
    PReLU, ELU/CELU/SELU, GELU, SiLU, Mish, Hardswish, Hardsigmoid, Softplus(beta, threshold), Tanh,
    Softsign, Tanhshrink, Softshrink, Hardshrink, Threshold, LogSigmoid, Sigmoid, Identity; in-place or
    not) use exact rules; anything else is derived from its numerically checked properties
    (:func:`derive_group`, always evaluated on copies). ``n``: optionally check that sigma(I_n) is
    invertible for this size. Raises ValueError when sigma(I_n) is singular (the group is undefined),
    sigma is not elementwise, or a parameter is non-finite or nonsensical.
    """
    if isinstance(sigma, IntertwinerGroup):
        group = sigma
    elif isinstance(sigma, str):
        group = named_group(sigma)
    elif isinstance(sigma, nn.Module):
        rule = module_rule(sigma)
        if rule is not None:
            name, entry = rule
            group = _group(entry, name, sigma, *_values_at_0_and_1(sigma))
        else:
            group = derive_group(sigma, type(sigma).__name__.lower())
    elif callable(sigma):
        group = derive_group(sigma, getattr(sigma, "__name__", type(sigma).__name__))
    else:
        raise ValueError("sigma must be an activation name, an nn.Module or a callable, "
                         f"got {type(sigma).__name__}")
    if n is not None:
        group.check_size(n)
    return group


__all__ = ["KINDS", "MONOMIAL_KINDS", "IntertwinerGroup", "Properties", "activation_properties",
           "as_monomial", "derive_group", "functional_group", "intersection", "intertwiner_group", "kind_group",
           "kind_leq", "meet_kind", "module_rule", "monomial_compose", "monomial_inverse", "monomial_matrix",
           "named_group", "probe_points"]
