"""Extension beyond the paper — interpolation barriers of zoo pairs before and after alignment through the
intertwiner group: plan, job, report section, CSV and figure.

For pairs of independently trained zoo models of one architecture (the Myrtle CNNs of Fig. 1 and the ReLU
ResNet20s of appendix D.3, so nothing new is trained), B is aligned to A (:func:`intertwiners.align`)
with no alignment, with permutations only and with the full intertwiner group, and the loss and accuracy
of ``(1 - alpha)·A + alpha·B`` are measured on the test set with batch-norm statistics recomputed at every
alpha (:func:`intertwiners.interpolate`); the full-group path is measured again with REPAIR
(``interpolate(..., repair=True)``). The paper does not do this; the section says so.

Cost: each variant evaluates every alpha once (one pass over the ``samples`` training images for the
statistics, one over the test set); the REPAIR variant reuses the full group's aligned model. The ``small``
scale uses 5 alphas and 500 training images (see :mod:`intertwiners.experiments.plan`).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...stats import mean_ci
from ..jobs import Dependency, Job, Output, register
from . import common
from .common import Section, at_chance, dataset, fmt, model_from_files, table
from .zoo import myrtle_zoo, resnet_zoo

KINDS = ("alignment_barrier",)
FIGURE = "ext_alignment_barriers.png"
CSV = "ext_alignment_barriers.csv"
TITLE = ("Extension (beyond the paper) — interpolation barriers before and after alignment through the "
         "intertwiner group")
NONE, PERM, FULL = "none", "permutation (activations)", "full group (activations)"
REPAIR = "full group + REPAIR (activations)"
ALIGN_VARIANTS_ACTIVATIONS = (NONE, PERM, FULL, REPAIR)
ALIGN_VARIANTS = ALIGN_VARIANTS_ACTIVATIONS + ("permutation (weights)", "full group (weights)",
                                               "full group + REPAIR (weights)")


@dataclass(frozen=True)
class Settings:
    """``pairs`` pairs per architecture of the zoo's models, interpolated at ``alphas`` with each alignment of
    ``variants``; ``samples`` training images for the activation and batch-norm statistics."""

    pairs: int = 1
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    variants: tuple[str, ...] = ALIGN_VARIANTS_ACTIVATIONS
    samples: int = 256


PRESETS = {
    "smoke": Settings(),
    "small": Settings(pairs=2, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), variants=ALIGN_VARIANTS_ACTIVATIONS, samples=500),
    "paper": Settings(pairs=4, alphas=tuple(i / 10 for i in range(11)), variants=ALIGN_VARIANTS, samples=5000),
}


def zoos(scale) -> dict[str, list]:
    """The zoo models paired here: those other experiments train already."""
    return {"myrtle_cnn": myrtle_zoo(scale), "resnet20": resnet_zoo(scale, 0.0)}


def jobs(scale) -> list[Job]:
    from ..plan import draw_pairs

    s = scale.alignment_barriers
    out = []
    for arch, zoo in zoos(scale).items():
        for a, b in draw_pairs(len(zoo), s.pairs, scale.seed + 13):
            out.append(Job("alignment_barrier", {
                "experiment": "alignment", "dataset": scale.zoo.dataset, "alphas": [float(x) for x in s.alphas],
                "variants": list(s.variants), "samples": s.samples},
                {"a": zoo[a], "b": zoo[b]}, label=f"alignment {arch} {a}-{b}"))
    return out


@register("alignment_barrier", "interpolation barrier of a zoo pair with and without alignment (extension)",
          needs=("intertwiners.alignment.comparison:compare_alignments",))
def run_alignment_barrier(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``dataset``, ``alphas``, ``variants`` (labels of
    :data:`intertwiners.alignment.comparison.VARIANTS`), ``samples`` (the first training images: inputs for
    the activation statistics and the batch-norm statistics); deps ``a``, ``b``. Result: per variant the
    loss and accuracy curves on the test set, their barriers and the alignment time."""
    import torch

    from ...alignment.comparison import VARIANTS, compare_alignments

    unknown = sorted(set(config["variants"]) - {v[0] for v in VARIANTS})
    if unknown:
        raise ValueError(f"unknown alignment variants {unknown}; known: {[v[0] for v in VARIANTS]}")
    train, test = dataset(config["dataset"], context)
    a, b = model_from_files(inputs["a"].files), model_from_files(inputs["b"].files)
    x = torch.as_tensor(np.asarray(train.x[:int(config["samples"])]))
    variants = [v for v in VARIANTS if v[0] in config["variants"]]
    comp = compare_alignments(a, b, x, test, alphas=config["alphas"], variants=variants)
    curves = {label: {"loss": [float(v) for v in c.loss], "accuracy": [float(v) for v in c.accuracy],
                      "barrier": {k: float(v) for k, v in c.barrier.items()}} for label, c in comp.curves.items()}
    arch = a.intertwiners_config.get("arch", type(a).__name__)
    return Output({"arch": arch, "alphas": [float(v) for v in config["alphas"]], "curves": curves,
                   "align_seconds": {k: round(float(v), 3) for k, v in comp.seconds.items()}})


def write_csv(rows, path: Path) -> Path:
    """One line per (pair, variant, alpha): loss, accuracy and the pair's barriers."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "pair", "variant", "alpha", "loss", "accuracy", "loss_barrier", "accuracy_barrier"])
        for r in rows:
            for label, c in r.result["curves"].items():
                for alpha, lo, ac in zip(r.result["alphas"], c["loss"], c["accuracy"]):
                    w.writerow([r.result["arch"], r.label, label, alpha, f"{lo:.6g}", f"{ac:.6g}",
                                f"{c['barrier']['loss']:.6g}", f"{c['barrier']['accuracy']:.6g}"])
    return path


def plot(rows, path: Path) -> Path:
    """Test loss and accuracy against alpha: one row of panels per architecture, one line per variant
    (mean over pairs)."""
    from ..._util import save_figure

    plt = common.pyplot()
    by_arch = _by_arch(rows)
    fig, axes = plt.subplots(len(by_arch), 2, figsize=(10, 3.6 * len(by_arch)), squeeze=False)
    for (arch, rs), (ax_l, ax_a) in zip(by_arch.items(), axes):
        alphas = rs[0].result["alphas"]
        for label in _labels(rs):
            got = [r.result["curves"][label] for r in rs if label in r.result["curves"]]
            ax_l.plot(alphas, np.mean([c["loss"] for c in got], 0), marker="o", ms=3, label=label)
            ax_a.plot(alphas, np.mean([c["accuracy"] for c in got], 0), marker="o", ms=3, label=label)
        ax_l.set(title=f"{arch}: test loss ({len(rs)} pair(s))", ylabel="cross-entropy")
        ax_a.set(title=f"{arch}: test accuracy ({len(rs)} pair(s))", ylabel="accuracy (%)")
        ax_a.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("alpha  ((1 - alpha)·A + alpha·B_aligned)")
    return save_figure(fig, path)


def _labels(rows) -> list[str]:
    """The variants found in ``rows``, in the order of :data:`intertwiners.alignment.comparison.VARIANTS`."""
    from ...alignment.comparison import VARIANTS

    found = {label for r in rows for label in r.result["curves"]}
    return [v[0] for v in VARIANTS if v[0] in found] + sorted(found - {v[0] for v in VARIANTS})


def _cell(values: list[float], digits: int) -> str:
    """The value itself for one pair, else mean ± 95% t-interval half-width."""
    return f"{values[0]:.{digits}f}" if len(values) == 1 else fmt(mean_ci(values), digits)


def _middle(alphas) -> int:
    """The index of the alpha nearest 0.5."""
    return int(np.argmin(np.abs(np.asarray(alphas) - 0.5)))


def _by_arch(rows) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for r in rows:
        out[r.result["arch"]].append(r)
    return dict(sorted(out.items()))


def _sentences(arch: str, rs) -> str:
    """What the numbers say for one architecture, quoting them."""
    def barriers(label):
        return [r.result["curves"][label]["barrier"]["accuracy"] for r in rs if label in r.result["curves"]]

    none, perm, full, fixed = barriers(NONE), barriers(PERM), barriers(FULL), barriers(REPAIR)
    if not (none and full) or len(none) != len(full):
        return ""
    text = (f"{arch}: the accuracy barrier is {_cell(none, 1)} points without alignment and {_cell(full, 1)} with the "
            "full group (activations)")
    text += f", {_cell(perm, 1)} with permutations only" if len(perm) == len(full) else ""
    text += f", {_cell(fixed, 1)} with the full group + REPAIR" if len(fixed) == len(full) else ""
    below = sum(f < n for f, n in zip(full, none))
    text += f"; the full group lowers it in {below} of {len(full)} pair(s)"
    if len(perm) == len(full):
        within = sum(f <= p + 1.0 for f, p in zip(full, perm))
        text += f", and is at most 1 point above permutations only in {within} of {len(full)}"
    if len(fixed) == len(full):
        kept = sum(r <= f for r, f in zip(fixed, full))
        text += f"; REPAIR leaves it no higher than the full group alone in {kept} of {len(full)}"
    return text + "."


def section(view, figdir: Path) -> Section:
    rows = view.rows(kind="alignment_barrier", status="done")
    if not rows:
        return Section(TITLE, "No alignment results in the database.")
    if figdir is not None:
        plot(rows, figdir / FIGURE)
        write_csv(rows, figdir / CSV)
    by_arch = _by_arch(rows)
    labels = _labels(rows)
    out = []
    for arch, rs in by_arch.items():
        for label in labels:
            got = [r.result["curves"][label] for r in rs if label in r.result["curves"]]
            secs = [r.result["align_seconds"].get(label, 0.0) for r in rs if label in r.result["curves"]]
            if not got:
                continue
            mid = _middle(rs[0].result["alphas"])
            out.append([arch, label, len(got), _cell([c["barrier"]["accuracy"] for c in got], 1),
                        _cell([c["barrier"]["loss"] for c in got], 3), _cell([c["accuracy"][mid] for c in got], 1),
                        f"{np.mean(secs):.1f}"])
    chance = at_chance(common.zoo_accuracies(view, rows))
    said = "\n\n".join(s for s in (_sentences(arch, rs) for arch, rs in by_arch.items()) if s)
    body = (f"**This section is an extension: the paper does not align or interpolate models.** Pairs of "
            "independently trained zoo models of one architecture are interpolated, "
            "(1 − alpha)·A + alpha·B, with B as trained and with B moved into A's basis by `intertwiners.align` "
            "through permutations only or through the full intertwiner group (permutations with the positive "
            "scalings of G_ReLU); batch-norm statistics are recomputed at every alpha on training images. With "
            "REPAIR (Jordan et al., ICLR 2023), every hidden channel of each interpolated model is also given the "
            "mean and standard deviation, on those images, that interpolate the two end models' (for these "
            "batch-norm networks: the batch norms' statistics recomputed and their affine parameters set to the "
            "interpolated statistics). The barrier is the largest drop of test accuracy (rise of loss) below "
            "(above) the straight line between the two ends.\n\n"
            f"![alignment barriers](figures/{FIGURE})\n\nCurves per pair and alpha: "
            f"`figures/{CSV}`. Mean ± 95% t-interval over pairs (the value itself for one pair).\n\n"
            + table(["architecture", "alignment", "pairs", "accuracy barrier (points)", "loss barrier",
                     "accuracy at alpha 0.5 (%)", "align time (s)"], out)
            + (f"\n\n{said}" if said else "")
            + (f"\n\nCaution: {chance}; the barriers of such models say little." if chance else ""))
    return Section(TITLE, body, datasets=common.datasets_of(rows))
