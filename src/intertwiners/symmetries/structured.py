"""Groups of attention blocks: permutations of heads times per-head invertible maps.

An attention block with ``heads`` key/value heads, query/key head width ``dk`` and value head width ``dv``
has the symmetries (per head g) W_Q -> A_g W_Q, W_K -> A_g^-T W_K, W_V -> B_g W_V, W_O -> W_O B_g^-1,
and any permutation of the heads (applied to Q, K, V and O together). Its element is one (n, n) matrix,
n = heads·(dk + dv), block diagonal between the query/key coordinates (first heads·dk) and the value
coordinates (last heads·dv)::

    M = diag((P ⊗ I_dk)·blockdiag(A_1..A_h), (P ⊗ I_dv)·blockdiag(B_1..B_h))

``qk`` / ``vo`` say what A_g / B_g may be: ``"general_linear"`` (any invertible matrix), ``"scalar"``
(c·I, e.g. with rotary position embeddings, which commute only with such maps here) or ``"identity"``;
``permute_heads`` whether heads may be permuted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..groups import _random_orthogonal

_INNER = ("general_linear", "scalar", "identity")


@dataclass(frozen=True)
class AttentionGroup:
    heads: int
    dk: int
    dv: int
    qk: str = "general_linear"
    vo: str = "general_linear"
    permute_heads: bool = True
    name: str = "attention"

    kind = "attention_heads"
    is_monomial = False
    sigma0 = None
    sigma1 = None

    def __post_init__(self):
        if self.qk not in _INNER or self.vo not in _INNER:
            raise ValueError(f"qk and vo must be one of {_INNER}")

    @property
    def size(self) -> int:
        return self.heads * (self.dk + self.dv)

    @property
    def description(self) -> str:
        perm = "permutations of heads" if self.permute_heads else "no head permutation"
        return (f"attention with {self.heads} heads: {perm}; per head A ({self.qk}, {self.dk}x{self.dk}) on "
                f"queries/keys and B ({self.vo}, {self.dv}x{self.dv}) on values/outputs")

    def __str__(self) -> str:
        return f"G_attention: {self.description}"

    def check_size(self, n: int) -> int:
        if n != self.size:
            raise ValueError(f"this attention group acts on {self.size} coordinates, not {n}")
        return n

    def dimension(self, n: int) -> int:
        self.check_size(n)
        d = {"general_linear": lambda k: k * k, "scalar": lambda k: 1, "identity": lambda k: 0}
        return self.heads * (d[self.qk](self.dk) + d[self.vo](self.dv))

    def allows_scale(self, scale, atol: float = 1e-6) -> bool:  # pragma: no cover - never monomial
        return False

    def _block(self, kind: str, d: int, generator, dtype) -> torch.Tensor:
        if kind == "identity":
            return torch.eye(d, dtype=torch.float64)
        if kind == "scalar":
            c = torch.exp(torch.randn(1, generator=generator, dtype=torch.float64) * 0.5)
            sign = -1.0 if float(torch.rand(1, generator=generator)) < 0.5 else 1.0
            return sign * c * torch.eye(d, dtype=torch.float64)
        u, v = _random_orthogonal(d, generator), _random_orthogonal(d, generator)
        s = torch.exp(torch.rand(d, generator=generator, dtype=torch.float64) - 0.5)
        return u @ torch.diag(s) @ v

    def sample(self, n: int | None = None, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A random element: a uniform head permutation and well-conditioned per-head blocks."""
        if n is not None:
            self.check_size(n)
        h, dk, dv = self.heads, self.dk, self.dv
        perm = torch.randperm(h, generator=generator) if self.permute_heads else torch.arange(h)
        M = torch.zeros(self.size, self.size, dtype=torch.float64)
        for g in range(h):
            t = int(perm[g])
            M[t * dk:(t + 1) * dk, g * dk:(g + 1) * dk] = self._block(self.qk, dk, generator, dtype)
            o = h * dk
            M[o + t * dv:o + (t + 1) * dv, o + g * dv:o + (g + 1) * dv] = self._block(self.vo, dv, generator, dtype)
        return M.to(dtype)

    def contains(self, A, atol: float = 1e-6) -> bool:
        """Is A block structured as above (one head permutation for both parts, allowed blocks)?"""
        A = torch.as_tensor(A).to(torch.float64)
        if A.shape != (self.size, self.size) or not torch.isfinite(A).all():
            return False
        h, dk, dv = self.heads, self.dk, self.dv
        mask = torch.zeros_like(A, dtype=torch.bool)
        perm = []
        for g in range(h):
            if dk:
                col = A[:h * dk, g * dk:(g + 1) * dk].reshape(h, dk, dk).abs().sum((1, 2))
            else:
                col = A[h * dk:, h * dk + g * dv:h * dk + (g + 1) * dv].reshape(h, dv, dv).abs().sum((1, 2))
            t = int(col.argmax())
            perm.append(t)
            mask[t * dk:(t + 1) * dk, g * dk:(g + 1) * dk] = True
            o = h * dk
            mask[o + t * dv:o + (t + 1) * dv, o + g * dv:o + (g + 1) * dv] = True
            for kind, block in ((self.qk, A[t * dk:(t + 1) * dk, g * dk:(g + 1) * dk]),
                                (self.vo, A[o + t * dv:o + (t + 1) * dv, o + g * dv:o + (g + 1) * dv])):
                d = block.shape[0]
                if kind == "identity" and not torch.allclose(block, torch.eye(d, dtype=A.dtype), atol=atol):
                    return False
                if kind == "scalar" and not torch.allclose(block, block[0, 0] * torch.eye(d, dtype=A.dtype),
                                                           atol=atol):
                    return False
                if d and torch.linalg.svdvals(block).min() <= atol:
                    return False
        if sorted(perm) != list(range(h)) or (not self.permute_heads and perm != list(range(h))):
            return False
        return bool((A[~mask].abs() <= atol).all())
