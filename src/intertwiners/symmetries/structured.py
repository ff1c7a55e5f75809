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

    def _blocks(self, kind: str, d: int, generator) -> torch.Tensor:
        """(heads, d, d) random blocks: Q·diag(s) with Q Haar orthogonal (one batched QR) and
        s = exp(u), u ~ U(-1/2, 1/2) (condition number at most e); c·I for scalars; I."""
        h = self.heads
        if kind == "identity" or d == 0:
            return torch.eye(d, dtype=torch.float64).expand(h, d, d)
        if kind == "scalar":
            c = torch.exp(torch.randn(h, generator=generator, dtype=torch.float64) * 0.5)
            sign = torch.where(torch.rand(h, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
            return (sign * c)[:, None, None] * torch.eye(d, dtype=torch.float64)
        q, r = torch.linalg.qr(torch.randn(h, d, d, generator=generator, dtype=torch.float64))
        diag = torch.diagonal(r, dim1=-2, dim2=-1)
        q = q * torch.where(diag < 0, -1.0, 1.0)[:, None, :]
        s = torch.exp(torch.rand(h, d, generator=generator, dtype=torch.float64) - 0.5)
        return q * s[:, None, :]

    def sample(self, n: int | None = None, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A random element: a uniform head permutation and well-conditioned per-head blocks."""
        if n is not None:
            self.check_size(n)
        h, dk, dv = self.heads, self.dk, self.dv
        perm = torch.randperm(h, generator=generator) if self.permute_heads else torch.arange(h)
        A, B = self._blocks(self.qk, dk, generator), self._blocks(self.vo, dv, generator)
        M = torch.zeros(self.size, self.size, dtype=torch.float64)
        o = h * dk
        for g in range(h):
            t = int(perm[g])
            M[t * dk:(t + 1) * dk, g * dk:(g + 1) * dk] = A[g]
            M[o + t * dv:o + (t + 1) * dv, o + g * dv:o + (g + 1) * dv] = B[g]
        return M.to(dtype)

    def contains(self, A, atol: float = 1e-6) -> bool:
        """Is A block structured as above (one head permutation for both parts, allowed blocks)?"""
        A = torch.as_tensor(A).to(torch.float64)
        if A.shape != (self.size, self.size) or not torch.isfinite(A).all():
            return False
        h, dk, dv = self.heads, self.dk, self.dv
        o = h * dk
        mask = torch.zeros_like(A, dtype=torch.bool)
        perm, qk, vo = [], [], []
        for g in range(h):
            if dk:
                col = A[:o, g * dk:(g + 1) * dk].reshape(h, dk, dk).abs().sum((1, 2))
            else:
                col = A[o:, o + g * dv:o + (g + 1) * dv].reshape(h, dv, dv).abs().sum((1, 2))
            t = int(col.argmax())
            perm.append(t)
            mask[t * dk:(t + 1) * dk, g * dk:(g + 1) * dk] = True
            mask[o + t * dv:o + (t + 1) * dv, o + g * dv:o + (g + 1) * dv] = True
            qk.append(A[t * dk:(t + 1) * dk, g * dk:(g + 1) * dk])
            vo.append(A[o + t * dv:o + (t + 1) * dv, o + g * dv:o + (g + 1) * dv])
        if sorted(perm) != list(range(h)) or (not self.permute_heads and perm != list(range(h))):
            return False
        if not bool((A[~mask].abs() <= atol).all()):
            return False
        for kind, blocks, d in ((self.qk, qk, dk), (self.vo, vo, dv)):
            if not d:
                continue
            X = torch.stack(blocks)
            eye = torch.eye(d, dtype=A.dtype)
            if kind == "identity" and not torch.allclose(X, eye.expand_as(X), atol=atol):
                return False
            if kind == "scalar" and not torch.allclose(X, X[:, :1, :1] * eye, atol=atol):
                return False
            if torch.linalg.svdvals(X).min() <= atol:
                return False
        return True
