"""Groups of attention blocks: permutations of heads times per-head invertible maps.

An attention block with ``heads`` key/value heads, query/key head width ``dk`` and value head width ``dv``
has the symmetries (per head g) W_Q -> A_g W_Q, W_K -> A_g^-T W_K, W_V -> B_g W_V, W_O -> W_O B_g^-1,
and any permutation of the heads (applied to Q, K, V and O together). Its element is one (n, n) matrix,
n = heads·(dk + dv), block diagonal between the query/key coordinates (first heads·dk) and the value
coordinates (last heads·dv)::

    M = diag((P ⊗ I_dk)·blockdiag(A_1..A_h), (P ⊗ I_dv)·blockdiag(B_1..B_h))

``qk`` / ``vo`` say what A_g / B_g may be: ``"general_linear"`` (any invertible matrix), ``"scalar"``
(c·I, e.g. with rotary position embeddings, which commute only with such maps here), ``"positive"`` (c·I,
c > 0), ``"sign"`` (±I: queries and keys normalised per head, Qwen3's and Gemma 3's ``q_norm``/``k_norm``,
which an odd norm lets through), ``"identity"``, or a permutation within the head times a diagonal:
``"monomial"`` (non-zero entries), ``"positive_monomial"`` (positive ones: Hiera's and SAM 2's max-pooled
queries), ``"signed_permutation"`` (±1), ``"permutation"``; ``permute_heads`` whether heads may be permuted.
``per_head`` = 1 adds one coordinate per head after the value coordinates, only permuted with the heads (a
relative position bias table's head axis, Swin's, BEiT's)::

    M = diag((P ⊗ I_dk)·blockdiag(A_g), (P ⊗ I_dv)·blockdiag(B_g), P)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._util import one_thread
from .blocks import BlockMatrix

MONOMIAL_INNER = ("monomial", "positive_monomial", "signed_permutation", "permutation")
_INNER = ("general_linear", "scalar", "positive", "sign", "identity", *MONOMIAL_INNER)
_DIMENSION = {"general_linear": lambda k: k * k, "scalar": lambda k: 1, "positive": lambda k: 1, "sign": lambda k: 0,
              "identity": lambda k: 0, "monomial": lambda k: k, "positive_monomial": lambda k: k,
              "signed_permutation": lambda k: 0, "permutation": lambda k: 0}


@dataclass(frozen=True)
class AttentionGroup:
    heads: int
    dk: int
    dv: int
    qk: str = "general_linear"
    vo: str = "general_linear"
    permute_heads: bool = True
    name: str = "attention"
    per_head: int = 0

    kind = "attention_heads"
    is_monomial = False
    sigma0 = None
    sigma1 = None

    def __post_init__(self):
        if self.qk not in _INNER or self.vo not in _INNER:
            raise ValueError(f"qk and vo must be one of {_INNER}")
        if self.per_head not in (0, 1):
            raise ValueError("per_head must be 0 or 1")

    @property
    def size(self) -> int:
        return self.heads * (self.dk + self.dv + self.per_head)

    @property
    def description(self) -> str:
        perm = "permutations of heads" if self.permute_heads else "no head permutation"
        extra = "; a per-head parameter permuted with them" if self.per_head else ""
        return (f"attention with {self.heads} heads: {perm}; per head A ({self.qk}, {self.dk}x{self.dk}) on "
                f"queries/keys and B ({self.vo}, {self.dv}x{self.dv}) on values/outputs{extra}")

    def __str__(self) -> str:
        return f"G_attention: {self.description}"

    def check_size(self, n: int) -> int:
        if n != self.size:
            raise ValueError(f"this attention group acts on {self.size} coordinates, not {n}")
        return n

    def dimension(self, n: int) -> int:
        self.check_size(n)
        return self.heads * (_DIMENSION[self.qk](self.dk) + _DIMENSION[self.vo](self.dv))

    def allows_scale(self, scale, atol: float = 1e-6) -> bool:  # pragma: no cover - never monomial
        return False

    def _blocks(self, kind: str, d: int, generator) -> torch.Tensor:
        """(heads, d, d) random blocks: Q·diag(s) with Q Haar orthogonal (one batched QR) and
        s = exp(u), u ~ U(-1/2, 1/2) (condition number at most e); c·I for scalars (c > 0 for ``positive``,
        c = ±1 for ``sign``); a uniform permutation times such a diagonal (its entries' signs and sizes as the
        kind allows) for the monomial kinds; I."""
        h = self.heads
        if kind == "identity" or d == 0:
            return torch.eye(d, dtype=torch.float64).expand(h, d, d)
        if kind in MONOMIAL_INNER:
            size = torch.exp(torch.rand(h, d, generator=generator, dtype=torch.float64) - 0.5)
            sign = torch.where(torch.rand(h, d, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0).double()
            scale = {"monomial": sign * size, "positive_monomial": size, "signed_permutation": sign,
                     "permutation": torch.ones(h, d, dtype=torch.float64)}[kind]
            perm = torch.argsort(torch.rand(h, d, generator=generator), dim=1)
            blocks = torch.zeros(h, d, d, dtype=torch.float64)
            blocks.scatter_(1, perm[:, None, :], scale[:, None, :])   # column i holds s_i at row perm[i]
            return blocks
        if kind in ("scalar", "positive", "sign"):
            c = torch.exp(torch.randn(h, generator=generator, dtype=torch.float64) * 0.5)
            sign = torch.where(torch.rand(h, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
            c = {"scalar": sign * c, "positive": c, "sign": sign}[kind]
            return c[:, None, None] * torch.eye(d, dtype=torch.float64)
        with one_thread():
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
        M = self.block_matrix(perm, A.contiguous(), B.contiguous()).dense().to(dtype)
        # remembered so that apply_symmetry need not read the matrix back (see apply._normalise)
        M._intertwiners_blocks = (perm, A.to(dtype), B.to(dtype), M._version)
        return M

    def decompose(self, A, atol: float = 1e-6):
        """``(perm, qk_blocks, vo_blocks)`` of an element (head g moves to perm[g]; blocks (heads, d, d)),
        read off the largest block of every head column; None when A is not block structured like that
        (entries outside the chosen blocks above ``atol``, or no permutation)."""
        A = torch.as_tensor(A).to(torch.float64)
        if A.shape != (self.size, self.size) or not torch.isfinite(A).all():
            return None
        h, dk, dv = self.heads, self.dk, self.dv
        o, e = h * dk, h * (dk + dv)
        qk = A[:o, :o].reshape(h, dk, h, dk)
        vo = A[o:e, o:e].reshape(h, dv, h, dv)
        norms = (qk.abs().sum((1, 3)) if dk else 0) + (vo.abs().sum((1, 3)) if dv else 0)   # (target, source)
        perm = torch.as_tensor(norms).argmax(0)
        if not torch.equal(torch.sort(perm).values, torch.arange(h)):
            return None
        src = torch.arange(h)
        qk_blocks, vo_blocks = qk[perm, :, src, :], vo[perm, :, src, :]
        rest_qk, rest_vo = qk.clone(), vo.clone()
        rest_qk[perm, :, src, :] = 0
        rest_vo[perm, :, src, :] = 0
        rest = [rest_qk, rest_vo, A[:o, o:e], A[o:e, :o], A[:e, e:], A[e:, :e]]
        if self.per_head:   # the per-head coordinates: exactly the head permutation
            moved = torch.zeros(h, h, dtype=A.dtype)
            moved[perm, src] = 1.0
            rest.append(A[e:, e:] - moved)
        off = max((float(t.abs().max()) for t in rest if t.numel()), default=0.0)
        if off > atol:
            return None
        return perm, qk_blocks, vo_blocks

    def block_matrix(self, perm: torch.Tensor, qk: torch.Tensor, vo: torch.Tensor):
        """The element with head permutation ``perm`` and blocks ``qk`` (heads, dk, dk), ``vo`` (heads, dv, dv)
        as a :class:`~intertwiners.symmetries.blocks.BlockMatrix` (no (n, n) matrix is formed)."""
        h, dk, dv = self.heads, self.dk, self.dv
        src = torch.arange(h)
        parts = []
        ones = torch.ones(h, 1, 1, dtype=qk.dtype if dk else vo.dtype, device=(qk if dk else vo).device)
        for offset, d, blocks in ((0, dk, qk), (h * dk, dv, vo), (h * (dk + dv), self.per_head, ones)):
            if d:
                ar = torch.arange(d)
                parts.append((offset + perm[:, None] * d + ar, offset + src[:, None] * d + ar, blocks))
        return BlockMatrix.from_blocks(self.size, parts)

    def contains(self, A, atol: float = 1e-6) -> bool:
        """Is A block structured as above (one head permutation for both parts, allowed, invertible blocks)?"""
        parts = self.decompose(A, atol)
        if parts is None:
            return False
        perm, qk, vo = parts
        if not self.permute_heads and not torch.equal(perm, torch.arange(self.heads)):
            return False
        for kind, X, d in ((self.qk, qk, self.dk), (self.vo, vo, self.dv)):
            if not d:
                continue
            eye = torch.eye(d, dtype=X.dtype)
            if kind == "identity" and not torch.allclose(X, eye.expand_as(X), atol=atol):
                return False
            if kind in ("scalar", "positive", "sign") and not torch.allclose(X, X[:, :1, :1] * eye, atol=atol):
                return False
            if kind == "positive" and not bool((X[:, 0, 0] > atol).all()):
                return False
            if kind == "sign" and not torch.allclose(X[:, 0, 0].abs(), torch.ones(len(X), dtype=X.dtype), atol=atol):
                return False
            if kind in MONOMIAL_INNER and not _monomial_blocks(X, kind, atol):
                return False
            # smallest singular value, from the eigenvalues of X^T X (much cheaper than an SVD here)
            with one_thread():
                smallest = float(torch.linalg.eigvalsh(X.mT @ X).min().clamp_min(0).sqrt())
            if smallest <= atol:
                return False
        return True


def _monomial_blocks(X: torch.Tensor, kind: str, atol: float) -> bool:
    """Is every block of X (heads, d, d) a permutation times a diagonal whose entries ``kind`` allows (non-zero,
    positive, ±1, 1)?"""
    big = X.abs() > atol
    if not (bool((big.sum(1) == 1).all()) and bool((big.sum(2) == 1).all())):
        return False
    entries = X[big]
    if kind == "positive_monomial":
        return bool((entries > 0).all())
    if kind == "signed_permutation":
        return torch.allclose(entries.abs(), torch.ones_like(entries), atol=atol)
    if kind == "permutation":
        return torch.allclose(entries, torch.ones_like(entries), atol=atol)
    return True
