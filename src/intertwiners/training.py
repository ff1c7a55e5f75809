"""Training a zoo of models with the paper's recipe, deterministic per seed.

The CIFAR-10 recipe is the authors': Adam (lr 1e-3, weight decay 1e-4), StepLR(12, 0.5), batch 32,
50 epochs, random flips and 2-pixel translations. Digits and cluttered digits get a fast recipe (see
``RECIPES``). A validation split carved from the training data (fixed across seeds) picks the best epoch;
the test set is only ever used to report accuracy.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import models as model_zoo
from ._util import resolve_device
from .data import ArrayDataset, augment
from .data import load as load_data


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    step_size: int = 12
    gamma: float = 0.5
    val_fraction: float = 0.1


RECIPES = {
    "cifar10": Recipe(epochs=50),
    "digits": Recipe(epochs=12, batch_size=32, step_size=5),
    "digits-cluttered": Recipe(epochs=12, batch_size=32, step_size=5),
}

# Architecture defaults per dataset (smaller widths on the small digits datasets keep CPU training fast).
ARCH_DEFAULTS = {
    ("myrtle_cnn", "digits"): {"width": 16},
    ("mlp", "digits"): {"hidden": [128, 128]},
    ("myrtle_cnn", "digits-cluttered"): {"width": 16},
    ("mlp", "digits-cluttered"): {"hidden": [128, 128]},
}


def accuracy(model: nn.Module, data: ArrayDataset, device: str | torch.device = "auto",
             batch_size: int = 512) -> float:
    """Top-1 accuracy in percent (0-100), eval mode, no autograd; the model's mode is restored."""
    dev = resolve_device(device)
    if len(data) == 0:
        raise ValueError(f"accuracy of an empty dataset ({getattr(data, 'name', 'data')} has no samples) is undefined")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            xb = data.x[i:i + batch_size].to(dev)
            correct += (model(xb).argmax(1).cpu() == data.y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(data)


def build_for(arch: str, train: ArrayDataset, **kwargs) -> nn.Module:
    """Build ``arch`` shaped for ``train``'s images and classes."""
    c, h, w = train.input_shape
    merged = {**ARCH_DEFAULTS.get((arch, train.dataset), {}), **kwargs}
    if arch == "myrtle_cnn":
        if h != w:
            raise ValueError(f"myrtle_cnn needs square images, got {h}x{w}")
        return model_zoo.myrtle_cnn(num_classes=train.num_classes, in_channels=c, input_size=h, **merged)
    if arch == "resnet20":
        return model_zoo.resnet20(num_classes=train.num_classes, in_channels=c, **merged)
    if arch == "mlp":
        return model_zoo.mlp(c * h * w, num_classes=train.num_classes, **merged)
    raise ValueError(f"unknown architecture {arch!r}; known: {sorted(model_zoo.ARCHITECTURES)}")


def fit(model: nn.Module, train: ArrayDataset, val: ArrayDataset, recipe: Recipe, seed: int,
        device: str | torch.device = "auto", progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place with ``recipe``; keep the weights of the best validation epoch.

    Returns ``{"val_accuracy", "best_epoch", "epochs", "wall_time_s"}``.
    """
    dev = resolve_device(device)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"fit: the training part ({len(train)} samples) and the validation part ({len(val)}) "
                         "must both be non-empty")
    if recipe.epochs < 1 or recipe.batch_size < 1:
        raise ValueError(f"fit: epochs and batch_size must be >= 1, got {recipe.epochs} and {recipe.batch_size}")
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, recipe.step_size, recipe.gamma)
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    steps_per_epoch = (len(train) + recipe.batch_size - 1) // recipe.batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    start = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            xb = augment(train.x[idx], gen, train.flip, train.translate).to(dev)
            loss = F.cross_entropy(model(xb), train.y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
        sched.step()
        if not bool(torch.isfinite(loss)):
            if bar is not None:
                bar.close()
            raise ValueError(f"training diverged: the loss is {float(loss)} at epoch {epoch} (non-finite weights or "
                             "activations); lower the learning rate or check the activation")
        val_acc = accuracy(model, val, dev)
        if bar is not None:
            bar.set_postfix(epoch=epoch, val=f"{val_acc:.1f}%")
        if val_acc >= best[0]:
            best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
    if bar is not None:
        bar.close()
    model.load_state_dict(best[2])
    model.eval()
    return {"val_accuracy": best[0], "best_epoch": best[1], "epochs": recipe.epochs,
            "wall_time_s": time.perf_counter() - start}


def train_one(arch: str, dataset: str = "digits", seed: int = 0, *, root: str | Path | None = None,
              epochs: int | None = None, device: str = "auto", progress: bool = True,
              data: tuple[ArrayDataset, ArrayDataset] | None = None, **arch_kwargs) -> tuple[nn.Module, dict]:
    """Train one model of ``arch`` on ``dataset`` with ``seed``; returns ``(model, metrics)``.

    Metrics are percentages: ``test_accuracy``, ``train_accuracy`` (on the training part, no augmentation),
    ``val_accuracy``; plus ``epochs``, ``best_epoch``, ``seed``, ``wall_time_s``.
    """
    dev = resolve_device(device)          # a bad device fails before any data is read or trained on
    train_full, test = data if data is not None else load_data(dataset, root)
    for part, what in ((train_full, "training"), (test, "test")):
        if len(part) == 0:
            raise ValueError(f"the {what} set of {dataset} is empty")
    if len(train_full) < 2:
        raise ValueError(f"the training set of {dataset} needs at least 2 samples (one is held out for validation)")
    recipe = RECIPES.get(dataset, RECIPES["cifar10"])
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        recipe = replace(recipe, epochs=epochs)
    train, val = train_full.split(recipe.val_fraction, seed=0)  # the same validation split for every seed
    torch.manual_seed(seed)
    model = build_for(arch, train, **arch_kwargs)
    metrics = fit(model, train, val, recipe, seed, device, progress, desc=f"{arch} seed {seed}")
    metrics.update(test_accuracy=accuracy(model, test, dev), train_accuracy=accuracy(model, train, dev),
                   seed=seed, arch=arch, dataset=dataset, recipe=asdict(recipe))
    return model.cpu(), metrics


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("model.safetensors", "config.json", "metrics.json"))


def train_zoo(arch: str, dataset: str, seeds: list[int], out: str | Path, *, root: str | Path | None = None,
              epochs: int | None = None, device: str = "auto", progress: bool = True,
              **arch_kwargs) -> list[dict]:
    """Train one model per seed into ``out/<arch>-<dataset>/seed<k>/``; complete seeds are skipped.

    Each folder is written to a temporary name first and renamed when complete, so an interrupted run
    never leaves a half-written model that would be skipped later.
    """
    out = Path(out)
    resolve_device(device)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train_zoo: out={out} exists and is not a folder")
    data = load_data(dataset, root)
    results = []
    for seed in seeds:
        folder = out / f"{arch}-{dataset}" / f"seed{seed}"
        if is_complete(folder):
            results.append(json.loads((folder / "metrics.json").read_text()))
            continue
        model, metrics = train_one(arch, dataset, seed, epochs=epochs, device=device, progress=progress,
                                   data=data, **arch_kwargs)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model_zoo.save(model, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        results.append(metrics)
    return results
