"""Small shared helpers: devices, array conversion, seeding."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a torch device for ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda[:k]"``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return dev


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
    """Parse ``"0-7"``, ``"0,3,5"``, ``"2"`` or a list into a sorted list of distinct seeds."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list | tuple):
        return sorted({int(s) for s in text})
    seeds: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(f"seed range {part!r} is empty (end before start)")
            seeds.update(range(lo_i, hi_i + 1))
        else:
            seeds.add(int(part))
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
