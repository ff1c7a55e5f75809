"""Chains: the transform a hidden value carries, as a function of its space's element.

A space has one element A (``P·diag(s)`` for monomial groups). A value holding the space carries
``carried(A, chain)``, where a *chain* is a tuple of entries applied in order:

* an activation key (a readable name such as ``"relu"`` or ``"gelu#1"``, looked up in the analysis'
  ``groups``): after an activation sigma the value carries phi_sigma(A) = P·diag(b(s));
* :data:`ONE`: the scale is replaced by 1 (a convolution that feeds only a batch norm is only permuted: the
  batch norm's affine parameters carry the scaling);
* :data:`DUAL`: A^-T (the keys of attention: W_K -> A^-T W_K when W_Q -> A W_Q).

Every scale map of a monomial group is ``b(c) = sign(c)**odd · |c|**exponent``, so a whole chain is one
:class:`Power` (ReLU (1, odd), x**3 (3, odd), |x| (1, even), ONE (0, even), DUAL (-1, odd)); the engine
computes it once per slot (:func:`power_of`) and every consumer reads it from the slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ONE = "one"
DUAL = "dual"


@dataclass(frozen=True)
class Power:
    """The scale map ``c(s) = sign(s)**odd · |s|**exponent`` (elementwise on the (n,) scales ``s``).

    For a dense (general-linear or attention) element A, ``exponent`` 1 means A and -1 means A^-T.
    """

    exponent: float
    odd: bool

    def __call__(self, scale: torch.Tensor) -> torch.Tensor:
        """c(s) for the (n,) scales ``scale`` (same dtype)."""
        if self.exponent == 0:
            out = torch.ones_like(scale)
        elif self.exponent == 1:
            out = scale.abs()
        elif self.exponent == -1:
            out = 1.0 / scale.abs()
        else:
            out = scale.abs() ** self.exponent
        return out * torch.sign(scale) if self.odd else out

    def then(self, outer: Power) -> Power:
        """outer ∘ self: sign(s)**(odd·odd') · |s|**(exponent·exponent')."""
        return Power(self.exponent * outer.exponent, self.odd and outer.odd)

    def over(self, other: Power) -> Power:
        """The ratio self(s) / other(s) as one power (a gain t/s)."""
        return Power(self.exponent - other.exponent, self.odd != other.odd)

    @property
    def inverse(self) -> Power:
        """1 / c(s)."""
        return Power(-self.exponent, self.odd)

    def __str__(self) -> str:
        return f"{'sign(s)·' if self.odd else ''}|s|^{self.exponent:g}"


IDENTITY = Power(1.0, True)
UNSCALED = Power(0.0, False)


def entry_power(entry, groups: dict) -> Power:
    """The scale map of one chain entry as a :class:`Power`."""
    if entry == ONE:
        return UNSCALED
    if entry == DUAL:
        return Power(-1.0, True)
    group = groups[entry]
    if group.kind in ("general_linear", "unit_row_sum"):
        return IDENTITY  # phi(A) = A
    if group.kind == "permutation":
        return UNSCALED
    if group.kind == "signed_permutation":
        return Power(0.0, group.odd)
    return Power(float(group.degree), group.odd)


def power_of(chain: tuple, groups: dict) -> Power:
    """The scale map a value with ``chain`` carries (entries applied in order)."""
    p = IDENTITY
    for entry in chain:
        p = p.then(entry_power(entry, groups))
    return p


def linear_power(chain: tuple) -> Power:
    """The same chain with every activation treated as linear (phi(A) = A): how ``apply_symmetry(...,
    check=False)`` acts with an element outside the group (to show non-invariance)."""
    p = IDENTITY
    for entry in chain:
        p = p.then(UNSCALED if entry == ONE else Power(-1.0, True) if entry == DUAL else IDENTITY)
    return p


def carried_scale(chain: tuple, scale: torch.Tensor, groups: dict) -> torch.Tensor:
    """The scales c(s) a value carries when its space has element P·diag(s); ValueError when an activation
    of the chain does not allow the scales it sees (so constraints can test group kinds with it)."""
    for entry in chain:
        if entry == ONE:
            scale = torch.ones_like(scale)
        elif entry == DUAL:
            scale = 1.0 / scale
        else:
            scale = groups[entry].scale_map(scale)
    return scale


def is_linear_chain(chain: tuple, groups: dict) -> bool:
    """Does every entry keep a dense element dense (dual, or an activation with a non-monomial group)?"""
    return all(e == DUAL or (e != ONE and not groups[e].is_monomial) for e in chain)
