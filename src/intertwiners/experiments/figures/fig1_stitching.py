"""Fig. 1 — stitching penalties between Myrtle CNNs: plan, job, report section and figure."""

from __future__ import annotations

from pathlib import Path

from ...stats import decide, evidence, mean_ci
from ..jobs import Dependency, Job, Output, register
from . import common
from .common import COMMON, FEATURES, Section, at_chance, dataset, device, fmt, model_from_files, table
from .zoo import myrtle_zoo

KINDS = ("stitch",)
MYRTLE_PAPER_LAYERS = {"relu1": 3, "relu2": 6, "relu3": 10, "relu4": 14}
PAPER_STITCHING = {  # penalty in accuracy points at layers 3/6/10/14 (REFERENCE.md)
    "full": [1.5, 1.7, 2.7, 2.5], "low_rank:4": [8.7, 14.0, 26.5, 16.0],
    "low_rank:1": [42.0, 53.0, 57.0, 62.0], "grelu": [8.3, 7.5, 17.0, 6.0]}
KIND_ORDER = ["full", "low_rank:4", "low_rank:2", "low_rank:1", "grelu"]
FIGURE = "fig1_stitching.png"


def stitch_job(experiment: str, front: Job, back: Job, site: str, kind: str, s, extra: dict | None = None) -> Job:
    """One stitching penalty: ``kind`` is a stitching kind, ``low_rank:R`` for rank R."""
    base, _, rank = kind.partition(":")
    config = {"experiment": experiment, "site": site, "kind": base, "rank": int(rank) if rank else None,
              "epochs": s.stitch_epochs, "seed": 0, "dataset": s.dataset, "settings": s.stitch_settings,
              **(extra or {})}
    label = f"stitch {experiment} {front.config['seed']}-{back.config['seed']} {site} {kind}"
    if extra and "slope" in extra:
        label += f" slope={extra['slope']}"
    return Job("stitch", config, {"front": front, "back": back}, label=label)


def jobs(s) -> list[Job]:
    """Myrtle CNN pairs x sites x kinds."""
    from ..plan import draw_pairs

    mcnn = myrtle_zoo(s)
    return [stitch_job("fig1", mcnn[a], mcnn[b], site, kind, s)
            for a, b in draw_pairs(len(mcnn), s.stitch_pairs, s.seed)
            for site in s.stitch_sites for kind in s.stitch_kinds]


@register("stitch", "a stitching penalty for one (front, back) pair, site and kind (Fig. 1, D.3)",
          needs=("intertwiners.stitching:stitch",),
          sources=(COMMON, "intertwiners.experiments.figures.fig1_stitching:run_stitch", "intertwiners.stitching")
          + FEATURES)
def run_stitch(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``site``, ``kind``, ``rank``, ``epochs``, ``seed``, ``dataset``, ``settings`` (default
    ``"default"``); deps ``front``, ``back`` (zoo jobs). Result: the accuracies and the penalty (eq. 4.3)."""
    from ...stitching import stitch

    train, test = dataset(config["dataset"], context)
    front = model_from_files(inputs["front"].files)
    back = model_from_files(inputs["back"].files)
    r = stitch(front, back, config["site"], config["kind"], train, test, epochs=config["epochs"],
               rank=config.get("rank"), seed=int(config.get("seed", 0)), settings=config.get("settings", "default"),
               device=device(context), front_accuracy=inputs["front"].result.get("test_accuracy"),
               back_accuracy=inputs["back"].result.get("test_accuracy"), keep_model=False)
    row = r.as_row()
    row.pop("seconds", None)
    return Output(row)


def stitch_rows(view, experiment: str) -> list[dict]:
    """The stored stitching results of ``experiment`` as the rows :mod:`intertwiners.stitching.plot` draws."""
    out = []
    for r in view.rows(kind="stitch", status="done"):
        if r.config.get("experiment") != experiment:
            continue
        out.append({"site": r.config["site"], "kind": common.kind_name(r.config), "penalty": float(r.result["penalty"]),
                    "front": r.deps.get("front"), "back": r.deps.get("back"),
                    "site_index": MYRTLE_PAPER_LAYERS.get(r.config["site"]), "slope": r.config.get("slope"),
                    "accuracies": [r.result.get("front_accuracy"), r.result.get("back_accuracy")]})
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
    return Section(title, body, claims(rows, sites, kinds))
