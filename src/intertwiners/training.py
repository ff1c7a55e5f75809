"""Training a zoo of models with the paper's recipe, deterministic per seed.

The CIFAR-10 recipe is the authors': Adam (lr 1e-3, weight decay 1e-4), StepLR(12, 0.5), batch 32,
50 epochs, random flips and 2-pixel translations. Digits and cluttered digits get a fast recipe (see
``RECIPES``). A validation split carved from the training data (fixed across seeds) picks the best epoch
and decides when training has converged (:class:`Convergence`); the test set is only ever used to report accuracy.

Several models of one architecture train together, each exactly as it would alone, through
:func:`intertwiners.batched.fit_many` (:func:`train_many`).
"""

from __future__ import annotations

import copy
import json
import math
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

PATIENCE = 3   # digits: epochs without a better validation split before training stops (docs/foundation.md)


@dataclass(frozen=True)
class Recipe:
    """Adam with StepLR; ``epochs`` is the most epochs, ``patience`` the convergence criterion (see
    :class:`Convergence`; ``None`` trains every epoch)."""

    epochs: int
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    step_size: int = 12
    gamma: float = 0.5
    val_fraction: float = 0.1
    patience: int | None = None

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (1-based): StepLR(step_size, gamma) in closed form."""
        return self.lr * self.gamma ** ((epoch - 1) // self.step_size)


class Convergence:
    """The stopping rule of every training loop here: stop once the validation split (carved from the
    training set) has not improved for ``patience`` epochs, or after ``max_epochs``.

    An epoch *improves* when its validation accuracy is higher than the best so far, or equal to it with a
    lower validation loss (accuracy on a few hundred images moves in steps; the loss breaks ties). The kept
    epoch is the last one that improved. ``patience=None`` never stops early (every epoch runs; the best
    one is still kept). Epoch 0 (before any training) may be recorded too, as the stitching loop does.
    """

    def __init__(self, max_epochs: int, patience: int | None = None):
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"patience must be None or an integer >= 1, got {patience!r}")
        self.max_epochs, self.patience = int(max_epochs), patience
        self.best_accuracy, self.best_loss, self.best_epoch = -math.inf, math.inf, 0
        self.epoch, self.stale = 0, 0

    def update(self, epoch: int, accuracy: float, loss: float) -> bool:
        """Record ``epoch``'s validation accuracy and loss; True when it is the new best."""
        self.epoch = epoch
        improved = accuracy > self.best_accuracy or (accuracy == self.best_accuracy and loss < self.best_loss)
        if improved:
            self.best_accuracy, self.best_loss, self.best_epoch, self.stale = accuracy, loss, epoch, 0
        else:
            self.stale += 1
        return improved

    @property
    def done(self) -> bool:
        """True once the criterion is met or ``max_epochs`` have run."""
        return self.epoch >= self.max_epochs or (self.patience is not None and self.stale >= self.patience)


RECIPES = {
    "cifar10": Recipe(epochs=50, patience=5),
    "digits": Recipe(epochs=12, batch_size=32, step_size=5, patience=PATIENCE),
    "digits-cluttered": Recipe(epochs=12, batch_size=32, step_size=5, patience=PATIENCE),
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


def evaluate(model: nn.Module, data: ArrayDataset, device: str | torch.device = "auto",
             batch_size: int = 512) -> tuple[float, float]:
    """``(accuracy in percent, mean cross-entropy)`` of ``model`` on ``data``, eval mode, no autograd; the
    model's mode is restored."""
    dev = resolve_device(device)
    if len(data) == 0:
        raise ValueError(f"evaluating on an empty dataset ({getattr(data, 'name', 'data')} has no samples)")
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            logits = model(data.x[i:i + batch_size].to(dev))
            yb = data.y[i:i + batch_size].to(dev)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    return 100.0 * correct / len(data), loss / len(data)


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


def check_fit_inputs(train: ArrayDataset, val: ArrayDataset, recipe: Recipe, where: str = "fit") -> None:
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{where}: the training part ({len(train)} samples) and the validation part ({len(val)}) "
                         "must both be non-empty")
    if recipe.epochs < 1 or recipe.batch_size < 1:
        raise ValueError(f"{where}: epochs and batch_size must be >= 1, got {recipe.epochs} and {recipe.batch_size}")


def diverged(epoch: int, loss: float, who: str = "training") -> ValueError:
    return ValueError(f"{who} diverged: the loss is {loss} at epoch {epoch} (non-finite weights or activations); "
                      "lower the learning rate or check the activation")


def fit(model: nn.Module, train: ArrayDataset, val: ArrayDataset, recipe: Recipe, seed: int,
        device: str | torch.device = "auto", progress: bool = True, desc: str = "train") -> dict:
    """Train ``model`` in place with ``recipe`` until :class:`Convergence` (``recipe.patience``,
    ``recipe.epochs`` at most); keep the weights of the best validation epoch.

    ``seed`` drives the minibatch order and the augmentation (one generator, drawn in the same order as
    :func:`intertwiners.batched.fit_many` draws it for each of its models). Returns ``{"val_accuracy",
    "val_loss", "best_epoch", "epochs"`` (epochs run) ``, "max_epochs", "wall_time_s"}``.
    """
    dev = resolve_device(device)
    check_fit_inputs(train, val, recipe)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    stop = Convergence(recipe.epochs, recipe.patience)
    best_state = copy.deepcopy(model.state_dict())
    steps_per_epoch = (len(train) + recipe.batch_size - 1) // recipe.batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    start = time.perf_counter()
    while not stop.done:
        epoch = stop.epoch + 1
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(epoch)
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
        if not bool(torch.isfinite(loss)):
            if bar is not None:
                bar.close()
            raise diverged(epoch, float(loss))
        val_acc, val_loss = evaluate(model, val, dev)
        if bar is not None:
            bar.set_postfix(epoch=epoch, val=f"{val_acc:.1f}%")
        if stop.update(epoch, val_acc, val_loss):
            best_state = copy.deepcopy(model.state_dict())
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return {"val_accuracy": stop.best_accuracy, "val_loss": stop.best_loss, "best_epoch": stop.best_epoch,
            "epochs": stop.epoch, "max_epochs": recipe.epochs, "wall_time_s": time.perf_counter() - start}


_DEFAULT = object()


def recipe_for(dataset: str, epochs: int | None = None, patience=_DEFAULT) -> Recipe:
    """The dataset's recipe (CIFAR-10's for unknown names), with ``epochs`` (the most) and ``patience``
    (``None``: every epoch runs) replaced when given."""
    recipe = RECIPES.get(dataset, RECIPES["cifar10"])
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        recipe = replace(recipe, epochs=epochs)
    if patience is not _DEFAULT:
        Convergence(1, patience)   # validates
        recipe = replace(recipe, patience=patience)
    return recipe


def _parts(dataset: str, root, data) -> tuple[ArrayDataset, ArrayDataset]:
    train_full, test = data if data is not None else load_data(dataset, root)
    for part, what in ((train_full, "training"), (test, "test")):
        if len(part) == 0:
            raise ValueError(f"the {what} set of {dataset} is empty")
    if len(train_full) < 2:
        raise ValueError(f"the training set of {dataset} needs at least 2 samples (one is held out for validation)")
    return train_full, test


def train_one(arch: str, dataset: str = "digits", seed: int = 0, *, root: str | Path | None = None,
              epochs: int | None = None, patience=_DEFAULT, device: str = "auto", progress: bool = True,
              data: tuple[ArrayDataset, ArrayDataset] | None = None, **arch_kwargs) -> tuple[nn.Module, dict]:
    """Train one model of ``arch`` on ``dataset`` with ``seed``; returns ``(model, metrics)``.

    ``epochs``: the most epochs (default: the recipe's); ``patience``: the convergence criterion
    (:class:`Convergence`; default the recipe's, ``None`` runs every epoch). Metrics are percentages:
    ``test_accuracy``, ``train_accuracy`` (on the training part, no augmentation), ``val_accuracy``; plus
    ``val_loss``, ``epochs`` (run), ``max_epochs``, ``best_epoch``, ``seed``, ``wall_time_s``.
    """
    dev = resolve_device(device)          # a bad device fails before any data is read or trained on
    recipe = recipe_for(dataset, epochs, patience)
    train_full, test = _parts(dataset, root, data)
    train, val = train_full.split(recipe.val_fraction, seed=0)  # the same validation split for every seed
    torch.manual_seed(seed)
    model = build_for(arch, train, **arch_kwargs)
    metrics = fit(model, train, val, recipe, seed, device, progress, desc=f"{arch} seed {seed}")
    metrics.update(test_accuracy=accuracy(model, test, dev), train_accuracy=accuracy(model, train, dev),
                   seed=seed, arch=arch, dataset=dataset, recipe=asdict(recipe))
    return model.cpu(), metrics


def train_many(arch: str, dataset: str = "digits", seeds=(0,), *, root: str | Path | None = None,
               epochs: int | None = None, patience=_DEFAULT, device: str = "auto", progress: bool = True,
               data: tuple[ArrayDataset, ArrayDataset] | None = None,
               **arch_kwargs) -> list[tuple[nn.Module, dict]]:
    """:func:`train_one` for every seed of ``seeds``, the models trained together as one batched model
    (:func:`intertwiners.batched.fit_many`): each gets the initialisation, minibatch order, augmentation and
    stopping epoch it would get alone. Returns ``[(model, metrics)]`` in the order of ``seeds``."""
    from .batched import evaluate_many, fit_many

    dev = resolve_device(device)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"train_many needs distinct seeds, got {seeds}")
    recipe = recipe_for(dataset, epochs, patience)
    train_full, test = _parts(dataset, root, data)
    train, val = train_full.split(recipe.val_fraction, seed=0)
    built = []
    for seed in seeds:
        torch.manual_seed(seed)
        built.append(build_for(arch, train, **arch_kwargs))
    found = fit_many(built, train, val, recipe, seeds, device, progress, desc=f"{arch} seeds {seeds[0]}..{seeds[-1]}")
    tests = evaluate_many(built, test, dev)
    trains = evaluate_many(built, train, dev)
    out = []
    for model, seed, metrics, (test_acc, _), (train_acc, _) in zip(built, seeds, found, tests, trains):
        metrics.update(test_accuracy=test_acc, train_accuracy=train_acc, seed=seed, arch=arch, dataset=dataset,
                       recipe=asdict(recipe))
        out.append((model.cpu(), metrics))
    return out


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("model.safetensors", "config.json", "metrics.json"))


def train_zoo(arch: str, dataset: str, seeds: list[int], out: str | Path, *, root: str | Path | None = None,
              epochs: int | None = None, patience=_DEFAULT, device: str = "auto", progress: bool = True,
              **arch_kwargs) -> list[dict]:
    """Train one model per seed into ``out/<arch>-<dataset>/seed<k>/``; complete seeds are skipped, the
    others train together (:func:`train_many`).

    Each folder is written to a temporary name first and renamed when complete, so an interrupted run
    never leaves a half-written model that would be skipped later.
    """
    out = Path(out)
    resolve_device(device)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train_zoo: out={out} exists and is not a folder")
    data = load_data(dataset, root)
    folders = {seed: out / f"{arch}-{dataset}" / f"seed{seed}" for seed in seeds}
    todo = [seed for seed in seeds if not is_complete(folders[seed])]
    trained = dict(zip(todo, train_many(arch, dataset, todo, epochs=epochs, patience=patience, device=device,
                                        progress=progress, data=data, **arch_kwargs))) if todo else {}
    results = []
    for seed in seeds:
        folder = folders[seed]
        if seed not in trained:
            results.append(json.loads((folder / "metrics.json").read_text()))
            continue
        model, metrics = trained[seed]
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model_zoo.save(model, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        results.append(metrics)
    return results
