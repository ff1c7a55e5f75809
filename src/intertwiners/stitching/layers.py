"""Stitching layers: maps over the channel axis of hidden features (a 1x1 convolution for (N, C, H, W)).

Every layer maps front's features h (N, C_in, *spatial) to back's input (N, C_out, *spatial) by
``out[:, c] = sum_k M[c, k] h[:, k] + b[c]``. ``layer.matrix`` is the (C_out, C_in) matrix M the layer
applies *at evaluation* and ``layer.bias`` its bias (``None`` when the layer has none).

Kinds (``KINDS``):

* ``full``: any affine map (M and b free), the classic stitching layer.
* ``low_rank``: M = U V^T with U (C_out, r) and V (C_in, r), plus a bias; rank(M) <= r.
* ``grelu``: M = P D, the intertwiner group of ReLU. During training P is a doubly-stochastic matrix
  (the Birkhoff polytope, the convex hull of the permutations): after every optimiser step its entries are
  clamped at 0 and Sinkhorn-normalised; the regulariser ``-alpha * ||P||_F`` (largest at the vertices)
  pushes it towards a permutation. By default the training forward pass already uses the rounded P, with
  the gradient passed straight through to the relaxed P (``relaxation="soft"`` trains with P itself, as
  the authors did). In eval mode P is rounded to the nearest permutation by the Hungarian
  algorithm (``scipy.optimize.linear_sum_assignment``), so the evaluated layer is exactly a permutation
  times a positive diagonal. D = diag(exp(log_scale)) > 0. No bias (G_ReLU is linear).
* ``permutation``: the same relaxation without the scalings (M = P).
* ``orthogonal``: M orthogonal, through ``torch.nn.utils.parametrizations.orthogonal`` (matrix exponential
  of a skew matrix times a base); no bias.
* ``identity``: M = I, nothing to train (the baseline; the stitched network of a model with itself is the
  model).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

KINDS = ("full", "low_rank", "grelu", "permutation", "orthogonal", "identity")
RELAXATIONS = ("straight_through", "soft")


def apply_channel_map(h: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, c] = sum_k matrix[c, k] h[:, k] + bias[c]`` over the channel axis 1.

    h: (N, C_in) or (N, C_in, *spatial); matrix: (C_out, C_in); bias: (C_out,) or None.
    Returns (N, C_out) or (N, C_out, *spatial). A 2-D spatial input is a 1x1 convolution.
    """
    if h.ndim < 2:
        raise ValueError(f"stitching needs features (N, C, ...), got shape {tuple(h.shape)}")
    if h.shape[1] != matrix.shape[1]:
        raise ValueError(f"stitching layer expects {matrix.shape[1]} channels, features have {h.shape[1]}")
    if h.ndim == 2:
        return F.linear(h, matrix, bias)
    if h.ndim == 4:
        return F.conv2d(h, matrix[:, :, None, None], bias)
    out = torch.movedim(h, 1, -1) @ matrix.T
    if bias is not None:
        out = out + bias
    return torch.movedim(out, -1, 1)


def sinkhorn_(p: torch.Tensor, iterations: int = 100, tol: float = 1e-5, floor: float = 1e-6,
              eps: float = 1e-12) -> torch.Tensor:
    """Project ``p`` (C, C) in place onto the Birkhoff polytope: clamp entries at ``floor`` (>= 0; a small
    positive floor keeps every row and column supported, so that Sinkhorn converges whatever the optimiser
    did), then alternately normalise rows and columns to sum 1 (Sinkhorn-Knopp) until every row sum is
    within ``tol`` of 1 (checked every 5 sweeps) or ``iterations`` sweeps are done; then round what is left
    onto the polytope (:func:`round_to_birkhoff_`: near a vertex Sinkhorn can need thousands of sweeps). Rows
    and columns sum to 1 up to rounding, entries stay >= 0. Returns ``p``."""
    p.clamp_(min=floor)
    for i in range(iterations):
        p.div_(p.sum(dim=1, keepdim=True).clamp_min(eps))
        p.div_(p.sum(dim=0, keepdim=True).clamp_min(eps))
        if i % 5 == 4 and float((p.sum(dim=1) - 1).abs().max()) <= tol:
            break
    return round_to_birkhoff_(p, eps)


def round_to_birkhoff_(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Round a non-negative ``p`` (C, C) in place to a doubly stochastic matrix (Altschuler, Weed & Rigollet
    2017, Algorithm 2): scale down the rows, then the columns, that sum to more than 1; what rows and columns
    still lack, a >= 0 and b >= 0 with equal totals, is added as the rank-one a bᵀ / sum(a). The result moves
    by at most twice the L1 distance of p's row and column sums from 1. Returns ``p``."""
    p.mul_(p.sum(dim=1, keepdim=True).clamp_min(eps).reciprocal().clamp(max=1.0))
    p.mul_(p.sum(dim=0, keepdim=True).clamp_min(eps).reciprocal().clamp(max=1.0))
    a, b = (1 - p.sum(dim=1)).clamp_min(0), (1 - p.sum(dim=0)).clamp_min(0)
    return p.add_(torch.outer(a, b) / a.sum().clamp_min(eps))


def hungarian_round(p: torch.Tensor) -> torch.Tensor:
    """The permutation matrix nearest to ``p`` (C, C): argmax of <P, p> over permutations (Hungarian)."""
    rows, cols = linear_sum_assignment(p.detach().cpu().double().numpy(), maximize=True)
    out = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    out[torch.as_tensor(rows, device=p.device), torch.as_tensor(cols, device=p.device)] = 1
    return out


class StitchingLayer(nn.Module):
    """Base class: subclasses define ``train_matrix()`` (the matrix used in training mode), ``matrix``
    (the one used in eval mode) and ``bias``; ``project_()`` runs after each optimiser step and
    ``regularizer()`` is added to the loss."""

    kind = "base"

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"stitching layer needs positive channel counts, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)

    def train_matrix(self) -> torch.Tensor:
        return self.matrix

    @property
    def matrix(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor | None:
        return None

    def regularizer(self) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def project_(self) -> None:
        """Bring the parameters back to the feasible set after an optimiser step (default: nothing)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.train_matrix() if self.training else self.matrix
        return apply_channel_map(h, m.to(h.dtype), None if self.bias is None else self.bias.to(h.dtype))

    @torch.no_grad()
    def set_from(self, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Initialise from a (C_out, C_in) matrix (and bias) of this layer's kind (e.g. a closed-form match)."""
        raise ValueError(f"{self.kind} stitching layer cannot be initialised from a matrix")

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


def _square(kind: str, in_channels: int, out_channels: int) -> None:
    if in_channels != out_channels:
        raise ValueError(f"{kind} stitching needs the same number of channels on both sides, "
                         f"got {in_channels} -> {out_channels}")


class FullStitch(StitchingLayer):
    """Affine map over channels (1x1 conv / linear with bias). Initialised to the identity (or zeros
    off the diagonal when the widths differ)."""

    kind = "full"

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.weight = nn.Parameter(torch.eye(out_channels, in_channels))
        self.bias_ = nn.Parameter(torch.zeros(out_channels))

    @property
    def matrix(self) -> torch.Tensor:
        return self.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.bias_

    @torch.no_grad()
    def set_from(self, matrix, bias=None):
        self.weight.copy_(matrix)
        self.bias_.copy_(bias if bias is not None else torch.zeros_like(self.bias_))


class LowRankStitch(StitchingLayer):
    """M = U V^T (rank <= r) plus a bias. Initialised to a truncated identity (U = V = first r columns of I)."""

    kind = "low_rank"

    def __init__(self, in_channels: int, out_channels: int, rank: int):
        super().__init__(in_channels, out_channels)
        if rank is None or int(rank) != rank or rank < 1:
            raise ValueError(f"low_rank stitching needs a positive integer rank, got {rank!r}")
        if rank > min(in_channels, out_channels):
            raise ValueError(f"rank {rank} exceeds the channel counts {in_channels}, {out_channels}")
        self.rank = int(rank)
        self.u = nn.Parameter(torch.eye(out_channels, self.rank))
        self.v = nn.Parameter(torch.eye(in_channels, self.rank))
        self.bias_ = nn.Parameter(torch.zeros(out_channels))

    @property
    def matrix(self) -> torch.Tensor:
        return self.u @ self.v.T

    @property
    def bias(self) -> torch.Tensor:
        return self.bias_

    def forward(self, h):
        # two thin maps are cheaper than the (C, C) product when r << C
        dt = h.dtype
        return apply_channel_map(apply_channel_map(h, self.v.T.to(dt)), self.u.to(dt), self.bias_.to(dt))

    @torch.no_grad()
    def set_from(self, matrix, bias=None):
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        root = s[: self.rank].sqrt()
        self.u.copy_((u[:, : self.rank] * root).to(self.u.dtype))
        self.v.copy_((vh[: self.rank].T * root).to(self.v.dtype))
        self.bias_.copy_(bias if bias is not None else torch.zeros_like(self.bias_))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, rank={self.rank}"


class PermutationStitch(StitchingLayer):
    """M = P with P relaxed to the Birkhoff polytope in training and rounded (Hungarian) in eval mode.

    ``alpha`` weighs the vertex-seeking regulariser ``-alpha * ||P||_F``; ``sinkhorn_iterations`` bounds the
    projection after each step. ``relaxation``: ``"soft"`` trains the network with the doubly-stochastic P
    itself (the authors' way); ``"straight_through"`` (default) runs the forward pass with P rounded to its
    permutation (so training sees the layer that is evaluated) and sends the gradient to the relaxed P.
    Initialised to the identity permutation.
    """

    kind = "permutation"
    has_scale = False

    def __init__(self, in_channels: int, out_channels: int, alpha: float = 0.1, sinkhorn_iterations: int = 100,
                 relaxation: str = "straight_through"):
        super().__init__(in_channels, out_channels)
        _square(self.kind, in_channels, out_channels)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
        self.alpha, self.sinkhorn_iterations = float(alpha), int(sinkhorn_iterations)
        self.relaxation = relaxation
        self.p = nn.Parameter(torch.eye(in_channels))
        self._hard_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def scale(self) -> torch.Tensor:
        return torch.ones(self.in_channels, dtype=self.p.dtype, device=self.p.device)

    def hard_permutation(self) -> torch.Tensor:
        """P rounded to a permutation matrix (cached until P changes)."""
        p = self.p.detach()
        cache = self._hard_cache
        if cache is None or cache[0].device != p.device or not torch.equal(cache[0], p):
            self._hard_cache = (p.clone(), hungarian_round(p))
        return self._hard_cache[1]

    def train_matrix(self):
        if self.relaxation == "straight_through":
            # forward: the rounded permutation (the layer that will be evaluated); backward: into relaxed P
            p = self.hard_permutation() + self.p - self.p.detach()
        else:
            p = self.p
        return p * self.scale()[None, :]

    @property
    def matrix(self):
        return self.hard_permutation() * self.scale()[None, :]

    def regularizer(self):
        return -self.alpha * torch.linalg.matrix_norm(self.p) if self.alpha > 0 else None

    @torch.no_grad()
    def project_(self):
        sinkhorn_(self.p.detach(), self.sinkhorn_iterations)

    @torch.no_grad()
    def set_from(self, matrix, bias=None, smoothing: float = 0.0):
        """Take the permutation pattern of ``matrix`` (= P D with D > 0); ``smoothing`` mixes in the
        barycentre J/C so that the relaxation starts strictly inside the polytope."""
        if bias is not None:
            raise ValueError(f"{self.kind} stitching has no bias")
        perm = hungarian_round(matrix.abs())
        c = self.in_channels
        self.p.copy_((1 - smoothing) * perm + smoothing / c)
        if self.has_scale:
            self.log_scale.copy_(torch.log((perm * matrix).sum(0).clamp_min(1e-12)))

    @torch.no_grad()
    def set_barycenter(self):
        self.p.fill_(1.0 / self.in_channels)


class GReLUStitch(PermutationStitch):
    """M = P D: P relaxed to the Birkhoff polytope (rounded at evaluation), D = diag(exp(log_scale)) > 0."""

    kind = "grelu"
    has_scale = True

    def __init__(self, in_channels: int, out_channels: int, alpha: float = 0.1, sinkhorn_iterations: int = 100,
                 relaxation: str = "straight_through"):
        super().__init__(in_channels, out_channels, alpha, sinkhorn_iterations, relaxation)
        self.log_scale = nn.Parameter(torch.zeros(in_channels))

    def scale(self):
        return self.log_scale.exp()


class OrthogonalStitch(StitchingLayer):
    """M orthogonal (M^T M = I), parametrised by ``torch.nn.utils.parametrizations.orthogonal``; no bias."""

    kind = "orthogonal"

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        _square(self.kind, in_channels, out_channels)
        self.linear = orthogonal(nn.Linear(in_channels, out_channels, bias=False))
        with torch.no_grad():
            self.linear.weight = torch.eye(in_channels)

    @property
    def matrix(self):
        return self.linear.weight

    @torch.no_grad()
    def set_from(self, matrix, bias=None):
        if bias is not None:
            raise ValueError("orthogonal stitching has no bias")
        self.linear.weight = matrix.to(self.linear.weight.dtype)


class IdentityStitch(StitchingLayer):
    """M = I: returns the features unchanged (bit-exact); nothing to train."""

    kind = "identity"

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        _square(self.kind, in_channels, out_channels)
        self.register_buffer("eye", torch.eye(in_channels), persistent=False)

    @property
    def matrix(self):
        return self.eye

    def forward(self, h):
        if h.shape[1] != self.in_channels:
            raise ValueError(f"identity stitching expects {self.in_channels} channels, features have {h.shape[1]}")
        return h


def parse_kind(kind: str, rank: int | None = None) -> tuple[str, int | None]:
    """``"low_rank:4"`` -> ``("low_rank", 4)``; other kinds pass through. Validates the kind and rank."""
    if not isinstance(kind, str):
        raise ValueError(f"stitching kind must be a string, got {type(kind).__name__}")
    name, _, arg = kind.strip().lower().partition(":")
    if name not in KINDS:
        raise ValueError(f"unknown stitching kind {kind!r}; known: {', '.join(KINDS)} (low_rank:R for rank R)")
    if arg:
        if name != "low_rank":
            raise ValueError(f"only low_rank takes a parameter (low_rank:R), got {kind!r}")
        try:
            parsed = int(arg)
        except ValueError:
            raise ValueError(f"rank in {kind!r} must be an integer") from None
        if rank is not None and rank != parsed:
            raise ValueError(f"kind {kind!r} and rank={rank} disagree")
        rank = parsed
    if name == "low_rank" and rank is None:
        raise ValueError("low_rank stitching needs rank=R (or kind='low_rank:R')")
    if name != "low_rank" and rank is not None:
        raise ValueError(f"rank applies to low_rank stitching only, not {name!r}")
    return name, rank


def kind_label(kind: str, rank: int | None) -> str:
    """The label used in result rows and plots: ``low_rank:4``, ``grelu``..."""
    return f"{kind}:{rank}" if kind == "low_rank" else kind


def make_layer(kind: str, in_channels: int, out_channels: int | None = None, *, rank: int | None = None,
               alpha: float = 0.1, sinkhorn_iterations: int = 100,
               relaxation: str = "straight_through") -> StitchingLayer:
    """Build a stitching layer of ``kind`` (see ``KINDS``; ``"low_rank:R"`` accepted) from C_in to C_out channels."""
    name, rank = parse_kind(kind, rank)
    out_channels = in_channels if out_channels is None else out_channels
    if name == "full":
        return FullStitch(in_channels, out_channels)
    if name == "low_rank":
        return LowRankStitch(in_channels, out_channels, rank)
    if name == "grelu":
        return GReLUStitch(in_channels, out_channels, alpha, sinkhorn_iterations, relaxation)
    if name == "permutation":
        return PermutationStitch(in_channels, out_channels, alpha, sinkhorn_iterations, relaxation)
    if name == "orthogonal":
        return OrthogonalStitch(in_channels, out_channels)
    return IdentityStitch(in_channels, out_channels)


def is_permutation_times_positive_diagonal(m: torch.Tensor) -> bool:
    """True iff ``m`` (C, C) has exactly one nonzero entry per row and column, all positive."""
    a = np.asarray(m.detach().cpu().double())
    if a.ndim != 2 or a.shape[0] != a.shape[1] or (a < 0).any():
        return False
    nz = a != 0
    return bool((nz.sum(0) == 1).all() and (nz.sum(1) == 1).all())
