"""The rotation penalty "sanity test" of paper §3.3 (Fig. 4).

A fixed channel transform A is inserted on the pre-activation of one layer of a trained sequential
model (a Myrtle CNN): for a chosen conv, A acts right before the activation that follows it (after the
batch norm when there is one, directly after the conv in the batch-norm-free Myrtle CNN of Fig. 4), as
the 1x1 convolution ``h -> A h`` over channels. This is the paper's "(W_l, b_l) -> (A W_l, A b_l)".
Everything up to and including A is frozen (no gradients, batch norm kept in eval mode so its running
statistics cannot drift); the later layers are fine-tuned with the authors' recipe (Adam lr 1e-3,
weight decay 1e-4, StepLR(12, 0.5), batch 32, the dataset's augmentation), keeping the epoch with the
best accuracy on a validation split carved from the training data (the test set is never used for
selection). The rotation penalty is

    penalty = baseline test accuracy - test accuracy after inserting A and fine-tuning   (in points, 0-100).

Transforms (:func:`sample_transform`): ``grelu`` = P·D with P a uniform random permutation and
D = diag(exp(z) / exp(1/2)), z ~ N(0, 1) (an element of G_ReLU, Proposition 3.4: the next layer can undo it
exactly for ReLU), ``orthogonal`` = Q of the QR decomposition of a standard Gaussian matrix (sign-fixed, so
Haar distributed), and the controls ``permutation`` (P alone, in every G_sigma) and ``identity``
(measures what fine-tuning alone does to accuracy).

The model must be an ``nn.Sequential`` whose activation modules are top-level children (as built by
:func:`intertwiners.models.myrtle_cnn` and :func:`~intertwiners.models.mlp`).
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from ._util import resolve_device, save_figure
from .activations import ACTIVATION_MODULES
from .batched import fit_many
from .data import ArrayDataset
from .groups import _random_orthogonal, monomial_matrix
from .training import Recipe, accuracy, fit

TRANSFORMS = ("grelu", "orthogonal", "permutation", "identity")


class ChannelTransform(nn.Module):
    """A fixed linear map over the channel axis (dim 1): y[:, o] = sum_c matrix[o, c] x[:, c].

    Works on (N, C) and (N, C, *spatial) inputs; it is a 1x1 convolution without bias. The matrix is a
    buffer, so it moves with the module but is never trained.
    """

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"channel transform needs a square (C, C) matrix, got {tuple(matrix.shape)}")
        self.register_buffer("matrix", matrix.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.matrix.shape[1]:
            raise ValueError(f"channel transform of size {self.matrix.shape[1]} got {x.shape[1]} channels")
        return torch.einsum("oc,nc...->no...", self.matrix.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"channels={self.matrix.shape[0]}"


class Frozen(nn.Module):
    """Wraps a module so that it never trains: parameters without gradients, always in eval mode."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        for p in self.inner.parameters():
            p.requires_grad_(False)
        self.inner.eval()

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.inner.eval()  # batch-norm statistics and dropout stay frozen
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def sample_transform(kind: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random (n, n) float64 transform of ``kind`` (one of :data:`TRANSFORMS`; see the module docstring)."""
    if n < 1:
        raise ValueError(f"transform size must be positive, got {n}")
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    if kind == "orthogonal":
        return _random_orthogonal(n, generator)
    if kind in ("grelu", "permutation"):
        perm = torch.randperm(n, generator=generator)
        if kind == "permutation":
            return monomial_matrix(perm, torch.ones(n, dtype=torch.float64))
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return monomial_matrix(perm, torch.exp(z) / math.exp(0.5))
    raise ValueError(f"unknown transform {kind!r}; known: {', '.join(TRANSFORMS)}")


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"rotation_penalty needs an nn.Sequential model (e.g. models.myrtle_cnn), got "
                         f"{type(model).__name__}")
    return list(model.named_children())


def insertion_index(model: nn.Sequential, layer: str | int) -> int:
    """Index of the activation (top-level child) whose input the transform acts on, for ``layer``.

    ``layer``: a child's name (``"conv2"``, or an activation ``"relu2"``) or its index in the
    Sequential (the paper's numbering for the batch-norm-free Myrtle CNN: 0, 2, 5, 8 are conv1..conv4).
    The first activation at or after that child is chosen (so a following batch norm stays before A).
    """
    children = _children(model)
    names = [name for name, _ in children]
    if isinstance(layer, int) or (isinstance(layer, str) and layer.strip().isdigit()):
        start = int(layer)
        if not 0 <= start < len(children):
            raise ValueError(f"layer index {start} out of range (the model has {len(children)} top-level layers)")
    elif layer in names:
        start = names.index(layer)
    else:
        raise ValueError(f"unknown layer {layer!r}; top-level layers: {', '.join(names)}")
    for i in range(start, len(children)):
        if isinstance(children[i][1], ACTIVATION_MODULES):
            return i
    raise ValueError(f"no activation follows layer {layer!r}, so there is no pre-activation to transform")


def insert_transform(model: nn.Sequential, layer: str | int, matrix: torch.Tensor,
                     finetune: str = "all") -> nn.Sequential:
    """A copy of ``model`` as ``Sequential(frozen=Frozen(front), transform=ChannelTransform, back...)``.

    ``front`` is every layer before the activation chosen by :func:`insertion_index`. ``finetune="all"``:
    every later layer is trainable (the paper). ``finetune="next"``: only the first Conv/Linear after the
    transform is trainable and the layers after it are wrapped in ``Frozen(...)`` under the name ``tail``
    -- the sharpest test of Proposition 3.4, since W_next·phi(A)^-1 restores the model exactly when A is
    in G_sigma. ``model`` is untouched.
    """
    if finetune not in ("all", "next"):
        raise ValueError(f"finetune must be 'all' or 'next', got {finetune!r}")
    idx = insertion_index(model, layer)
    children = _children(copy.deepcopy(model))
    front = nn.Sequential(OrderedDict(children[:idx]))
    parts: list[tuple[str, nn.Module]] = [("frozen", Frozen(front)), ("transform", ChannelTransform(matrix))]
    back = children[idx:]
    if finetune == "next":
        nxt = next((i for i, (_, m) in enumerate(back) if isinstance(m, nn.Conv2d | nn.Linear)), None)
        if nxt is None:
            raise ValueError(f"no Conv2d/Linear follows layer {layer!r} to fine-tune")
        rest = back[nxt + 1:]
        back = back[:nxt + 1] + ([("tail", Frozen(nn.Sequential(OrderedDict(rest))))] if rest else [])
    for _, m in back:
        if not isinstance(m, Frozen):
            for p in m.parameters():
                p.requires_grad_(True)
    return nn.Sequential(OrderedDict(parts + back))


def _channels(model: nn.Sequential, idx: int, example: torch.Tensor) -> int:
    front = nn.Sequential(*[m for _, m in _children(model)[:idx]])
    with torch.no_grad():
        was = model.training
        model.eval()
        h = front(example)
        model.train(was)
    return int(h.shape[1])


def _check_settings(*, epochs, batch_size, lr, val_fraction, train_subset, finetune) -> None:
    """ValueError for settings that would otherwise run and report nonsense (e.g. fine-tuning on 0 images)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    if not (isinstance(val_fraction, int | float) and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    if train_subset is not None and (not is_int(train_subset) or train_subset < 1):
        raise ValueError(f"train_subset must be None or an integer >= 1 (images to fine-tune on), got "
                         f"{train_subset!r}")
    if finetune not in ("all", "next"):
        raise ValueError(f"finetune must be 'all' or 'next', got {finetune!r}")


def _site(model: nn.Module, layer: str | int, example: torch.Tensor) -> tuple[int, str, str, int]:
    """(index of the activation the transform precedes, its name, the Conv/Linear before it, channels)."""
    idx = insertion_index(model, layer)
    children = _children(model)
    site = children[idx][0]
    layer_name = next((name for name, m in reversed(children[:idx]) if isinstance(m, nn.Conv2d | nn.Linear)),
                      site)
    return idx, site, layer_name, _channels(model, idx, example)


def _matrix(transform: str | torch.Tensor, channels: int, seed: int, layer) -> tuple[str, torch.Tensor]:
    """(kind, the (C, C) float64 matrix): ``transform`` sampled with ``seed``, or the matrix given, checked."""
    if isinstance(transform, str):
        kind, matrix = transform, sample_transform(transform, channels, torch.Generator().manual_seed(seed))
    else:
        kind = "custom"
        matrix = torch.as_tensor(transform, dtype=torch.float64)
        if matrix.shape != (channels, channels):
            raise ValueError(f"transform must be ({channels}, {channels}) for layer {layer!r}, "
                             f"got {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all() or torch.linalg.matrix_rank(matrix) < channels:
        raise ValueError("transform must be a finite invertible matrix")
    return kind, matrix


def rotation_penalty(model: nn.Module, layer: str | int, transform: str | torch.Tensor, train: ArrayDataset,
                     test: ArrayDataset, *, epochs: int = 50, seed: int = 0, device: str = "auto",
                     baseline: float | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                     batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4, step_size: int = 12,
                     gamma: float = 0.5, train_subset: int | None = None, finetune: str = "all",
                     patience: int | None = None, progress: bool = False) -> dict:
    """Insert a fixed transform before ``layer``'s activation, fine-tune the later layers, measure the loss.

    ``train`` is the full training set; a validation part (``val_fraction``, split with ``split_seed``,
    by default the split :func:`intertwiners.training.train_one` held out) selects the best fine-tuning
    epoch; ``patience``: stop after that many epochs without a better validation score (``None``: run every
    one of ``epochs``). ``transform``: a name from :data:`TRANSFORMS` (sampled with ``seed``) or a (C, C)
    matrix. ``baseline``: the model's test accuracy if already known. ``train_subset``: fine-tune on only the
    first k training samples (for quick tests). ``finetune``: ``"all"`` later layers (the paper) or only
    the ``"next"`` Conv/Linear (see :func:`insert_transform`). Returns a dict of plain numbers: ``baseline_accuracy``,
    ``transformed_accuracy`` (after inserting A, before fine-tuning), ``finetuned_accuracy``, ``penalty``
    (= baseline - finetuned, points), ``val_accuracy``, ``best_epoch``, plus the settings.
    """
    _check_settings(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                    train_subset=train_subset, finetune=finetune)
    dev = resolve_device(device)
    start = time.perf_counter()
    model = copy.deepcopy(model).cpu()
    idx, site, layer_name, channels = _site(model, layer, train.x[:1])
    kind, matrix = _matrix(transform, channels, seed, layer)
    if baseline is None:
        baseline = accuracy(copy.deepcopy(model).to(dev), test, dev)
    fine_train, val = train.split(val_fraction, seed=split_seed)
    if train_subset is not None:
        fine_train = fine_train.subset(torch.arange(min(train_subset, len(fine_train))))
    new_model = insert_transform(model, layer, matrix, finetune=finetune).to(dev)
    transformed = accuracy(new_model, test, dev)
    torch.manual_seed(seed)
    recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, step_size=step_size,
                    gamma=gamma, val_fraction=val_fraction, patience=patience)
    fitted = fit(new_model, fine_train, val, recipe, seed, dev, progress, desc=f"fine-tune {site} {kind}")
    finetuned = accuracy(new_model, test, dev)
    return _row(layer, layer_name, site, idx, kind, seed, channels, epochs, finetune, baseline, transformed,
                finetuned, fitted, time.perf_counter() - start)


def _row(layer, layer_name, site, idx, kind, seed, channels, epochs, finetune, baseline, transformed, finetuned,
         fitted, seconds) -> dict:
    return {"layer": str(layer), "conv": layer_name, "site": site, "position": idx, "transform": kind,
            "seed": int(seed), "channels": channels, "epochs": epochs, "finetune": finetune,
            "baseline_accuracy": float(baseline), "transformed_accuracy": float(transformed),
            "finetuned_accuracy": float(finetuned), "penalty": float(baseline) - float(finetuned),
            "val_accuracy": float(fitted["val_accuracy"]), "best_epoch": int(fitted["best_epoch"]),
            "wall_time_s": seconds}


def rotation_penalties(model: nn.Module, layer: str | int, runs: Iterable[tuple[str | torch.Tensor, int]],
                       train: ArrayDataset, test: ArrayDataset, *, epochs: int = 50, patience: int | None = None,
                       device: str = "auto", baseline: float | None = None, val_fraction: float = 0.1,
                       split_seed: int = 0, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4,
                       step_size: int = 12, gamma: float = 0.5, progress: bool = False) -> list[dict]:
    """:func:`rotation_penalty` at ``layer`` for every ``(transform, seed)`` of ``runs``, trained together.

    The frozen layers before the transform are shared by every run and run once per batch
    (:func:`intertwiners.batched.fit_many` with a prefix); each run's transform and later layers are one
    member of a stacked model, trained on its own minibatch stream (its seed) until its own convergence
    criterion (``patience``) stops it. Each returned row equals what :func:`rotation_penalty` gives that run
    alone with the same settings (``finetune="all"``); ``wall_time_s`` is the time of the whole group.
    """
    runs = [(t, int(seed)) for t, seed in runs]
    if not runs:
        raise ValueError("rotation_penalties needs at least one (transform, seed) run")
    _check_settings(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction, train_subset=None,
                    finetune="all")
    dev = resolve_device(device)
    start = time.perf_counter()
    model = copy.deepcopy(model).cpu()
    idx, site, layer_name, channels = _site(model, layer, train.x[:1])
    drawn = [_matrix(t, channels, seed, layer) for t, seed in runs]
    if baseline is None:
        baseline = accuracy(copy.deepcopy(model).to(dev), test, dev)
    fine_train, val = train.split(val_fraction, seed=split_seed)
    whole = [insert_transform(model, layer, matrix).to(dev) for _, matrix in drawn]
    transformed = [accuracy(m, test, dev) for m in whole]
    # every model is Sequential(frozen=Frozen(front), transform, back...): the members are all but the front
    members = [nn.Sequential(OrderedDict(list(m.named_children())[1:])) for m in whole]
    recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, step_size=step_size,
                    gamma=gamma, val_fraction=val_fraction, patience=patience)
    fitted = fit_many(members, fine_train, val, recipe, [seed for _, seed in runs], dev, progress,
                      desc=f"fine-tune {site} x{len(runs)}", prefix=whole[0].frozen.inner)
    seconds = time.perf_counter() - start
    return [_row(layer, layer_name, site, idx, kind, seed, channels, epochs, "all", baseline, before,
                 accuracy(m, test, dev), f, seconds)
            for (kind, _), (_, seed), before, m, f in zip(drawn, runs, transformed, whole, fitted)]


def rotation_penalty_sweep(model: nn.Module, layers: Iterable[str | int], transforms: Iterable[str],
                           train: ArrayDataset, test: ArrayDataset, *, seeds: Iterable[int] = range(10),
                           epochs: int = 50, device: str = "auto", done: set | None = None,
                           callback=None, **kwargs) -> list[dict]:
    """:func:`rotation_penalty` for every (layer, transform, seed); the baseline is measured once.

    ``done``: a set of (layer, transform, seed) tuples to skip (for resuming). ``callback(result)`` is
    called after each run (e.g. to store it). Extra keyword arguments go to :func:`rotation_penalty`.
    """
    dev = resolve_device(device)
    baseline = accuracy(copy.deepcopy(model).to(dev), test, dev)
    results = []
    for layer in layers:
        for kind in transforms:
            for seed in seeds:
                if done and (str(layer), kind, seed) in done:
                    continue
                r = rotation_penalty(model, layer, kind, train, test, epochs=epochs, seed=seed, device=device,
                                     baseline=baseline, **kwargs)
                results.append(r)
                if callback is not None:
                    callback(r)
    return results


def with_control(results: list[dict], control: str = "identity") -> list[dict]:
    """Copies of the rows with ``penalty_vs_control`` = control's fine-tuned accuracy - this row's.

    The control is the run with transform ``control`` and the same panel, layer, seed, epochs and
    fine-tuning mode: it removes what fine-tuning alone does to accuracy (on an under-trained base model
    the plain penalty is negative even for the identity). Rows without a matching control get NaN;
    the control rows themselves get 0.
    """
    def key(r):
        return (r.get("panel", ""), str(r["layer"]), int(r["seed"]), int(r["epochs"]), r.get("finetune", "all"))

    base = {key(r): float(r["finetuned_accuracy"]) for r in results if r["transform"] == control}
    return [{**r, "penalty_vs_control": base.get(key(r), float("nan")) - float(r["finetuned_accuracy"])}
            for r in results]


def summarize(results: list[dict], key: str = "penalty", by: tuple[str, ...] = ("layer", "transform")) -> list[dict]:
    """Mean, standard deviation and the 95% t confidence half-width of ``key`` per group of ``by``
    (:func:`intertwiners.stats.mean_ci`: ddof=1; fewer than three runs, or runs that all agree, have no interval:
    ``ci95`` NaN, and one run has no ``std`` either)."""
    from .stats import mean_ci

    groups: dict[tuple, list[float]] = {}
    for r in results:
        if not math.isnan(float(r[key])):
            groups.setdefault(tuple(r[k] for k in by), []).append(float(r[key]))
    out = []
    for k, values in groups.items():
        iv = mean_ci(values)
        out.append({**dict(zip(by, k)), "mean": iv.mean, "std": iv.std, "ci95": iv.half, "n": iv.n})
    return out


def plot_rotation_penalties(results: list[dict], path, title: str = "Rotation penalty", key: str = "penalty",
                            ylabel: str = "rotation penalty (accuracy points)") -> None:
    """Fig. 4-style PNG: penalty (points) against layer, one line per transform, 95% CI error bars.

    With a ``panel`` key in the results (e.g. the activation), one subplot per panel value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({r.get("panel", "") for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = [r for r in results if r.get("panel", "") == panel]
        summary = summarize(rows, key=key, by=("position", "conv", "transform"))
        positions = sorted({s["position"] for s in summary})
        labels = {s["position"]: s["conv"] for s in summary}
        for kind in sorted({s["transform"] for s in summary}):
            pts = sorted((s["position"], s["mean"], 0.0 if math.isnan(s["ci95"]) else s["ci95"])
                         for s in summary if s["transform"] == kind)
            xs = [positions.index(p) for p, _, _ in pts]
            ax.errorbar(xs, [m for _, m, _ in pts], yerr=[c for _, _, c in pts], marker="o", capsize=3,
                        label=kind)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(positions)), [labels[p] for p in positions])
        ax.set_xlabel("transformed layer (pre-activation)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}{': ' + str(panel) if panel else ''}")
        ax.legend()
    save_figure(fig, path)
