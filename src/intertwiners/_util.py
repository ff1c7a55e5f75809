"""Small shared helpers: devices, array conversion, seeding."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a torch device for ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda[:k]"`` or ``"mps"``.

    The one device check of the library and the CLI: a name torch does not know (``"tpu"``), a device type
    that is not available here, or a CUDA index beyond the visible devices raises ``ValueError``.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str | torch.device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:K' or a torch.device, got "
                         f"{type(device).__name__} {device!r}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:K'") from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but MPS is not available; use 'auto' or 'cpu'")
        return dev
    raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:K'")


@contextlib.contextmanager
def one_thread():
    """Run small batched linear algebra (inverses, QR, eigenvalues of many (d, d) blocks) on one CPU thread.

    torch's multi-threaded LAPACK calls on small matrices spend most of their time waiting for the other
    threads; on a busy 2-core machine one thread was 40x faster (0.002 s against 0.08 s for twelve 64x64
    inverses). The previous thread count is restored afterwards.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_NUMBA_THREADS_STARTED = False


def start_numba_threads() -> int:
    """Start numba's parallel threading layer without changing torch's thread count; returns numba's count.

    Starting it (the first parallel numba call of a process) resets the OpenMP thread count, which torch's
    intra-op pool shares: a user who had called ``torch.set_num_threads(1)`` would find torch on every core
    after a first permutation test or max kernel (seen in the test workers: two spinning threads each, 3-4x
    the CPU). Called before every parallel numba loop of the library; only the first call does anything.
    """
    global _NUMBA_THREADS_STARTED
    import numba

    if not _NUMBA_THREADS_STARTED:
        before = torch.get_num_threads()
        numba.get_num_threads()                  # launches the threading layer
        torch.set_num_threads(before)
        _NUMBA_THREADS_STARTED = True
    return numba.get_num_threads()


def channels_last_trains_safely(model: torch.nn.Module) -> bool:
    """False when ``model`` has a trainable 1x1 convolution with a stride above 1 and fewer than 8 input
    channels per group: on CPUs, torch 2.13's channels-last weight gradient of such a convolution writes
    past its buffer (heap corruption: "double free or corruption", seen at one thread, e.g. the 4-to-8-channel
    shortcut of a width-4 ResNet; ``tests/test_batched.py``). Training then keeps the default memory format.
    """
    for m in model.modules():
        if (isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad and tuple(m.kernel_size) == (1, 1)
                and tuple(m.stride) != (1, 1) and m.in_channels // m.groups < 8):
            return False
    return True


def max_nan(*values: float) -> float:
    """The largest of ``values``, or NaN when any of them is NaN (``max(x, nan)`` would silently keep ``x``)."""
    out = -math.inf
    for v in values:
        v = float(v)
        if math.isnan(v):
            return math.nan
        out = v if v > out else out
    return out


def as_tensor(x: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              name: str = "input") -> torch.Tensor:
    """Convert a NumPy array, a torch tensor or a nested list into a tensor (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as err:  # pragma: no cover - message only
            raise ValueError(f"{name}: cannot convert object of type {type(x).__name__} to a tensor") from err
    if dtype is not None or device is not None:
        t = t.to(dtype=dtype or t.dtype, device=device or t.device)
    return t


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def parse_seeds(text: str | int | list[int]) -> list[int]:
    """Parse ``"0-7"``, ``"0,3,5"``, ``"2"`` or a list into a sorted list of distinct seeds (each >= 0)."""
    def seed(v) -> int:
        if isinstance(v, bool) or (not isinstance(v, int) and not str(v).strip().isdigit()):
            raise ValueError(f"seeds must be non-negative integers, e.g. '0-7' or '0,3,5'; got {v!r} in {text!r}")
        return int(v)

    if isinstance(text, int) and not isinstance(text, bool):
        return [seed(text)]
    if isinstance(text, list | tuple):
        seeds = sorted({seed(s) for s in text})
        if not seeds:
            raise ValueError("no seeds were given")
        return seeds
    seeds: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            lo_i, hi_i = seed(lo), seed(hi)
            if hi_i < lo_i:
                raise ValueError(f"seed range {part!r} is empty (end before start)")
            if hi_i - lo_i >= 100_000:
                raise ValueError(f"seed range {part!r} holds {hi_i - lo_i + 1} seeds; give at most 100000")
            seeds.update(range(lo_i, hi_i + 1))
        else:
            seeds.add(seed(part))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}; use e.g. '0-7' or '0,1,2'")
    return sorted(seeds)


def save_figure(fig, path, dpi: int = 120, close: bool = True):
    """Lay out a matplotlib figure, write it to ``path`` (parent folders created) and close it unless asked not to.

    Returns the path as a ``pathlib.Path``.
    """
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    if close:
        plt.close(fig)
    return path


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc give blocks of at least ``threshold`` bytes back to the system as soon as they are freed.

    glibc raises its mmap threshold (up to 32 MiB) after large blocks are freed, and then serves tensors below
    it from its heap, where freed pages stay resident: a process that makes and frees many tensor-sized
    temporaries grows by a model's worth. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, for this
    process from now on) keeps the resident set at what is alive. True when set; False where the C library is
    not glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold)))
