"""Input checks and conversions shared by the similarity measures.

Every measure takes NumPy arrays or torch tensors of shape (N, d) or (N, C, *spatial) (N samples first).
They are converted to floating-point torch tensors without a copy where possible: float64 stays float64,
every other dtype becomes float32. Bad input raises ``ValueError`` naming the problem and what to do.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._util import as_tensor


def to_features(x, name: str = "X", device: torch.device | str | None = None,
                min_samples: int = 1) -> torch.Tensor:
    """Convert ``x`` (NumPy array or tensor, (N, d) or (N, C, *spatial)) to a float tensor and check it.

    Tensors that require grad are detached (similarity measures are statistics, not losses); float16,
    bfloat16, integer and bool inputs become float32; non-contiguous inputs are fine. Raises ``ValueError``
    for fewer than two dimensions, fewer than ``min_samples`` samples, no features, or NaN/Inf entries.
    """
    if isinstance(x, np.ndarray) and x.dtype == object:
        raise ValueError(f"{name}: an object array cannot be used as features; pass a numeric array")
    if isinstance(x, str | bytes | dict | set) or x is None:
        raise ValueError(f"{name}: expected a NumPy array or a torch tensor of features, got {type(x).__name__}")
    t = as_tensor(x, name=name)
    if t.is_complex():
        raise ValueError(f"{name}: complex features are not supported")
    t = t.detach()
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    if t.ndim < 2:
        raise ValueError(f"{name}: expected features of shape (N, d) or (N, C, *spatial), got shape "
                         f"{tuple(t.shape)}; reshape a single feature vector per sample to (N, 1)")
    if t.shape[0] == 0 or t[0].numel() == 0:
        raise ValueError(f"{name}: empty features, shape {tuple(t.shape)}")
    if t.shape[0] < min_samples:
        raise ValueError(f"{name}: {t.shape[0]} sample(s) given; this measure needs at least {min_samples} "
                         "(a similarity between representations is a statistic over several inputs)")
    # NaN/Inf propagate through a sum, so a finite sum proves every entry finite; the elementwise check
    # runs only when the sum is not finite, to tell an overflow of the sum from bad entries.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: {bad} entries are NaN or infinite; similarity measures need finite "
                         "features (check the model for overflow or the data for missing values)")
    return t


# Inputs whose largest magnitude lies in [2**-SAFE_EXP, 2**SAFE_EXP] are used as they are; others are first
# scaled by a power of two (exact) so that squares and sums of squares cannot overflow or underflow.
SAFE_EXP = 30


def unit_scale(t: torch.Tensor) -> torch.Tensor:
    """``t`` times a power of two that brings its largest magnitude into [0.5, 1) -- exactly, no rounding --
    when that magnitude is outside [2**-30, 2**30]; otherwise ``t`` itself (no copy).

    Only for scale-invariant measures (CKA with linear, median-bandwidth RBF or max kernels; Procrustes):
    float32 features scaled by 1e30 or 1e-30 then give the same value as unscaled ones.
    """
    m = float(t.abs().amax())
    if m == 0.0 or 2.0 ** -SAFE_EXP <= m <= 2.0 ** SAFE_EXP:
        return t
    exponent = math.frexp(m)[1]
    return torch.ldexp(t, torch.tensor(-exponent, dtype=torch.int32, device=t.device)).to(t.dtype)


def check_varies(x: torch.Tensor, name: str = "X") -> None:
    """ValueError when every sample has the same features: no similarity measure is defined for them."""
    if bool((x == x[:1]).all()):
        raise ValueError(f"{name}: all {x.shape[0]} samples have identical features (constant over the data), "
                         "so there is no variation to compare; CKA is undefined")


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
