"""Table 2 — G_ReLU and orthogonal Procrustes similarity per layer: plan, job, report section and figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...stats import decide, evidence, mean_ci
from ..jobs import Dependency, Job, Output, register
from . import common
from .common import PairSimilaritySettings, Section, at_chance, dataset, device, fmt, model_from_files, table
from .fig1_stitching import MYRTLE_PAPER_LAYERS
from .zoo import myrtle_zoo

KINDS = ("procrustes",)
SITES = ("relu1", "relu2", "relu3", "relu4")
PAPER_PROCRUSTES = {"grelu": [0.6208, 0.5106, 0.4432, 0.4899], "orthogonal": [0.7724, 0.5743, 0.5087, 0.5825]}
FIGURE = "table2_procrustes.png"
MEASURES = {"procrustes_grelu": "G_ReLU-Procrustes", "procrustes_orthogonal": "orthogonal Procrustes"}


@dataclass(frozen=True)
class Settings(PairSimilaritySettings):
    """Table 2 on ``pairs`` pairs of the zoo's Myrtle CNNs (the fields: :class:`~.common.PairSimilaritySettings`)."""


PRESETS = {
    "smoke": Settings(),
    "small": Settings(pairs=6, permutations=500, permutation_samples=400),
    "paper": Settings(pairs=32, permutations=1000, permutation_samples=1000),
}


def jobs(scale) -> list[Job]:
    from ..plan import draw_pairs

    s = scale.table2_procrustes
    mcnn = myrtle_zoo(scale)
    return [Job("procrustes", {"experiment": "table2", "sites": list(SITES), "groups": ["grelu", "orthogonal"],
                               "max_samples": s.max_samples, "dataset": scale.zoo.dataset,
                               "permutations": s.permutations, "permutation_samples": s.permutation_samples},
                {"a": mcnn[a], "b": mcnn[b]}, label=f"procrustes mcnn {a}-{b}")
            for a, b in draw_pairs(len(mcnn), s.pairs, scale.seed + 1)]


@register("procrustes", "G_ReLU and orthogonal Procrustes similarity per layer for one pair (Table 2)",
          needs=("intertwiners.similarity:procrustes_per_layer",))
def run_procrustes(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``sites``, ``groups``, ``max_samples``, ``dataset``, ``permutations`` and
    ``permutation_samples`` (0: no permutation tests); deps ``a``, ``b``. Result: per group a list of
    similarities, one per site (activation outputs on test images, eval mode, channels as columns,
    :func:`intertwiners.similarity.procrustes_per_layer`), and under ``"null"`` the permutation tests of
    :func:`intertwiners.similarity.permutation.same_layer_tests`."""
    from ...similarity import procrustes_per_layer

    _, test = dataset(config["dataset"], context)
    a, b = model_from_files(inputs["a"].files), model_from_files(inputs["b"].files)
    found = procrustes_per_layer(a, b, test, sites=config["sites"], groups=tuple(config["groups"]),
                                 max_samples=config.get("max_samples"), device=device(context))
    sites = list(found)
    result = {"sites": sites, **{g: [float(found[s][g]) for s in sites] for g in config["groups"]}}
    if config.get("permutations"):
        from ...similarity.permutation import same_layer_tests

        result["null"] = same_layer_tests(a, b, test, sites, None, [f"procrustes_{g}" for g in config["groups"]],
                                          int(config["permutations"]), int(config["permutation_samples"]),
                                          device=device(context))
    return Output(result)


def plot(stats: dict, sites: list[str], path: Path) -> Path:
    """Procrustes similarity per site, mean and 95% t-interval over pairs, the paper's values dashed."""
    import numpy as np

    from ..._util import save_figure
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(sites))
    for g, ivs in stats.items():
        line = ax.errorbar(x, [iv.mean for iv in ivs], yerr=[iv.half for iv in ivs], marker="o", capsize=3,
                           label=f"{g} (ours)")
        if g in PAPER_PROCRUSTES and all(s in MYRTLE_PAPER_LAYERS for s in sites):
            ax.plot(x, [PAPER_PROCRUSTES[g][list(MYRTLE_PAPER_LAYERS).index(s)] for s in sites], ls="--",
                    color=line[0].get_color(), alpha=0.6, label=f"{g} (paper, CIFAR-10)")
    ax.set_xticks(x, [f"{s}\n(layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites])
    ax.set_ylabel("Procrustes similarity")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def section(view, figdir: Path) -> Section:
    title = "Table 2 — G_ReLU and orthogonal Procrustes similarity per layer (Myrtle CNN)"
    rows = view.rows(kind="procrustes", status="done")
    if not rows:
        return Section(title, "No Procrustes results in the database.")
    sites = rows[0].result["sites"]
    groups = [g for g in ("grelu", "orthogonal") if g in rows[0].result]
    stats = {g: [mean_ci(r.result[g][i] for r in rows) for i in range(len(sites))] for g in groups}
    if figdir is not None:
        plot(stats, sites, figdir / FIGURE)
    out = [[g] + [f"{fmt(iv, 3)} (paper {PAPER_PROCRUSTES[g][list(MYRTLE_PAPER_LAYERS).index(s)]})"
                  if s in MYRTLE_PAPER_LAYERS and g in PAPER_PROCRUSTES else fmt(iv, 3)
                  for s, iv in zip(sites, stats[g])] for g in groups]
    nulls = common.null_table(rows, "null", MEASURES, sites)
    body = (f"![Table 2](figures/{FIGURE})\n\nMean ± 95% t-interval over {len(rows)} pair(s); features are the "
            "ReLU outputs on test images, channels as columns.\n\n"
            + table(["group"] + [f"{s} (layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites], out)
            + ("\n\nAbove chance? Permutation tests (the images of one model shuffled against the other's; "
               "whole images, B shuffles, p = (1 + #null ≥ observed)/(1 + B)), on the first test images: the "
               "largest p over pairs; chance-corrected similarity (observed − null mean), mean over pairs.\n\n"
               + nulls if nulls else ""))
    chance = at_chance(common.zoo_accuracies(view, rows))
    found = []
    if len(groups) == 2:
        items = [evidence(s, [r.result["orthogonal"][i] for r in rows], [r.result["grelu"][i] for r in rows])
                 for i, s in enumerate(sites)]
        found.append(decide("G_ReLU-Procrustes similarity below orthogonal Procrustes at every layer", items,
                            "orthogonal − G_ReLU similarity, paired over model pairs, 95% t-interval",
                            precondition=chance, digits=3))
    if nulls:
        found.append(common.null_claim("Same-layer Procrustes similarity above chance at every layer, for both groups",
                                rows, "null", list(MEASURES), sites, precondition=chance))
    return Section(title, body, found, common.datasets_of(rows))
