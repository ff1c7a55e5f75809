"""Figs. 5 and 2 — layer x layer G_ReLU-CKA and linear CKA (Myrtle CNNs, ResNet20s): plan, job, section, figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...stats import decide, evidence
from ..jobs import Dependency, Job, Output, register
from . import common
from .common import PairSimilaritySettings, Section, dataset, device, model_from_files, table
from .fig1_stitching import MYRTLE_PAPER_LAYERS
from .zoo import myrtle_zoo, resnet_zoo

KINDS = ("cka",)
CKA_MEASURES = {"linear": "cka", "grelu": "grelu_cka"}           # job measure -> layer_similarity_matrix measure
NULL_MEASURES = {"grelu": "grelu_cka", "linear": "linear_cka"}   # job measure -> permutation_test measure
PAPER_CKA_DIAGONAL = {"grelu": [0.84, 0.61, 0.45, 0.43], "linear": [0.98, 0.97, 0.92, 0.93]}
TITLES = {"fig5": "Fig. 5 — G_ReLU-CKA and linear CKA between two Myrtle CNNs",
          "fig2": "Fig. 2 — G_ReLU-CKA and linear CKA between two ResNet20s"}
PANELS = {"grelu": "(a) G_ReLU-CKA", "linear": "(b) linear CKA"}


@dataclass(frozen=True)
class Settings(PairSimilaritySettings):
    """Figs. 5 and 2 on ``pairs`` pairs of the zoo's Myrtle CNNs and ``resnet_pairs`` pairs of its ReLU
    ResNet20s (the other fields: :class:`~.common.PairSimilaritySettings`)."""

    resnet_pairs: int = 1


PRESETS = {
    "smoke": Settings(),
    "small": Settings(pairs=3, resnet_pairs=2, permutations=500, permutation_samples=400),
    "paper": Settings(pairs=16, resnet_pairs=16, permutations=1000, permutation_samples=1000),
}


def cka_job(experiment: str, a, b, scale, name: str) -> Job:
    s = scale.cka
    return Job("cka", {"experiment": experiment, "measures": ["linear", "grelu"], "max_samples": s.max_samples,
                       "dataset": scale.zoo.dataset, "permutations": s.permutations,
                       "permutation_samples": s.permutation_samples}, {"a": a, "b": b},
               label=f"cka {experiment} {name}")


def jobs(scale) -> list[Job]:
    """Fig. 5 on Myrtle CNN pairs, Fig. 2 on ReLU ResNet20 pairs."""
    from ..plan import draw_pairs

    s = scale.cka
    mcnn, resnets = myrtle_zoo(scale), resnet_zoo(scale, 0.0)
    return ([cka_job("fig5", mcnn[a], mcnn[b], scale, f"mcnn {a}-{b}")
             for a, b in draw_pairs(len(mcnn), s.pairs, scale.seed + 2)]
            + [cka_job("fig2", resnets[a], resnets[b], scale, f"resnet20 {a}-{b}")
               for a, b in draw_pairs(len(resnets), s.resnet_pairs, scale.seed + 4)])


@register("cka", "layer x layer G_ReLU-CKA and linear CKA matrices for one pair (Figs. 2 and 5)",
          needs=("intertwiners.similarity:layer_similarity_matrix",))
def run_cka(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``measures`` (linear | grelu), ``sites`` (null: every activation site), ``max_samples``,
    ``dataset``, ``permutations`` and ``permutation_samples`` (0: no tests); deps ``a``, ``b``. Result:
    ``{"sites": [...], measure: matrix[i][j] = CKA(a_i, b_j)}`` (minibatch CKA with the unbiased HSIC,
    :func:`intertwiners.similarity.layer_similarity_matrix`) and under ``"null"`` the permutation tests of the
    diagonal (:func:`intertwiners.similarity.permutation.same_layer_tests`)."""
    from ...similarity import layer_similarity_matrix
    from ...similarity.permutation import same_layer_tests

    _, test = dataset(config["dataset"], context)
    a, b = model_from_files(inputs["a"].files), model_from_files(inputs["b"].files)
    result: dict = {}
    for measure in config["measures"]:
        matrix, sites, _ = layer_similarity_matrix(
            a, b, test, sites_a=config.get("sites"), sites_b=config.get("sites"), measure=CKA_MEASURES[measure],
            max_samples=config.get("max_samples"), device=device(context), return_sites=True)
        result["sites"] = list(sites)
        result[measure] = [[float(v) for v in row] for row in matrix]
    if config.get("permutations"):
        result["null"] = same_layer_tests(a, b, test, result["sites"], None,
                                          [NULL_MEASURES[m] for m in config["measures"]],
                                          int(config["permutations"]), int(config["permutation_samples"]),
                                          device=device(context))
    return Output(result)


def short(site: str) -> str:
    """Tick label; as in the paper's Fig. 2, '*' marks layers inside residual blocks (ResNet20's relu1)."""
    star = "*" if site.endswith(".relu1") and site.startswith("layer") else ""
    return site.replace("layer", "L").replace(".relu", ".r") + star


def diagonal_contrast(matrix) -> float:
    """Mean of the diagonal minus mean off the diagonal of a square matrix."""
    m = np.asarray(matrix, dtype=float)
    off = ~np.eye(len(m), dtype=bool)
    return float(np.mean(np.diag(m)) - m[off].mean())


MODELS = {"fig5": "Myrtle CNNs (Fig. 5)", "fig2": "ResNet20s (Fig. 2)"}


def claims(rows, sites, measures, chance, models: str) -> list:
    out = []
    if len(measures) == 2:
        items = [evidence(s, [r.result["linear"][i][i] for r in rows], [r.result["grelu"][i][i] for r in rows])
                 for i, s in enumerate(sites)]
        out.append(decide(f"{models}: G_ReLU-CKA below linear CKA on the diagonal at every layer (as in the paper)",
                          items,
                          "linear − G_ReLU CKA of the same layer, paired over model pairs, 95% t-interval",
                          precondition=chance, digits=3))
    if len(sites) > 1:
        items = [evidence(m, [diagonal_contrast(r.result[m]) for r in rows]) for m in measures]
        out.append(decide(f"{models}: layers at the same depth are more similar than layers at different depths", items,
                          "mean over the diagonal − mean off the diagonal, over model pairs, 95% t-interval",
                          precondition=chance, digits=3))
    if any("null" in r.result for r in rows):
        out.append(common.null_claim(f"{models}: same-layer CKA above chance at every layer, for both kernels",
                                     rows, "null", [NULL_MEASURES[m] for m in measures], sites,
                                     precondition=chance))
    return out


def section(view, figdir: Path, experiment: str) -> Section:
    from ...similarity.plots import plot_matrices

    title = TITLES[experiment]
    rows = [r for r in view.rows(kind="cka", status="done") if r.config.get("experiment") == experiment]
    if not rows:
        return Section(title, "No CKA results in the database.")
    sites = rows[0].result["sites"]
    measures = [m for m in ("grelu", "linear") if m in rows[0].result]
    mats = {m: np.mean([np.asarray(r.result[m], dtype=float) for r in rows], axis=0) for m in measures}
    labels = [short(s) for s in sites]
    name = f"{experiment}_cka.png"
    if figdir is not None:
        plot_matrices({PANELS[m]: mats[m] for m in measures}, labels, labels, figdir / name)
    if experiment == "fig5" and all(s in MYRTLE_PAPER_LAYERS for s in sites):
        diag = table(["measure"] + [f"{s} (layer {MYRTLE_PAPER_LAYERS[s]})" for s in sites],
                     [[m] + [f"{d:.3f} (paper {PAPER_CKA_DIAGONAL[m][list(MYRTLE_PAPER_LAYERS).index(s)]})"
                             for s, d in zip(sites, np.diag(mats[m]))] for m in measures])
    else:
        diag = table(["measure (diagonal)"] + labels, [[m] + [f"{d:.3f}" for d in np.diag(mats[m])] for m in measures])
    nulls = common.null_table(rows, "null", {NULL_MEASURES[m]: PANELS[m][4:] for m in measures}, labels)
    body = (f"![{title}](figures/{name})\n\nAveraged over {len(rows)} pair(s); features are the activation outputs "
            "on test images (eval mode); '*' marks layers inside residual blocks. Diagonal (same layer in both "
            "models):\n\n" + diag
            + ("\n\nAbove chance? Permutation tests of the same-layer CKA (full Gram matrices on the first test "
               "images; the images of one model shuffled, B shuffles, p = (1 + #null ≥ observed)/(1 + B)): the "
               "largest p over pairs; chance-corrected CKA (observed − null mean), mean over pairs.\n\n" + nulls
               if nulls else ""))
    return Section(title, body, claims(rows, sites, measures, common.at_chance(common.zoo_accuracies(view, rows)),
                                         MODELS[experiment]), common.datasets_of(rows))
