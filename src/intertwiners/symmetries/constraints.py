"""Chains (the transform a value carries) and typed constraints on a space's group element.

A space has one element A (P·D for monomial groups). A value holding the space carries the transform
``carried(A, chain)``, where a *chain* is a tuple of entries applied in order:

* an activation key (a readable name such as ``"relu"`` or ``"h.0.mlp.act"``, looked up in the spec's
  ``groups``): after an activation sigma the value carries phi_sigma(A) = P·diag(b(D));
* ``ONE``: the scale is replaced by 1 (a convolution that feeds only a batch norm is only permuted, the
  batch norm's affine parameters carry the scaling);
* ``DUAL``: A^-T (the keys of attention: W_K -> A^-T W_K when W_Q -> A W_Q).

Every operation on a space adds a constraint (a small frozen dataclass below) on the chain it sees; the
space gets the largest group kind that satisfies all of them (:func:`holds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import groups as G

ONE = "one"
DUAL = "dual"

_TEST_SCALES = {
    "permutation": [1.0, 1.0],
    "signed_permutation": [1.0, -1.0, -1.0, 1.0],
    "positive_scaled_permutation": [0.5, 2.0, 3.7, 1.0],
    "scaled_permutation": [-2.0, -0.5, 0.5, 3.7, -1.0, 1.0],
}
CANDIDATE_KINDS = ("general_linear", "scaled_permutation", "unit_row_sum", "positive_scaled_permutation",
                   "signed_permutation", "permutation")


@dataclass(frozen=True)
class Activation:
    """An elementwise activation (group ``key``) reads the value: its transform must lie in G_sigma."""
    chain: tuple
    key: str


@dataclass(frozen=True)
class PositiveScales:
    """Max pooling: commutes with permutations and positive scalings only."""
    chain: tuple


@dataclass(frozen=True)
class Signed:
    """Batch norm input, a weight tied between an input and an output role (needs T^-1 = T^T)."""
    chain: tuple


@dataclass(frozen=True)
class Unit:
    """Permutations only: layer norm input, a sum over channels, the gate of a product of two values."""
    chain: tuple


@dataclass(frozen=True)
class Monomial:
    """A per-channel multiplication by a parameter (layer scale, norm gains, depthwise convolutions)."""
    chain: tuple


@dataclass(frozen=True)
class ConstantAdd:
    """x + c·1: A·1 = 1 (unit row sums; for monomials, permutations)."""
    chain: tuple


@dataclass(frozen=True)
class Equal:
    """Two values added together (a residual connection) must carry the same transform."""
    chain: tuple
    other: tuple


Constraint = Activation | PositiveScales | Signed | Unit | Monomial | ConstantAdd | Equal


def carried_scale(chain: tuple, scale: torch.Tensor, groups: dict) -> torch.Tensor:
    """The scales c(s) a value carries when its space has element P·diag(s)."""
    for entry in chain:
        if entry == ONE:
            scale = torch.ones_like(scale)
        elif entry == DUAL:
            scale = 1.0 / scale
        else:
            scale = groups[entry].scale_map(scale)
    return scale


def _linear_chain(chain: tuple, groups: dict) -> bool:
    return all(e == DUAL or (e != ONE and not groups[e].is_monomial) for e in chain)


def holds(kind: str, c: Constraint, groups: dict) -> bool:
    """Does every element of ``kind`` satisfy ``c`` (on test scales for monomial kinds)?"""
    chains = [c.chain, c.other] if isinstance(c, Equal) else [c.chain]
    if kind in ("general_linear", "unit_row_sum"):
        if not all(_linear_chain(ch, groups) for ch in chains):
            return False
        if isinstance(c, Activation):
            return DUAL not in c.chain and G.kind_leq(kind, groups[c.key].kind)
        if isinstance(c, Equal):
            return c.chain.count(DUAL) % 2 == c.other.count(DUAL) % 2
        if isinstance(c, ConstantAdd):
            return kind == "unit_row_sum" and DUAL not in c.chain
        return False
    s = torch.tensor(_TEST_SCALES[kind], dtype=torch.float64)
    try:
        v = carried_scale(c.chain, s, groups)
        if isinstance(c, Equal):
            return bool(torch.allclose(v, carried_scale(c.other, s, groups), rtol=1e-12, atol=1e-12))
    except ValueError:
        return False
    if isinstance(c, Activation):
        return groups[c.key].allows_scale(v)
    if isinstance(c, PositiveScales):
        return bool((v > 0).all())
    if isinstance(c, Signed):
        return bool(((v.abs() - 1).abs() < 1e-12).all())
    if isinstance(c, Unit | ConstantAdd):
        return bool(((v - 1).abs() < 1e-12).all())
    if isinstance(c, Monomial):
        return True
    return False


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
