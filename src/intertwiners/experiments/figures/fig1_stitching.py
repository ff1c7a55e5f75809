"""Fig. 1 — stitching penalties between Myrtle CNNs: plan, job, report section and figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...stats import decide, evidence, mean_ci
from ..jobs import Dependency, Job, Output, Part, register
from . import common
from .common import Section, at_chance, dataset, datasets_of, device, fmt, model_from_files, table
from .zoo import myrtle_zoo

KINDS = ("stitch",)
MYRTLE_PAPER_LAYERS = {"relu1": 3, "relu2": 6, "relu3": 10, "relu4": 14}
MYRTLE_SITES = tuple(MYRTLE_PAPER_LAYERS)
PAPER_STITCHING = {  # penalty in accuracy points at layers 3/6/10/14 (REFERENCE.md)
    "full": [1.5, 1.7, 2.7, 2.5], "low_rank:4": [8.7, 14.0, 26.5, 16.0],
    "low_rank:1": [42.0, 53.0, 57.0, 62.0], "grelu": [8.3, 7.5, 17.0, 6.0]}
KIND_ORDER = ["full", "low_rank:4", "low_rank:2", "low_rank:1", "grelu"]
FIGURE = "fig1_stitching.png"
ALL_KINDS = ("full", "low_rank:1", "low_rank:2", "low_rank:4", "grelu")


@dataclass(frozen=True)
class Settings:
    """Fig. 1: stitching the zoo's Myrtle CNNs. ``epochs``: the most epochs of a stitching layer, ``patience``
    its convergence criterion (:class:`intertwiners.training.Convergence`, epoch 0 = the closed-form
    initialisation counted), ``settings``: :data:`intertwiners.stitching.SETTINGS` (``default``: Adam;
    ``authors``: SGD)."""

    pairs: int = 1
    sites: tuple[str, ...] = MYRTLE_SITES
    kinds: tuple[str, ...] = ("full", "low_rank:1", "low_rank:4", "grelu")
    epochs: int = 2
    patience: int | None = 1
    settings: str = "default"


PRESETS = {
    "smoke": Settings(epochs=1),   # a pipeline check: one epoch runs every step of the training loop
    # 2 epochs (4, then 3 before): the same answers, "G_ReLU below rank 1" better supported (docs/reproduce.md,
    # "Sized to the claims")
    "small": Settings(pairs=4, epochs=2, kinds=ALL_KINDS),
    "paper": Settings(pairs=32, epochs=20, kinds=ALL_KINDS, settings="authors", patience=5),
}


def stitch_job(experiment: str, front: Part, back: Part, site: str, kinds, dataset_name: str, epochs: int,
               patience: int | None, settings: str, extra: dict | None = None) -> Job:
    """Every stitching layer of ``kinds`` (``low_rank:R`` for rank R) for one (front, back) pair at ``site``,
    trained together on front's features, computed once (:func:`intertwiners.stitching.stitch_many`)."""
    config = {"experiment": experiment, "site": site, "kinds": list(kinds), "epochs": epochs, "patience": patience,
              "seed": 0, "dataset": dataset_name, "settings": settings, **(extra or {})}
    label = f"stitch {experiment} {front.name}-{back.name} {site}"
    if extra and "slope" in extra:
        label += f" slope={extra['slope']}"
    return Job("stitch", config, {"front": front, "back": back}, label=label)


def jobs(scale) -> list[Job]:
    """Myrtle CNN pairs x sites (all kinds in one job)."""
    from ..plan import draw_pairs

    s = scale.fig1_stitching
    mcnn = myrtle_zoo(scale)
    return [stitch_job("fig1", mcnn[a], mcnn[b], site, s.kinds, scale.zoo.dataset, s.epochs, s.patience, s.settings)
            for a, b in draw_pairs(len(mcnn), s.pairs, scale.seed) for site in s.sites]


@register("stitch", "the stitching penalties of one (front, back) pair at one site, every kind (Fig. 1, D.3)",
          needs=("intertwiners.stitching:stitch_many",))
def run_stitch(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``site``, ``kinds``, ``epochs``, ``patience``, ``seed``, ``dataset``, ``settings``; deps
    ``front``, ``back`` (zoo models). Result: ``{"kinds": {kind: row}}``, each row with the accuracies and
    the penalty (eq. 4.3)."""
    from ...stitching import stitch_many

    train, test = dataset(config["dataset"], context)
    front = model_from_files(inputs["front"].files)
    back = model_from_files(inputs["back"].files)
    found = stitch_many(front, back, config["site"], config["kinds"], train, test, epochs=config["epochs"],
                        patience=config.get("patience"), seed=int(config.get("seed", 0)),
                        settings=config.get("settings", "default"), device=device(context),
                        front_accuracy=inputs["front"].result.get("test_accuracy"),
                        back_accuracy=inputs["back"].result.get("test_accuracy"), keep_model=False)
    rows = {}
    for kind, r in zip(config["kinds"], found):
        row = r.as_row()
        row.pop("seconds", None)
        rows[kind] = row
    return Output({"kinds": rows})


def stitch_job_rows(view, experiment: str) -> list:
    """The stored stitching jobs of ``experiment`` (``"fig1"`` or ``"d3"``) that are done."""
    return [r for r in view.rows(kind="stitch", status="done") if r.config.get("experiment") == experiment]


def stitch_rows(view, experiment: str) -> list[dict]:
    """The stored stitching results of ``experiment`` as the rows :mod:`intertwiners.stitching.plot` draws."""
    out = []
    for r in stitch_job_rows(view, experiment):
        for kind, row in r.result["kinds"].items():
            out.append({"site": r.config["site"], "kind": kind, "penalty": float(row["penalty"]),
                        "front": r.deps.get("front"), "back": r.deps.get("back"),
                        "site_index": MYRTLE_PAPER_LAYERS.get(r.config["site"]), "slope": r.config.get("slope"),
                        "accuracies": [row.get("front_accuracy"), row.get("back_accuracy")]})
    return out


def by_pair(rows: list[dict], kind: str, site: str) -> dict[tuple, float]:
    return {(r["front"], r["back"]): r["penalty"] for r in rows if r["kind"] == kind and r["site"] == site}


def paired_evidence(rows, site: str, high: str, low: str, label: str):
    """Evidence that penalty(high) - penalty(low) > 0 at ``site``, paired over model pairs."""
    a, b = by_pair(rows, high, site), by_pair(rows, low, site)
    common = sorted(set(a) & set(b))
    return evidence(label, [a[k] for k in common], [b[k] for k in common])


def reference(kinds, sites) -> dict[str, dict[str, float]]:
    """The paper's penalties for the kinds and Myrtle sites present."""
    return {k: {s: PAPER_STITCHING[k][list(MYRTLE_PAPER_LAYERS).index(s)] for s in sites if s in MYRTLE_PAPER_LAYERS}
            for k in kinds if k in PAPER_STITCHING}


def claims(rows: list[dict], sites: list[str], kinds: list[str]) -> list:
    """Full stitching lowest everywhere; G_ReLU below rank 1 everywhere (paired over pairs, 95% t)."""
    chance = at_chance([a for r in rows for a in r["accuracies"]])
    test = "difference of penalties in points, paired over model pairs, 95% t-interval"
    out = []
    others = [k for k in kinds if k != "full"]
    if "full" in kinds and others:
        items = [paired_evidence(rows, s, k, "full", f"{s} {k} − full") for s in sites for k in others]
        out.append(decide("Full (affine) stitching has the lowest penalty at every layer", items, test,
                          precondition=chance))
    if "grelu" in kinds and "low_rank:1" in kinds:
        items = [paired_evidence(rows, s, "low_rank:1", "grelu", f"{s} rank 1 − G_ReLU") for s in sites]
        out.append(decide("G_ReLU stitching penalty below the rank-1 penalty at every layer (although rank-1 "
                          "layers have more parameters than G_ReLU)", items, test, precondition=chance))
    return out


def section(view, figdir: Path) -> Section:
    from ...stitching.plot import plot_penalties

    title = "Fig. 1 — stitching penalties (Myrtle CNN)"
    rows = stitch_rows(view, "fig1")
    if not rows:
        return Section(title, "No stitching results in the database.")
    sites = sorted({r["site"] for r in rows}, key=lambda s: MYRTLE_PAPER_LAYERS.get(s, 99))
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 9)
    ref = reference(kinds, sites)
    if figdir is not None:
        fig = plot_penalties(rows, figdir / FIGURE, reference=ref, title="Stitching penalties, Myrtle CNN")
        common.pyplot().close(fig)
    out = []
    for k in kinds:
        cells = [fmt(mean_ci(by_pair(rows, k, s).values()), 1) + f" (paper {ref.get(k, {}).get(s, '–')})"
                 for s in sites]
        out.append([k] + cells)
    n_pairs = len({(r["front"], r["back"]) for r in rows})
    body = (f"![Fig. 1](figures/{FIGURE})\n\nPenalty = mean accuracy of the two models − stitched accuracy, in "
            f"points, mean ± 95% t-interval over {n_pairs} pair(s).\n\n"
            + table(["kind"] + [f"{s} (layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites], out))
    return Section(title, body, claims(rows, sites, kinds), datasets_of(stitch_job_rows(view, "fig1")))
