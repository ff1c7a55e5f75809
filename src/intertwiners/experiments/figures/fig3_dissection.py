"""Fig. 3 — interpretable units under rotation of the basis: plan, jobs, report section and figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...stats import decide, evidence, mean_ci
from ..jobs import Dependency, Job, Output, register
from .common import Section, at_chance, device, fmt, model_files, model_from_files, table

KINDS = ("dissection", "dissection_model")
FIGURE = "fig3_dissection.png"
N_CLASSES = 4          # the synthetic dataset's classes: the object's shape
MAX_DROP = 0.02        # "does not drop": the fraction of interpretable units falls by less than this


@dataclass(frozen=True)
class Settings:
    """Fig. 3: ``models`` (stage ``widths``) trained ``steps`` Adam steps of ``batch_size`` images on a
    synthetic Broden-layout dataset of ``images`` RGB images of ``image_size`` x ``image_size`` pixels, dissected
    at ``alphas`` for ``rotations`` random rotations. ``steps``, ``batch_size``, ``widths`` and ``image_size`` are
    sized to what the claims need (docs/reproduce.md: the claims' answers against them)."""

    models: tuple[str, ...] = ("resnet", "resnet_noact", "convnext")
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    rotations: int = 1
    images: int = 200
    steps: int = 150
    batch_size: int = 32
    widths: tuple[int, int, int] = (16, 32, 64)
    image_size: int = 32


PRESETS = {
    "smoke": Settings(steps=25, image_size=24),
    # 500 steps: the same answers as 1,500 for the ResNets' three curves at a third of the training
    # (docs/reproduce.md, "Fig. 3: the claims against the training steps"; benchmarks/bench_fig3_steps.py)
    # 8 rotations: a dissection costs seconds, and with 3 the t-intervals of the drops were +-0.2 wide
    # 24x24 images: every answer as at 32x32 or better supported, at about 0.7x (ResNets) and 0.5x (ConvNeXt)
    # of the training time (docs/reproduce.md)
    "small": Settings(alphas=(0.0, 0.25, 0.5, 0.75, 1.0), rotations=8, images=800, steps=500, image_size=24),
    "paper": Settings(alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), rotations=8, images=1600, steps=2000),
}


def jobs(scale) -> list[Job]:
    """One training job per Fig. 3 model and one dissection job per (model, probed site), all alphas at once."""
    from ...dissection.experiment import DEFAULT_SITES

    s = scale.fig3_dissection
    data = {"n_images": s.images, "image_size": s.image_size, "data_seed": 0}
    out = []
    for arch in s.models:
        model = Job("dissection_model", {**data, "arch": arch, "steps": s.steps, "batch_size": s.batch_size,
                                         "widths": list(s.widths), "seed": 0},
                    label=f"dissection model {arch}")
        for site, layer in DEFAULT_SITES.get(arch, []):
            out.append(Job("dissection", {
                **data, "experiment": "fig3", "site": site, "layer": layer, "alphas": list(s.alphas),
                "n_rotations": s.rotations, "quantile": 0.05, "iou_threshold": 0.1, "seed": 0},
                {"model": model}, label=f"dissection {arch} {site}"))
    return out


_BRODEN_CACHE: dict[tuple, str] = {}


def synthetic_broden(config: dict) -> str:
    """A synthetic Broden-layout dataset for ``config`` (n_images, image_size, data_seed), made once per worker
    process and removed when it exits (a multiprocessing finalizer: worker processes end without ``atexit``)."""
    import shutil
    import tempfile
    from multiprocessing.util import Finalize

    from ...dissection import make_synthetic_broden

    key = (int(config["n_images"]), int(config.get("image_size", 32)), int(config.get("data_seed", 0)))
    if key not in _BRODEN_CACHE:
        root = tempfile.mkdtemp(prefix="intertwiners-broden-")
        Finalize(None, shutil.rmtree, args=(root, True), exitpriority=0)
        make_synthetic_broden(root, n_images=key[0], seed=key[2], image_size=key[1])
        _BRODEN_CACHE[key] = root
    return _BRODEN_CACHE[key]


@register("dissection_model", "train a Fig. 3 model on the synthetic Broden-layout dataset",
          needs=("intertwiners.dissection.experiment:train_fig3_model",))
def run_dissection_model(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``arch`` (resnet | resnet_noact | convnext), ``n_images``, ``image_size``, ``data_seed``,
    ``steps``, ``batch_size`` (default 32), ``widths`` (default 16/32/64), ``seed``. Result: training and
    probe-split accuracies; files: the model."""
    from ...dissection import BrodenDataset
    from ...dissection.experiment import synthetic_training_data, train_fig3_model
    from ...training import accuracy

    root = synthetic_broden(config)
    train = synthetic_training_data(BrodenDataset(root, split="train"))
    probe = synthetic_training_data(BrodenDataset(root, split="val"))
    model, metrics = train_fig3_model(config["arch"], train, steps=int(config["steps"]),
                                      batch_size=int(config.get("batch_size", 32)), seed=int(config["seed"]),
                                      widths=tuple(config.get("widths", (16, 32, 64))), device=device(context))
    metrics = {k: v for k, v in metrics.items() if k != "wall_time_s"}
    result = {"arch": config["arch"], **metrics, "probe_accuracy": float(accuracy(model, probe, device(context)))}
    return Output(result, model_files(model))


@register("dissection", "interpretable units of one site in rotated bases Q**alpha (Fig. 3)",
          needs=("intertwiners.dissection.experiment:rotation_curve",))
def run_dissection(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``site``, ``layer`` (description), ``alphas``, ``n_rotations``, ``quantile``, ``iou_threshold``,
    ``seed`` and the dataset keys of ``dissection_model``; dep ``model``. Result: one row per (alpha,
    rotation) with the fraction of interpretable units, and whether the site is an activation."""
    from ...dissection import BrodenDataset
    from ...dissection.experiment import rotation_curve

    probe = BrodenDataset(synthetic_broden(config), split="val")
    model = model_from_files(inputs["model"].files)
    rows = rotation_curve(model, config["site"], probe, config["alphas"], int(config["n_rotations"]),
                          seed=int(config["seed"]), quantile=float(config["quantile"]),
                          iou_threshold=float(config["iou_threshold"]), device=device(context))
    keep = ("alpha", "rotation", "n_units", "interpretable_units", "fraction", "unique_concepts")
    return Output({"site": config["site"], "layer": config["layer"],
                   "activation_at_site": str(config["layer"]).startswith("relu"),
                   "rows": [{k: r[k] for k in keep} for r in rows]})


def curves(view) -> tuple[list[dict], dict[str, dict]]:
    """(rows for :func:`intertwiners.dissection.experiment.plot_fig3`, per curve name: activation flag and
    the model's probe accuracy)."""
    models = {r.id: r for r in view.rows(kind="dissection_model", status="done")}
    rows, info = [], {}
    for r in view.rows(kind="dissection", status="done"):
        model = models.get(r.deps.get("model"))
        arch = model.config["arch"] if model else r.config.get("arch", "?")
        name = f"{arch} {r.result['site']} [{r.result['layer']}]"
        info[name] = {"activation": bool(r.result.get("activation_at_site")),
                      "accuracy": model.result.get("probe_accuracy") if model else None}
        rows += [{"arch": arch, "site": r.result["site"], "layer": r.result["layer"], "alpha": float(p["alpha"]),
                  "rotation": p["rotation"], "fraction": float(p["fraction"]), "n_units": p.get("n_units"),
                  "unique_concepts": p.get("unique_concepts", 0), "quantile": r.config.get("quantile"),
                  "iou_threshold": r.config.get("iou_threshold"), "name": name} for p in r.result["rows"]]
    return rows, info


def claim(name: str, rows: list[dict], info: dict):
    """The Fig. 3 claim for one curve: drop = fraction(alpha 0) - fraction(alpha 1, rotation r), over rotations."""
    unit = [r["fraction"] for r in rows if r["name"] == name and r["alpha"] == 0.0]
    rotated = [r["fraction"] for r in rows if r["name"] == name and r["alpha"] == 1.0]
    base = unit[0] if unit else 0.0
    drops = [base - f for f in rotated]
    precondition = at_chance([info["accuracy"]], N_CLASSES)
    if unit and base == 0:
        precondition = "no interpretable units at alpha 0, so there is nothing that could drop"
    test = "drop in the fraction of interpretable units from alpha 0 to alpha 1, over random rotations, 95% t-interval"
    if info["activation"]:
        return decide(f"{name} (ReLU at the dissected site): fewer interpretable units in a rotated basis (alpha 1) "
                      "than in the unit basis", [evidence("drop", drops)], test, precondition=precondition, digits=3)
    return decide(f"{name} (no activation at the dissected site): interpretability does not drop under rotation "
                  f"(the drop stays below {MAX_DROP})", [evidence("drop", drops, threshold=MAX_DROP, direction=-1)],
                  test, precondition=precondition, digits=3)


def section(view, figdir: Path) -> Section:
    from ...dissection.experiment import plot_fig3

    title = "Fig. 3 — interpretable units under rotation of the basis (dissection)"
    rows, info = curves(view)
    if not rows:
        return Section(title, "No dissection results in the database.")
    if figdir is not None:
        plot_fig3(rows, figdir / FIGURE, title="Dissection under rotation (synthetic Broden-layout data)")
    alphas = sorted({r["alpha"] for r in rows})
    out = []
    for name in sorted(info):
        acc = info[name]["accuracy"]
        out.append([name, "–" if acc is None else f"{acc:.1f}"]
                   + [fmt(mean_ci(r["fraction"] for r in rows if r["name"] == name and r["alpha"] == a), 3)
                      for a in alphas])
    body = (f"![Fig. 3](figures/{FIGURE})\n\nThe paper (ImageNet, Broden) finds that rotating a ReLU layer's basis "
            "lowers the number of interpretable units, while layers without an activation (modified ResNet-50, "
            "ConvNeXt) do not lose interpretability. Here: small stand-in models trained on the synthetic "
            "Broden-layout dataset; fraction of interpretable units, mean ± 95% t-interval over random rotations "
            f"(alpha 0 is the unit basis, one value). Chance accuracy is {100 / N_CLASSES:.0f}%.\n\n"
            + table(["model, site [layer]", "probe accuracy (%)"] + [f"alpha {a:g}" for a in alphas], out))
    return Section(title, body, [claim(name, rows, info[name]) for name in sorted(info)])
