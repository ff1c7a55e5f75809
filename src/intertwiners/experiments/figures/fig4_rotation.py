"""Fig. 4 — the rotation penalty of batch-norm-free Myrtle CNNs: plan, job, report section and figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...stats import decide, evidence, mean_ci
from ..jobs import Dependency, Job, Output, register
from .common import COMMON, Section, at_chance, dataset, device, fmt, model_from_files, table
from .zoo import mcnn_kwargs, zoo_job

KINDS = ("rotation_penalty",)
PAPER_ROTATION = {"layers": ["conv1", "conv2", "conv3"], "paper_layers": [0, 2, 5],
                  "grelu": [0.0, 1.7, 1.3], "orthogonal": [0.7, 4.6, 8.3]}
FIGURE = "fig4_rotation_penalty.png"


def jobs(s) -> list[Job]:
    """Per activation: one base model, then layers x transforms x repeats."""
    out = []
    for act in s.rotation_activations:
        base_kwargs = {**mcnn_kwargs(s), "batch_norm": False, **({} if act == "relu" else {"activation": act})}
        epochs = s.sigmoid_epochs if act == "sigmoid" and s.sigmoid_epochs else s.mcnn_epochs
        base = zoo_job("myrtle_cnn", s.dataset, 0, epochs, **base_kwargs)
        tag = {} if act == "relu" else {"activation": act}  # relu keeps the ids of earlier plans
        for layer in s.rotation_layers:
            for transform in s.rotation_transforms:
                for r in range(s.rotation_repeats):
                    out.append(Job("rotation_penalty", {
                        "experiment": "fig4", "layer": layer, "transform": transform, "seed": r,
                        "epochs": s.rotation_epochs, "dataset": s.dataset, **tag},
                        {"model": base}, label=f"rotation {act} {layer} {transform} r{r}"))
    return out


@register("rotation_penalty", "fixed transform before an activation, then fine-tuning (Fig. 4)",
          needs=("intertwiners.rotation_penalty:rotation_penalty",),
          sources=(COMMON, "intertwiners.experiments.figures.fig4_rotation:run_rotation_penalty",
                   "intertwiners.rotation_penalty", "intertwiners.groups"))
def run_rotation_penalty(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``layer``, ``transform`` (grelu | orthogonal | ...), ``seed``, ``epochs``, ``dataset``;
    dep ``model`` (a zoo job). Result: baseline, transformed and fine-tuned accuracies and the penalty."""
    from ...rotation_penalty import rotation_penalty

    train, test = dataset(config["dataset"], context)
    model = model_from_files(inputs["model"].files)
    r = rotation_penalty(model, config["layer"], config["transform"], train, test, epochs=int(config["epochs"]),
                         seed=int(config["seed"]), device=device(context))
    r.pop("wall_time_s", None)
    return Output(r)


def rotation_rows(view) -> list[dict]:
    """Stored results as the rows :func:`intertwiners.rotation_penalty.plot_rotation_penalties` draws."""
    rows = view.rows(kind="rotation_penalty", status="done")
    order = sorted({r.config["layer"] for r in rows})
    return [{"position": order.index(r.config["layer"]), "conv": r.config["layer"], **r.result,
             "panel": r.config.get("activation", "relu"), "layer": r.config["layer"],
             "transform": r.config["transform"], "seed": int(r.config["seed"])} for r in rows]


def penalties(rows, act: str, transform: str, layer: str) -> dict[int, float]:
    """{repeat seed: penalty} for one activation, transform and layer."""
    return {r["seed"]: float(r["penalty"]) for r in rows
            if (r["panel"], r["transform"], r["layer"]) == (act, transform, layer)}


def advantage(rows, act: str, layers) -> list[float]:
    """Per repeat seed: mean over layers of (orthogonal - G_ReLU penalty)."""
    per_layer = [(penalties(rows, act, "orthogonal", la), penalties(rows, act, "grelu", la)) for la in layers]
    seeds = sorted(set.intersection(*(set(o) & set(g) for o, g in per_layer))) if per_layer else []
    return [float(np.mean([o[s] - g[s] for o, g in per_layer])) for s in seeds]


def chance(rows, act: str) -> str | None:
    return at_chance([r.get("baseline_accuracy") for r in rows if r["panel"] == act])


def claims(rows, layers, acts) -> list:
    out = []
    test = "orthogonal − G_ReLU penalty in points, paired over repeats, 95% t-interval"
    if "relu" in acts:
        items = []
        for la in layers:
            o, g = penalties(rows, "relu", "orthogonal", la), penalties(rows, "relu", "grelu", la)
            common = sorted(set(o) & set(g))
            items.append(evidence(la, [o[s] for s in common], [g[s] for s in common]))
        out.append(decide("ReLU: G_ReLU rotation penalty below the orthogonal one at every layer", items, test,
                          precondition=chance(rows, "relu")))
    if "relu" in acts and "sigmoid" in acts:
        item = evidence("ReLU − sigmoid advantage", advantage(rows, "relu", layers),
                        advantage(rows, "sigmoid", layers), paired=False)
        out.append(decide("Sigmoid (P·D with D ≠ I is no symmetry of the sigmoid): the advantage of P·D over the "
                          "orthogonal transform (orthogonal − P·D penalty, mean over layers) is smaller than with "
                          "ReLU", [item], "difference of the advantages in points over repeats, Welch 95% "
                          "t-interval", precondition=chance(rows, "sigmoid") or chance(rows, "relu")))
    return out


def section(view, figdir: Path) -> Section:
    from ...rotation_penalty import plot_rotation_penalties

    title = "Fig. 4 — rotation penalties (Myrtle CNN without batch norm)"
    rows = rotation_rows(view)
    if not rows:
        return Section(title, "No rotation-penalty results in the database.")
    layers = sorted({r["layer"] for r in rows})
    found = {r["transform"] for r in rows}
    transforms = [t for t in ("grelu", "orthogonal") if t in found] + sorted(found - {"grelu", "orthogonal"})
    acts = sorted({r["panel"] for r in rows}, key=lambda a: (a != "relu", a))
    if figdir is not None:
        plot_rotation_penalties(rows, figdir / FIGURE, title="Rotation penalty")
    out = []
    for act in acts:
        for t in transforms:
            cells = []
            for la in layers:
                iv = mean_ci(penalties(rows, act, t, la).values())
                ref = (PAPER_ROTATION[t][PAPER_ROTATION["layers"].index(la)]
                       if act == "relu" and t in PAPER_ROTATION and la in PAPER_ROTATION["layers"] else "–")
                cells.append(f"{fmt(iv)} (n={iv.n}; paper {ref})" if iv.defined else f"{fmt(iv)} (paper {ref})")
            out.append([act, t] + cells)
    body = (f"![Fig. 4](figures/{FIGURE})\n\nPenalty = baseline accuracy − accuracy after inserting a fixed "
            "transform (a G_ReLU element P·D, or a random orthogonal matrix) before the activation and "
            "fine-tuning the layers after it; mean ± 95% t-interval over repeats. The `identity` transform, "
            "where present, measures what fine-tuning alone does to accuracy.\n\n"
            + table(["activation", "transform"] + layers, out))
    return Section(title, body, claims(rows, layers, acts))

