"""Intertwiner groups of elementwise activations (paper §3.1, Lemma 3.1, Table 1).

For an elementwise activation sigma the intertwiner group is

    G_sigma = {A in GL_n : sigma(A x) = B sigma(x) for all x, for some B in GL_n},

and ``phi_sigma(A) = sigma(A) sigma(I_n)^-1`` is the B that goes with A (Lemma 3.1; the group is only
defined when sigma(I_n) is invertible). :func:`intertwiner_group` derives G_sigma and phi_sigma from
elementary properties of sigma, each checked numerically on many points:

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
    magnitude = A.abs()
    if not torch.isfinite(magnitude.sum()):
        raise ValueError("matrix has non-finite entries")
    nonzero = magnitude > atol
    if not (nonzero.sum(0) == 1).all() or not (nonzero.sum(1) == 1).all():
        raise ValueError("matrix is not monomial (each row and each column needs exactly one non-zero entry)")
    perm = nonzero.to(torch.float32).argmax(0).long()
    scale = A[perm, torch.arange(n, device=A.device)]
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
# Deriving the group of an activation
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


_RTOL = 1e-7


def _eval(sigma: Callable, x: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            y = sigma(x)
    except Exception as err:
        raise ValueError(f"could not evaluate sigma on a float64 tensor: "
                         f"{type(err).__name__}: {err}") from err
    y = as_tensor(y, name="sigma(x)")
    if y.shape != x.shape:
        raise ValueError(f"sigma must act elementwise: input shape {tuple(x.shape)} gave {tuple(y.shape)}")
    return y.to(torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor, floor: float) -> bool:
    return bool(((a - b).abs() <= _RTOL * (a.abs() + b.abs()) + floor).all())


def _snap(k: float) -> float:
    for denom in (1, 2, 3, 4):
        r = round(k * denom) / denom
        if abs(k - r) < 1e-6:
            return float(r)
    return float(k)


def activation_properties(sigma: Callable) -> Properties:
    """Linearity, affinity, parity and positive homogeneity of an elementwise sigma, checked numerically.

    sigma is evaluated (float64, no grad) on ~1000 points in [-6, 6] and at scaled copies c·x for
    c in a spread of positive factors up to 10. ValueError when sigma is not a finite elementwise map.
    """
    g = torch.Generator().manual_seed(12345)
    x = torch.cat([torch.linspace(-6, 6, 241, dtype=torch.float64),
                   torch.randn(600, generator=g, dtype=torch.float64) * 2.0,
                   torch.tensor([0.0, 1.0, -1.0, 1e-3, -1e-3, 0.1, -0.1, 0.5, -0.5, 2.0, -2.0],
                                dtype=torch.float64)])
    x = x.clamp(-6, 6)
    y = _eval(sigma, x)
    if not torch.isfinite(y).all():
        bad = x[~torch.isfinite(y)][0].item()
        raise ValueError(f"sigma is not finite at x = {bad:g}")
    # elementwise: the same values in another order, another shape, and on a part of the input
    perm = torch.randperm(x.numel(), generator=g)
    if not _close(_eval(sigma, x[perm]), y[perm], 1e-12) or \
            not _close(_eval(sigma, x.reshape(-1, 1)).reshape(-1), y, 1e-12) or \
            not _close(_eval(sigma, x[:7]), y[:7], 1e-12):
        raise ValueError("sigma must act elementwise (its values changed with the order or shape of "
                         "the input)")
    s0, s1 = float(_eval(sigma, torch.zeros(1, dtype=torch.float64))), float(
        _eval(sigma, torch.ones(1, dtype=torch.float64)))
    size = max(1.0, float(y.abs().max()))
    floor = 1e-12 * size

    affine = _close(y, s0 + (s1 - s0) * x, floor)
    linear = affine and abs(s0) <= floor
    y_neg = _eval(sigma, -x)
    even = _close(y_neg, y, floor)
    odd = _close(y_neg, -y, floor)

    # positive homogeneity: estimate k from sigma(2x)/sigma(x), then verify for many c > 0
    degree = None
    y2 = _eval(sigma, 2 * x)
    ok = (y.abs() > 1e-3 * size) & (y2.abs() > 1e-3 * size) & (x != 0)
    ratio = y2[ok] / y[ok]
    if ok.any() and (ratio > 0).all():
        k = _snap(float(torch.log2(ratio).median()))
        factors = torch.tensor([0.1, 0.25, 1 / 3, 0.5, 0.9, 1.5, 2.0, 3.0, 7.0, 10.0], dtype=torch.float64)
        factors = torch.cat([factors, torch.exp(torch.randn(6, generator=g, dtype=torch.float64))])
        homogeneous = True
        for c in factors:
            yc = _eval(sigma, c * x)
            if not torch.isfinite(yc).all() or not _close(yc, c**k * y, floor * max(1.0, float(c) ** k)):
                homogeneous = False
                break
        if homogeneous:
            degree = k
    return Properties(sigma0=s0, sigma1=s1, linear=linear, affine=affine, even=even, odd=odd, degree=degree)


def derive_group(sigma: Callable, name: str = "sigma") -> IntertwinerGroup:
    """G_sigma from :func:`activation_properties` (the rules in the module docstring), for any callable."""
    evaluate = sigma
    if isinstance(sigma, nn.Module) and any(t.is_floating_point() and t.dtype != torch.float64
                                            for t in [*sigma.parameters(), *sigma.buffers()]):
        evaluate = copy.deepcopy(sigma).double()  # e.g. PReLU's float32 slope would refuse float64 input
    p = activation_properties(evaluate)
    scale = max(abs(p.sigma0), abs(p.sigma1), 1e-300)
    if abs(p.sigma1 - p.sigma0) <= 1e-9 * scale:
        raise ValueError(f"sigma(I_n) is singular for {name} for every n >= 2 (sigma(0) = sigma(1) = "
                         f"{p.sigma0:g}); the intertwiner group is undefined (Lemma 3.1)")
    common = dict(name=name, sigma=sigma, sigma0=p.sigma0, sigma1=p.sigma1)
    if p.linear:
        return IntertwinerGroup(kind="general_linear", degree=1.0, odd=True, **common)
    if p.affine:
        return IntertwinerGroup(kind="unit_row_sum", degree=1.0, odd=True, **common)
    if p.degree is not None:
        if p.even or p.odd:
            return IntertwinerGroup(kind="scaled_permutation", degree=p.degree, odd=p.odd, **common)
        return IntertwinerGroup(kind="positive_scaled_permutation", degree=p.degree, odd=False, **common)
    if p.even or p.odd:
        return IntertwinerGroup(kind="signed_permutation", degree=0.0, odd=p.odd, **common)
    return IntertwinerGroup(kind="permutation", degree=0.0, odd=False, **common)


# Table 1 and its extensions: name -> (kind, degree, odd). derive_group agrees (tests check it).
_NAMED = {
    "identity": ("general_linear", 1.0, True),
    "relu": ("positive_scaled_permutation", 1.0, False),
    "sigmoid": ("permutation", 0.0, False),
    "tanh": ("signed_permutation", 0.0, True),
    "gelu": ("permutation", 0.0, False),
    "silu": ("permutation", 0.0, False),
    "elu": ("permutation", 0.0, False),
    "softplus": ("permutation", 0.0, False),
    "gaussian": ("signed_permutation", 0.0, False),
    "abs": ("scaled_permutation", 1.0, False),
}


def _named_entry(name: str) -> tuple[str, float, bool]:
    base, _, arg = name.partition(":")
    if base == "leaky_relu":
        slope = float(arg) if arg else 0.01
        if slope == 1.0:
            return ("general_linear", 1.0, True)
        if slope == -1.0:
            return ("scaled_permutation", 1.0, False)  # |x|
        return ("positive_scaled_permutation", 1.0, False)
    if base == "power":
        d = int(arg)
        if d == 1:
            return ("general_linear", 1.0, True)
        return ("scaled_permutation", float(d), d % 2 == 1)
    return _NAMED[base]


def _canonical_name(module: nn.Module) -> str | None:
    """A name for modules whose group does not depend on their settings (fast path), else None."""
    from .activations import Abs, Gaussian, Power

    if isinstance(module, nn.LeakyReLU):
        return f"leaky_relu:{module.negative_slope}"
    if isinstance(module, Power):
        return f"power:{module.degree}"
    simple = {nn.Identity: "identity", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
              Gaussian: "gaussian", Abs: "abs"}
    return simple.get(type(module))


def named_group(name: str) -> IntertwinerGroup:
    """G_sigma for an activation name of :func:`intertwiners.activations.make_activation` (fast path)."""
    from .activations import make_activation

    module = make_activation(name)  # validates the name
    key = name.strip().lower()
    if key == "leaky_relu":
        key = f"leaky_relu:{module.negative_slope}"
    try:
        kind, degree, odd = _named_entry(key)
    except (KeyError, ValueError) as err:  # pragma: no cover - make_activation validated already
        raise ValueError(f"unknown activation {name!r}") from err
    with torch.no_grad():
        s0, s1 = (float(module(torch.tensor([v], dtype=torch.float64))) for v in (0.0, 1.0))
    return IntertwinerGroup(kind=kind, name=key, degree=degree, odd=odd, sigma=module, sigma0=s0, sigma1=s1)


def intertwiner_group(sigma, *, n: int | None = None) -> IntertwinerGroup:
    """The intertwiner group G_sigma of an elementwise activation, with phi_sigma (paper §3.1).

    ``sigma``: a name (``"relu"``, ``"leaky_relu:0.2"``, ``"power:3"``, ... see
    :mod:`intertwiners.activations`), a ``torch.nn`` activation module (``nn.LeakyReLU(s)`` uses its
    slope), or any elementwise callable on float64 tensors. Named activations and settings-free modules
    use Table 1 directly; anything else is derived from its numerically checked properties
    (:func:`derive_group`). ``n``: optionally check that sigma(I_n) is invertible for this size.
    Raises ValueError when sigma(I_n) is singular (the group is undefined) or sigma is not elementwise.
    """
    if isinstance(sigma, IntertwinerGroup):
        group = sigma
    elif isinstance(sigma, str):
        group = named_group(sigma)
    elif isinstance(sigma, nn.Module):
        canonical = _canonical_name(sigma)
        group = named_group(canonical) if canonical else derive_group(sigma, type(sigma).__name__.lower())
    elif callable(sigma):
        group = derive_group(sigma, getattr(sigma, "__name__", type(sigma).__name__))
    else:
        raise ValueError("sigma must be an activation name, an nn.Module or a callable, "
                         f"got {type(sigma).__name__}")
    if n is not None:
        group.check_size(n)
    return group


__all__ = ["KINDS", "MONOMIAL_KINDS", "IntertwinerGroup", "Properties", "activation_properties",
           "as_monomial", "derive_group", "intersection", "intertwiner_group", "kind_group", "kind_leq",
           "meet_kind", "monomial_compose", "monomial_inverse", "monomial_matrix", "named_group"]
