"""Stitching sweeps: model pairs x sites x kinds, one plain-dict row per stitch (the data of Fig. 1).

Pairs are drawn without repetition: an unordered pair {i, j} (i != j) appears at most once, and which
model is front is decided by the same seeded draw. Models are ``nn.Module`` objects or folders written
by ``intertwiners train`` (``.../seed<k>/`` with ``model.safetensors``, ``config.json``, ``metrics.json``).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from .. import models as model_zoo
from .stitch import as_dataset, evaluate, stitch, stitchable_sites

DEFAULT_KINDS = ("full", "low_rank:1", "low_rank:4", "grelu")
ROW_KEYS = ("pair", "front", "back", "site", "site_index", "kind", "rank", "accuracy", "front_accuracy",
            "back_accuracy", "penalty", "val_accuracy", "init_val_accuracy", "best_epoch", "epochs", "seconds",
            "seed", "arch", "activation", "dataset")


def draw_pairs(n_models: int, n_pairs: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """``n_pairs`` distinct unordered pairs of model indices (as ordered (front, back) tuples), seeded.

    ``n_pairs=None`` takes every pair once. Raises ValueError if fewer than 2 models or too many pairs.
    """
    if n_models < 2:
        raise ValueError(f"stitching needs at least 2 models, got {n_models}")
    all_pairs = list(itertools.combinations(range(n_models), 2))
    if n_pairs is None:
        n_pairs = len(all_pairs)
    if not 1 <= n_pairs <= len(all_pairs):
        raise ValueError(f"{n_models} models give {len(all_pairs)} distinct pairs; asked for {n_pairs}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(all_pairs), size=n_pairs, replace=False)
    flips = rng.random(n_pairs) < 0.5
    return [(all_pairs[c][1], all_pairs[c][0]) if f else all_pairs[c] for c, f in zip(chosen, flips)]


def model_folders(zoo: str | Path) -> list[Path]:
    """The complete model folders (``seed<k>`` with weights, config and metrics) under a zoo folder, by seed.

    ``zoo`` is ``OUT/<arch>-<dataset>`` (holding ``seed<k>/``) or ``OUT`` holding exactly one such folder.
    """
    zoo = Path(zoo)
    if not zoo.is_dir():
        raise ValueError(f"zoo folder {zoo} does not exist")

    def complete(p: Path) -> bool:
        return all((p / f).is_file() for f in ("model.safetensors", "config.json", "metrics.json"))

    def is_seed(p: Path) -> bool:   # seed<k> only: never a half-written seed<k>.partial
        return p.is_dir() and p.name[4:].isdigit() and complete(p)

    found = sorted((p for p in zoo.glob("seed*") if is_seed(p)), key=lambda p: int(p.name[4:]))
    if not found:
        subs = [p for p in zoo.iterdir() if p.is_dir() and any(is_seed(q) for q in p.glob("seed*"))]
        if len(subs) == 1:
            return model_folders(subs[0])
        if len(subs) > 1:
            raise ValueError(f"{zoo} holds several zoos ({', '.join(p.name for p in subs)}); name one of them")
        raise ValueError(f"no trained models (seed*/model.safetensors, config.json, metrics.json) under {zoo}")
    return found


def _load(entry) -> tuple[nn.Module, str, dict]:
    """(model, name, info) for an nn.Module or a model folder; info holds arch/activation/dataset."""
    if isinstance(entry, nn.Module):
        cfg = getattr(entry, "intertwiners_config", {}) or {}
        return entry, type(entry).__name__, {"arch": cfg.get("arch"),
                                             "activation": cfg.get("kwargs", {}).get("activation")}
    folder = Path(entry)
    model = model_zoo.load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    info = {"arch": cfg.get("arch"), "activation": cfg.get("kwargs", {}).get("activation")}
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        info["dataset"] = json.loads(metrics_file.read_text()).get("dataset")
    return model, str(folder), info


def stitch_sweep(models: Sequence, sites: Sequence[str] | None = None, kinds: Sequence[str] = DEFAULT_KINDS,
                 train_data=None, test_data=None, *, n_pairs: int | None = 4, pair_seed: int = 0,
                 pairs: Sequence[tuple[int, int]] | None = None, seed: int = 0, data_root: str | Path | None = None,
                 on_row: Callable[[dict], None] | None = None, skip: Callable[[dict], bool] | None = None,
                 device: str = "auto", progress: bool = False, **stitch_kwargs) -> list[dict]:
    """Stitch model pairs at every site with every kind; return one plain dict per stitch (``ROW_KEYS``).

    Args:
        models: ``nn.Module`` objects or model folders (see :func:`model_folders`), all with the sites.
        sites: activation sites (default: every stitchable site of the first model, forward order).
        kinds: stitching kinds, ``"low_rank:R"`` for rank R (default: full, low_rank:1, low_rank:4, grelu).
        train_data, test_data: datasets; when omitted, loaded by the ``dataset`` named in the first
            folder's ``metrics.json`` (``data_root`` for CIFAR-10).
        n_pairs, pair_seed: how many distinct pairs to draw (:func:`draw_pairs`); or ``pairs`` explicitly,
            as (front index, back index) tuples.
        seed: seed of every stitch (shuffling, initialisation).
        on_row: called with each row as soon as it exists (e.g. to store it); ``skip(key)`` with
            ``{"front", "back", "site", "kind"}`` returns True for stitches already done (resuming).
        stitch_kwargs: passed to :func:`stitch` (``epochs``, ``settings``, ``lr`` ...).
    """
    loaded = [_load(m) for m in models]
    if pairs is None:
        pairs = draw_pairs(len(loaded), n_pairs, pair_seed)
    for i, j in pairs:
        if not (0 <= i < len(loaded) and 0 <= j < len(loaded)) or i == j:
            raise ValueError(f"invalid pair ({i}, {j}) for {len(loaded)} models")
    if train_data is None or test_data is None:
        from ..data import load as load_data
        dataset = loaded[0][2].get("dataset")
        if dataset is None:
            raise ValueError("train_data/test_data not given and the models' metrics.json names no dataset")
        train_data, test_data = load_data(dataset, data_root)
    train_data, test_data = as_dataset(train_data, "train_data"), as_dataset(test_data, "test_data")
    all_sites = stitchable_sites(loaded[0][0])
    sites = list(all_sites) if sites is None else list(sites)
    for s in sites:
        if s not in all_sites:
            raise ValueError(f"site {s!r} is not stitchable; stitchable sites: {all_sites}")
    from .._util import resolve_device
    dev = resolve_device(device)
    test_acc: dict[int, float] = {}

    def model_accuracy(k: int) -> float:
        if k not in test_acc:   # on a copy: the caller's model keeps its device and mode
            m = copy.deepcopy(loaded[k][0]).to(dev).eval()
            test_acc[k] = evaluate(m, test_data.x, test_data.y, dev, stitch_kwargs.get("eval_batch_size", 512))
        return test_acc[k]

    rows = []
    for p, (i, j) in enumerate(pairs):
        (front, fname, finfo), (back, bname, _) = loaded[i], loaded[j]
        for site in sites:
            for kind in kinds:
                key = {"front": fname, "back": bname, "site": site, "kind": kind}
                if skip is not None and skip(key):
                    continue
                r = stitch(front, back, site, kind, train_data, test_data, seed=seed, device=device,
                           front_accuracy=model_accuracy(i), back_accuracy=model_accuracy(j),
                           keep_model=False, progress=progress, **stitch_kwargs)
                row = {**r.as_row(), "pair": p, "front": fname, "back": bname, "site_index": all_sites.index(site),
                       "arch": finfo.get("arch"), "activation": finfo.get("activation"),
                       "dataset": finfo.get("dataset") or train_data.name.split("-")[0]}
                row = {k: row.get(k) for k in ROW_KEYS}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def summarize(rows: Sequence[dict], by: Sequence[str] = ("kind", "site"), value: str = "penalty",
              confidence: float = 0.95) -> list[dict]:
    """Mean of ``value`` per group with its Student t interval (:func:`intertwiners.stats.mean_ci`: ddof=1;
    with a single row the interval is undefined and ``std``, ``ci_low``, ``ci_high`` are NaN).

    Returns dicts with the ``by`` keys plus ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high``; groups in
    order of first appearance.
    """
    from ..stats import mean_ci

    groups: dict[tuple, list[float]] = {}
    for r in rows:
        k = tuple(r[b] for b in by)
        v = float(r[value])
        if not math.isfinite(v):
            raise ValueError(f"row {k} has a non-finite {value}: {v}")
        groups.setdefault(k, []).append(v)
    out = []
    for k, vals in groups.items():
        iv = mean_ci(vals, confidence)
        out.append({**dict(zip(by, k)), "n": iv.n, "mean": iv.mean, "std": iv.std, "ci_low": iv.low,
                    "ci_high": iv.high})
    return out


def slope_of(activation: str | None) -> float | None:
    """Negative slope of an activation name: ``relu`` -> 0, ``leaky_relu:0.3`` -> 0.3, ``leaky_relu`` -> 0.01."""
    if activation is None:
        return None
    name, _, arg = str(activation).lower().partition(":")
    if name == "relu":
        return 0.0
    if name == "leaky_relu":
        return float(arg) if arg else 0.01
    if name == "identity":
        return 1.0
    return None
