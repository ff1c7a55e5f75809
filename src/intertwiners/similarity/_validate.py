"""Input checks and conversions shared by the similarity measures.

Every measure takes NumPy arrays or torch tensors of shape (N, d) or (N, C, *spatial) (N samples first).
They are converted to floating-point torch tensors without a copy where possible: float64 stays float64,
every other dtype becomes float32. Bad input raises ``ValueError`` naming the problem and what to do.
"""

from __future__ import annotations

import numpy as np
import torch

from .._util import as_tensor


def to_features(x, name: str = "X", device: torch.device | str | None = None) -> torch.Tensor:
    """Convert ``x`` (NumPy array or tensor, (N, d) or (N, C, *spatial)) to a float tensor and check it.

    Raises ``ValueError`` for fewer than two dimensions, no samples, no features, or NaN/Inf entries.
    """
    if isinstance(x, np.ndarray) and x.dtype == object:
        raise ValueError(f"{name}: an object array cannot be used as features; pass a numeric array")
    t = as_tensor(x, name=name)
    if t.is_complex():
        raise ValueError(f"{name}: complex features are not supported")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    if t.ndim < 2:
        raise ValueError(f"{name}: expected features of shape (N, d) or (N, C, *spatial), got shape "
                         f"{tuple(t.shape)}; reshape a single feature vector per sample to (N, 1)")
    if t.shape[0] == 0 or t[0].numel() == 0:
        raise ValueError(f"{name}: empty features, shape {tuple(t.shape)}")
    # NaN/Inf propagate through a sum, so a finite sum proves every entry finite; the elementwise check
    # runs only when the sum is not finite, to tell an overflow of the sum from bad entries.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: {bad} entries are NaN or infinite; similarity measures need finite "
                         "features (check the model for overflow or the data for missing values)")
    return t


def check_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("X", "Y")) -> None:
    """Both feature sets must describe the same N samples, in the same order."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{names[0]} has {x.shape[0]} samples and {names[1]} has {y.shape[0]}; similarity "
                         "compares the representations of the same inputs, so N must match")


def check_unbiased_n(n: int, what: str = "the unbiased estimator") -> None:
    """The unbiased HSIC_1 divides by n(n-3): it needs at least 4 samples."""
    if n < 4:
        raise ValueError(f"{what} (HSIC_1 of Nguyen, Raghu & Kornblith 2021, eq. 3) needs at least 4 samples, "
                         f"got {n}; use more samples (or larger batches) or estimator='biased'")


def common_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """float64 when either input is float64, float32 otherwise."""
    return torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32


def channels_last_matrix(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C): one row per sample and position, one column per channel.

    (N, d) input is returned unchanged. This is the matrix on which the channel groups act.
    """
    if x.ndim == 2:
        return x
    c = x.shape[1]
    return x.reshape(x.shape[0], c, -1).transpose(1, 2).reshape(-1, c)


def dead_columns(sq_norms: torch.Tensor, scale: torch.Tensor | float | None = None,
                 rtol: float = 1e-12) -> torch.Tensor:
    """Indices of columns whose squared norm is zero (relative to the largest one, ``rtol``)."""
    ref = sq_norms.max() if scale is None else scale
    return torch.nonzero(sq_norms <= rtol * ref).flatten()


def raise_dead(name: str, idx: torch.Tensor, n_cols: int, what: str, unit: str = "column") -> None:
    """Raise the ValueError for units that cannot be normalised (dead ReLU units)."""
    shown = idx[:10].tolist()
    more = "" if len(idx) <= 10 else f" (and {len(idx) - 10} more)"
    raise ValueError(
        f"{name}: {len(idx)} of {n_cols} {unit}s are {what} over the data (dead units, e.g. a ReLU that never "
        f"fires), so they cannot be scaled to unit norm: indices {shown}{more}. Pass drop_dead=True to drop "
        f"them before comparing, or compare on more data")
