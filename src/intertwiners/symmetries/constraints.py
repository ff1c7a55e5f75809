"""Typed constraints on a space's group element, and the largest group kind that satisfies them.

Every operation on a hidden value puts a constraint on the transform the value carries (its ``chain``, see
:mod:`~intertwiners.symmetries.chains`). Each constraint is a small frozen dataclass that can say whether a
given monomial element ``P·diag(s)`` satisfies it (:meth:`satisfied_by`); a space gets the largest kind of
:data:`CANDIDATE_KINDS` all of whose elements satisfy every constraint on it (:func:`choose_group`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import groups as G
from .chains import DUAL, ONE, carried_scale, is_linear_chain

__all__ = ["CANDIDATE_KINDS", "DUAL", "ONE", "Activation", "ConstantAdd", "Constraint", "Equal", "Monomial",
           "PositiveScales", "Signed", "Unit", "choose_group", "holds"]

_TEST_SCALES = {
    "permutation": [1.0, 1.0],
    "signed_permutation": [1.0, -1.0, -1.0, 1.0],
    "positive_scaled_permutation": [0.5, 2.0, 3.7, 1.0],
    "scaled_permutation": [-2.0, -0.5, 0.5, 3.7, -1.0, 1.0],
}
CANDIDATE_KINDS = ("general_linear", "scaled_permutation", "unit_row_sum", "positive_scaled_permutation",
                   "signed_permutation", "permutation")


class _Base:
    chain: tuple

    def carried(self, scale: torch.Tensor, groups: dict) -> torch.Tensor:
        return carried_scale(self.chain, scale, groups)

    def satisfied_by(self, scale: torch.Tensor, groups: dict) -> bool:
        """Does the monomial element with (n,) scales ``scale`` satisfy this constraint?"""
        try:
            return bool(self._test(self.carried(torch.as_tensor(scale, dtype=torch.float64), groups), groups))
        except ValueError:   # an activation of the chain does not allow these scales
            return False

    def dense_ok(self, kind: str, groups: dict) -> bool:
        """Do all elements of a dense kind (``general_linear``/``unit_row_sum``) satisfy it?"""
        return False


@dataclass(frozen=True)
class Activation(_Base):
    """An elementwise activation (group ``key``) reads the value: its transform must lie in G_sigma."""
    chain: tuple
    key: str

    def _test(self, c, groups):
        return groups[self.key].allows_scale(c)

    def dense_ok(self, kind, groups):
        return DUAL not in self.chain and G.kind_leq(kind, groups[self.key].kind)


@dataclass(frozen=True)
class PositiveScales(_Base):
    """Max pooling: commutes with permutations and positive scalings only."""
    chain: tuple

    def _test(self, c, groups):
        return (c > 0).all()


@dataclass(frozen=True)
class Signed(_Base):
    """Batch norm input, a weight tied between an input and an output role: |scale| = 1 (T^-1 = T^T)."""
    chain: tuple

    def _test(self, c, groups):
        return ((c.abs() - 1).abs() < 1e-12).all()


@dataclass(frozen=True)
class Unit(_Base):
    """Permutations only: layer norm input, a sum over channels, the gate of a product of two values."""
    chain: tuple

    def _test(self, c, groups):
        return ((c - 1).abs() < 1e-12).all()


@dataclass(frozen=True)
class Monomial(_Base):
    """A per-channel multiplication by a parameter (layer scale, norm gains, depthwise convolutions)."""
    chain: tuple

    def _test(self, c, groups):
        return True


@dataclass(frozen=True)
class ConstantAdd(_Base):
    """x + c·1: A·1 = 1 (unit row sums; for monomials, permutations)."""
    chain: tuple

    def _test(self, c, groups):
        return ((c - 1).abs() < 1e-12).all()

    def dense_ok(self, kind, groups):
        return kind == "unit_row_sum" and DUAL not in self.chain


@dataclass(frozen=True)
class Equal(_Base):
    """Two values added together (a residual connection) must carry the same transform."""
    chain: tuple
    other: tuple

    def satisfied_by(self, scale, groups) -> bool:
        scale = torch.as_tensor(scale, dtype=torch.float64)
        try:
            a, b = carried_scale(self.chain, scale, groups), carried_scale(self.other, scale, groups)
        except ValueError:
            return False
        return bool(torch.allclose(a, b, rtol=1e-12, atol=1e-12))

    def dense_ok(self, kind, groups):
        return self.chain.count(DUAL) % 2 == self.other.count(DUAL) % 2


Constraint = Activation | PositiveScales | Signed | Unit | Monomial | ConstantAdd | Equal
"""Any of the constraint types (a rule passes the class to ``Context.require``)."""


def holds(kind: str, c: Constraint, groups: dict) -> bool:
    """Does every element of ``kind`` satisfy ``c`` (on test scales for monomial kinds)?"""
    if kind in ("general_linear", "unit_row_sum"):
        chains = [c.chain, c.other] if isinstance(c, Equal) else [c.chain]
        return all(is_linear_chain(ch, groups) for ch in chains) and c.dense_ok(kind, groups)
    return c.satisfied_by(torch.tensor(_TEST_SCALES[kind], dtype=torch.float64), groups)


def choose_group(n: int, constraints: set, groups: dict) -> G.IntertwinerGroup | str:
    """The largest kind satisfying every constraint, as a group (phi of the space's first activation at a
    pre-activation value); or a reason string when only the identity is left."""
    acts = sorted({c.key for c in constraints if isinstance(c, Activation) and c.chain == ()})
    for key in {c.key for c in constraints if isinstance(c, Activation)}:
        try:
            groups[key].check_size(n)
        except ValueError as err:
            return str(err)
    for kind in CANDIDATE_KINDS:
        if all(holds(kind, c, groups) for c in constraints):
            if acts:
                base = groups[acts[0]]
                return G.intersection(base, G.kind_group(kind)) if base.kind != kind else base
            return G.kind_group(kind, "linear" if kind == "general_linear" else kind)
    return "no group kind satisfies every operation on it (even permutations are excluded)"
