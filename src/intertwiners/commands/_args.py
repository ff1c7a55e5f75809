"""Argument checks shared by the subcommands: run before any file is opened or written.

* argparse ``type=`` functions (:func:`positive_int`, :func:`nonneg_int`, :func:`finite_float`, ...) so that a bad
  number is a one-line usage error before anything runs;
* :func:`device` — the one device check (``--device tpu`` fails at once, not after training);
* :func:`out_dir` — ``--out`` must be (or become) a writable folder: a file, ``/proc/x`` or a read-only place
  fails before any work is done;
* :func:`atomic_write` / :func:`write_csv` — outputs are written under a temporary name and renamed, so an
  error never leaves a truncated file where a complete one was.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def finite_float(text: str) -> float:
    """A finite number (no nan, inf)."""
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = finite_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return v


def open_fraction(text: str) -> float:
    """A number in (0, 1)."""
    v = finite_float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return v


def device(name: str, option: str = "--device") -> str:
    """Check ``--device`` (raises ValueError naming the option); returns the name unchanged."""
    from .._util import resolve_device

    try:
        resolve_device(name)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None
    return name


def out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Make sure ``path`` is a folder this process can write to (created when missing); ValueError otherwise.

    Checked by creating the folder and a temporary file in it, so ``/proc/x``, a read-only disk or an ``--out``
    that names an existing file fail before any work is done.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {out}: cannot write there ({err.strerror or err})") from None
    return out


def input_path(path: str | os.PathLike, option: str, kind: str = "any") -> Path:
    """An existing file or folder given on the command line (``kind``: any | file | dir)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{option} {p} does not exist")
    if kind == "dir" and not p.is_dir():
        raise ValueError(f"{option} {p} is not a folder")
    if kind == "file" and not p.is_file():
        raise ValueError(f"{option} {p} is not a file")
    return p


def names(text: str | None, option: str, allowed: Iterable[str] | None = None) -> list[str]:
    """A comma-separated list (empty items dropped); every item must be in ``allowed`` when that is given."""
    items = [t.strip() for t in str(text or "").split(",") if t.strip()]
    if allowed is not None:
        allowed = list(allowed)
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"{option}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    return items


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", keep_partial: str | os.PathLike | None = None,
                 **kwargs) -> Iterator:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error remove it (or, with
    ``keep_partial``, rename what was written to that name, so rows computed before the error are kept).

    A reader (or a later run) never sees a truncated ``path``: it holds the old content until the new one
    is complete.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            if keep_partial is not None and os.path.getsize(tmp) > 0:
                os.replace(tmp, keep_partial)
            else:
                os.unlink(tmp)
        except OSError:
            pass
        raise


def write_csv(path: str | os.PathLike, fields: Iterable[str], rows: Iterable[dict]) -> Path:
    """Write ``rows`` as CSV to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
