"""The Fig. 3 experiment: interpretable units as a function of the rotation power alpha.

For each model (``resnet``: ReLU on the residual output; ``resnet_noact`` and ``convnext``: no
activation there, see :mod:`.fig3_models`) trained on the synthetic Broden-layout dataset, and each
probed site, draw ``n_rotations`` Haar-random rotations Q of the site's units and dissect the site in
the bases Q**alpha for every alpha (alpha = 0 is the unit basis, alpha = 1 a uniformly random
basis). ``fig3_experiment`` returns plain dict rows; ``plot_fig3`` draws them.

The synthetic concepts cover far more of each image than Broden's (a colour ~12% of all pixels,
against well under 1% for most Broden labels), and a unit's mask covers ``quantile`` of the pixels,
so its IoU with a concept of coverage c is at most quantile / c. With the paper's quantile 0.005
nothing could pass IoU 0.04 here; the synthetic defaults are therefore ``quantile=0.05`` and
``iou_threshold=0.1`` (a random mask of 5% of the pixels scores about 0.04 against a 12% concept).
Both are arguments.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .._util import channels_last_trains_safely, resolve_device, save_figure
from ..data import ArrayDataset
from ..training import accuracy
from .broden import BrodenDataset, load_images
from .dissect import dissect_many
from .fig3_models import FIG3_ARCHITECTURES, build_fig3_model
from .rotations import random_rotation, rotation_power
from .synthetic import make_synthetic_broden

# Sites probed per architecture: (site, kind of layer). "stage3.1" is the last block's output.
DEFAULT_SITES = {
    "resnet": [("stage3.1", "relu (residual output)")],
    "resnet_noact": [("stage3.1", "no activation (residual output)"), ("stage3.1.relu1", "relu (inside block)")],
    "convnext": [("stage3.1", "no activation (residual output)")],
}
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic_training_data(dataset: BrodenDataset, name: str = "synthetic") -> ArrayDataset:
    """The images of a Broden-layout dataset with a ``classes.csv`` as an :class:`ArrayDataset` (normalised
    as :func:`load_images` does), with flips and 2-pixel translations as augmentation."""
    if dataset.class_labels is None:
        raise ValueError(f"{dataset.root} has no classes.csv: no class labels to train on")
    x = load_images(dataset, range(len(dataset)))
    y = torch.as_tensor(dataset.class_labels)
    return ArrayDataset(x, y, len(dataset.class_names), name, flip=True, translate=2)


# Adam learning rates: the batch-norm ConvNeXt stand-in learns the synthetic concepts with 2e-3 (500 steps:
# 90% probe accuracy, 78% of its residual-output units interpretable at alpha 0); the ResNets use 1e-3.
LEARNING_RATES = {"convnext": 2e-3}


def train_fig3_model(arch: str, train: ArrayDataset, *, steps: int = 500, batch_size: int = 32,
                     lr: float | None = None,
                     seed: int = 0, device: str = "auto", widths=(16, 32, 64), blocks: int = 2,
                     progress: bool = False, channels_last: bool = True):
    """Train one Fig. 3 model on ``train`` for ``steps`` Adam steps (batches drawn with a seeded generator,
    random horizontal flips; the learning rate, by default :data:`LEARNING_RATES` (1e-3 otherwise), drops
    10x for the last quarter). ``channels_last``: weights and batches in channels-last memory format while
    training (10-30% faster convolutions on CPUs; the same model up to float rounding). Returns
    ``(model, metrics)`` with ``train_accuracy`` (%, eval mode) and ``wall_time_s``; the model is returned in
    the default (contiguous) memory format."""
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_fig3_model(arch, train.num_classes, widths, blocks, train.input_shape[0]).to(dev)
    memory_format = (torch.channels_last if channels_last and channels_last_trains_safely(model)
                     else torch.contiguous_format)
    model = model.to(memory_format=memory_format)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATES.get(arch, 1e-3) if lr is None else lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, (3 * steps) // 4)], 0.1)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"fig3 {arch}", unit="step", leave=False)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        xb = train.x[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        xb = xb.to(dev).contiguous(memory_format=memory_format)
        loss = torch.nn.functional.cross_entropy(model(xb), train.y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model = model.to(memory_format=torch.contiguous_format).eval()
    metrics = {"train_accuracy": accuracy(model, train, dev), "steps": steps,
               "wall_time_s": time.perf_counter() - t0}
    return model.cpu(), metrics


def fig3_experiment(root: str | Path, alphas=DEFAULT_ALPHAS, n_rotations: int = 3, *,
                    archs=FIG3_ARCHITECTURES, sites: dict | None = None, n_images: int = 1600,
                    image_size: int = 32, label_size: int | None = None, steps: int | dict = 500, seed: int = 0,
                    device: str = "auto", quantile: float = 0.05, iou_threshold: float = 0.1,
                    widths=(16, 32, 64), blocks: int = 2, regenerate: bool = False, models_out=None,
                    progress: bool = False) -> list[dict]:
    """Run the Fig. 3 experiment on the synthetic dataset in ``root`` (written first when missing or when
    ``regenerate``). Models train on the ``train`` split; dissection uses the ``val`` split.

    Returns one row per (arch, site, alpha, rotation): ``arch, layer`` plus the keys of
    :func:`rotation_curve` plus ``val_accuracy`` (on the dissected val split, %), ``train_accuracy``
    and ``train_s``. ``models_out``: a folder to save the trained models in. ``steps``: training steps,
    one number or ``{arch: steps}`` (the ConvNeXt starts learning later than the ResNets: ~700 steps
    against ~200 in our runs).
    """
    root = Path(root)
    unknown = [a for a in archs if a not in FIG3_ARCHITECTURES]
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; known: {FIG3_ARCHITECTURES}")
    sites = sites or DEFAULT_SITES
    if regenerate or not (root / "index.csv").is_file():
        make_synthetic_broden(root, n_images=n_images, seed=seed, image_size=image_size, label_size=label_size)
    train = synthetic_training_data(BrodenDataset(root, split="train"))
    probe = BrodenDataset(root, split="val")
    dev = resolve_device(device)
    rows = []
    for arch in archs:
        t0 = time.perf_counter()
        model, metrics = train_fig3_model(arch, train, steps=_steps_for(steps, arch), seed=seed, device=device,
                                          widths=widths, blocks=blocks, progress=progress)
        val_acc = accuracy(model.to(dev), synthetic_training_data(probe), dev)
        model.cpu()
        if models_out is not None:
            from .fig3_models import save
            save(model, Path(models_out) / arch)
        train_s = time.perf_counter() - t0
        for site, layer in sites.get(arch, []):
            curve = rotation_curve(model, site, probe, alphas, n_rotations, seed=seed, quantile=quantile,
                                   iou_threshold=iou_threshold, device=device)
            for row in curve:
                rows.append({"arch": arch, "layer": layer, **row, "val_accuracy": val_acc,
                             "train_accuracy": metrics["train_accuracy"], "train_s": round(train_s, 2)})
    return rows


def _steps_for(steps: int | dict, arch: str) -> int:
    if isinstance(steps, dict):
        if arch not in steps:
            raise ValueError(f"steps has no entry for {arch!r}: {steps}")
        return int(steps[arch])
    return int(steps)


def rotation_curve(model, site: str, dataset: BrodenDataset, alphas=DEFAULT_ALPHAS, n_rotations: int = 3, *,
                   seed: int = 0, quantile: float = 0.005, iou_threshold: float = 0.04, **dissect_kwargs,
                   ) -> list[dict]:
    """Dissect ``site`` of ``model`` in the bases Q_r**alpha for every alpha and r < ``n_rotations``.

    Q_r = ``random_rotation(n, torch.Generator().manual_seed(seed * 1000 + r))``; one geodesic per Q_r,
    as in Bau et al. All bases share the forward passes (:func:`dissect_many`); alpha = 0 is dissected
    once and reported for every r. Returns rows ``site, alpha, rotation, n_units, interpretable_units,
    fraction, unique_concepts, seed, quantile, iou_threshold, dissect_s``.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or n_rotations < 1:
        raise ValueError("need at least one alpha and one rotation")
    t0 = time.perf_counter()
    n = _site_width(model, site, dataset)
    plan: list[tuple[float, int]] = []
    rotations: list = []
    if 0.0 in alphas:
        plan.append((0.0, -1))
        rotations.append(None)
    for r in range(n_rotations):
        q = random_rotation(n, torch.Generator().manual_seed(seed * 1000 + r))
        for a in alphas:
            if a != 0.0:
                plan.append((a, r))
                rotations.append(rotation_power(q, a))
    results = dict(zip(plan, dissect_many(model, site, dataset, rotations, quantile=quantile,
                                          iou_threshold=iou_threshold, **dissect_kwargs)))
    elapsed = round(time.perf_counter() - t0, 2)
    rows = []
    for a in alphas:
        for r in range(n_rotations):
            res = results[(a, -1)] if a == 0.0 else results[(a, r)]
            rows.append({"site": site, "alpha": a, "rotation": r, "n_units": n,
                         "interpretable_units": res.interpretable_units, "fraction": res.interpretable_units / n,
                         "unique_concepts": res.unique_concepts, "seed": seed, "quantile": quantile,
                         "iou_threshold": iou_threshold, "dissect_s": elapsed})
    return rows


def _site_width(model, site: str, dataset: BrodenDataset) -> int:
    from ..features import eval_mode
    from .dissect import SiteReader

    reader = SiteReader(model, site)
    p = next(iter(model.parameters()), None)
    x = load_images(dataset, [0])
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    with torch.no_grad(), eval_mode(model):
        return int(reader(x).shape[1])


def summarize(rows: list[dict]) -> list[dict]:
    """Per (arch, site, alpha): mean, standard deviation (ddof=1) and 95% t half-width over rotations of
    ``fraction`` and ``unique_concepts`` (:func:`intertwiners.stats.mean_ci`; one rotation: NaN spread)."""
    from ..stats import mean_ci

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["site"], r["layer"], r["alpha"]), []).append(r)
    out = []
    for (arch, site, layer, alpha), rs in groups.items():
        frac = mean_ci(r["fraction"] for r in rs)
        uniq = mean_ci(r["unique_concepts"] for r in rs)
        out.append({"arch": arch, "site": site, "layer": layer, "alpha": alpha, "n_units": rs[0]["n_units"],
                    "n": frac.n, "fraction_mean": frac.mean, "fraction_std": frac.std, "fraction_ci95": frac.half,
                    "unique_mean": uniq.mean, "unique_std": uniq.std, "unique_ci95": uniq.half,
                    "val_accuracy": rs[0].get("val_accuracy")})
    return out


def plot_fig3(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Fraction of interpretable units (left) and unique concepts (right) against alpha, one line per
    (arch, site), mean and 95% t-interval over rotations (:func:`summarize`; no band with one rotation).
    ``intertwiners dissect --fig3`` and the report of ``intertwiners reproduce`` both draw Fig. 3 with it.
    Rows need ``arch, site, layer, alpha, fraction, unique_concepts, n_units``. Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("plot_fig3: no rows to plot")
    summary = summarize(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = list(dict.fromkeys((s["arch"], s["site"], s["layer"]) for s in summary))
    for arch, site, layer in keys:
        pts = sorted((s for s in summary if (s["arch"], s["site"]) == (arch, site)), key=lambda s: s["alpha"])
        a = [s["alpha"] for s in pts]
        style = "-" if layer.startswith("relu") else "--"
        label = f"{arch} {site} [{layer}]"
        for ax, key in ((axes[0], "fraction"), (axes[1], "unique")):
            m = np.array([s[f"{key}_mean"] for s in pts])
            half = np.array([s[f"{key}_ci95"] for s in pts])
            line, = ax.plot(a, m, style, marker="o", label=label)
            ax.fill_between(a, m - half, m + half, color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel("fraction of interpretable units")
    axes[1].set_ylabel("unique concepts")
    for ax in axes:
        ax.set_xlabel("rotation power alpha (0 = unit basis, 1 = random basis)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    q, t = rows[0].get("quantile"), rows[0].get("iou_threshold")
    fig.suptitle(title or f"Dissection under rotation Q**alpha (quantile {q}, IoU > {t}; 95% t-interval "
                 "over rotations)")
    return save_figure(fig, path)


def write_rows_csv(rows: list[dict], path: str | Path) -> Path:
    """Write experiment rows (plain dicts with the same keys) as CSV."""
    import csv

    if not rows:
        raise ValueError("no rows to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def plot_units(result, path: str | Path, title: str | None = None) -> Path:
    """Bar chart of each unit's best IoU, coloured by the category of its concept, with the
    interpretability threshold as a line. Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = result.units
    order = sorted(units, key=lambda u: -u.iou)
    cats = list(dict.fromkeys(result.concept_categories))
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cats)}
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(units) + 2), 4))
    ax.bar(range(len(order)), [u.iou for u in order], color=[colours[u.category] for u in order], width=0.9)
    ax.axhline(result.iou_threshold, color="k", ls="--", lw=1, label=f"IoU threshold {result.iou_threshold}")
    for c in cats:
        ax.bar([], [], color=colours[c], label=c)
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [f"{u.unit}:{u.concept}" for u in order], rotation=90, fontsize=7)
    ax.set_xlabel("units, by best IoU")
    ax.set_ylabel("best IoU")
    ax.legend(fontsize=8)
    ax.set_title(title or f"{result.site}: {result.interpretable_units}/{len(units)} interpretable units, "
                 f"{result.unique_concepts} unique concepts")
    return save_figure(fig, path)
