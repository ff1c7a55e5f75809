"""Appendix D.3 — ResNet20 with LeakyReLU: the stitching penalty against the negative slope.

Plan, report section and figure; the jobs are stitching jobs (:mod:`.fig1_stitching`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...stats import decide, evidence
from ..jobs import Job
from .common import Section, at_chance, datasets_of, fmt, pyplot, table
from .fig1_stitching import stitch_job, stitch_job_rows, stitch_rows
from .zoo import activation_of_slope, resnet_zoo

KINDS = ("stitch",)
FIGURE = "d3_leaky_relu.png"
# ResNet20 sites at the residual outputs (relu2 after each add): stitchable, unlike those inside blocks
RESNET_D3_SITES = ("layer1.1.relu2", "layer2.1.relu2", "layer3.1.relu2")


@dataclass(frozen=True)
class Settings:
    """Appendix D.3: ResNet20s with LeakyReLU ``slopes`` (the zoo's seeds and epochs, trained on ``dataset``),
    ``pairs`` per slope stitched at ``sites`` with ``kinds``; stitching ``epochs``/``patience``/``settings``
    as in Fig. 1."""

    dataset: str = "digits"
    slopes: tuple[float, ...] = (0.0, 1.0)
    pairs: int = 1
    sites: tuple[str, ...] = RESNET_D3_SITES[:2]
    kinds: tuple[str, ...] = ("full", "grelu")
    epochs: int = 2
    patience: int | None = 1
    settings: str = "default"


PRESETS = {
    "smoke": Settings(epochs=1),   # a pipeline check, as Fig. 1's
    "small": Settings(slopes=(0.0, 0.1, 0.5, 0.9, 1.0), pairs=2, sites=RESNET_D3_SITES, epochs=2),
    "paper": Settings(dataset="cifar10", slopes=(0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), pairs=4,
                      sites=RESNET_D3_SITES, epochs=20, settings="authors", patience=5),
}


def jobs(scale) -> list[Job]:
    """Per slope: a ResNet20 zoo, pairs x residual-output sites (all kinds in one job)."""
    from ..plan import draw_pairs

    s = scale.d3_slopes
    out = []
    for slope in s.slopes:
        resnets = resnet_zoo(scale, slope, s.dataset)
        out += [stitch_job("d3", resnets[a], resnets[b], site, s.kinds, s.dataset, s.epochs, s.patience, s.settings,
                           extra={"slope": float(slope)})
                for a, b in draw_pairs(len(resnets), s.pairs, scale.seed + 3) for site in s.sites]
    return out


def pair_means(rows, kind: str, slope: float) -> list[float]:
    """Per model pair: the penalty of ``kind`` at ``slope``, averaged over sites (a pair is the unit)."""
    pairs: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kind"] == kind and float(r["slope"]) == slope:
            pairs.setdefault((r["front"], r["back"]), []).append(r["penalty"])
    return [float(np.mean(v)) for _, v in sorted(pairs.items())]


def section(view, figdir: Path) -> Section:
    from ...stitching.plot import plot_slope_sweep
    from ...stitching.sweep import summarize

    title = "Appendix D.3 — ResNet20 with LeakyReLU: stitching penalty against the negative slope"
    rows = [{**r, "activation": activation_of_slope(float(r["slope"]))} for r in stitch_rows(view, "d3")]
    if not rows:
        return Section(title, "No LeakyReLU-sweep results in the database.")
    slopes = sorted({float(r["slope"]) for r in rows})
    kinds = sorted({r["kind"] for r in rows})
    if figdir is not None:
        pyplot().close(plot_slope_sweep(rows, figdir / FIGURE, title="ResNet20, stitching penalty against the slope"))
    stats = {(s["kind"], s["activation"]): s for s in summarize(rows, by=("kind", "activation"))}
    out = []
    for k in kinds:
        cells = []
        for sl in slopes:
            s = stats.get((k, activation_of_slope(sl)))
            cells.append("–" if s is None else fmt_summary(s))
        out.append([k] + cells)
    found = []
    if "grelu" in kinds and 1.0 in slopes and any(s < 1 for s in slopes):
        at_one = pair_means(rows, "grelu", 1.0)
        items = [evidence(f"slope 1 − slope {s:g}", at_one, pair_means(rows, "grelu", s), paired=False)
                 for s in slopes if s < 1]
        chance = at_chance([a for r in rows for a in r["accuracies"]])
        found.append(decide("G_ReLU stitching penalty at slope 1 above its value at every slope below 1", items,
                            "difference of penalties in points (per model pair, mean over sites), Welch 95% "
                            "t-interval", precondition=chance))
    body = (f"![D.3](figures/{FIGURE})\n\nThe paper finds similar G_ReLU stitching penalties for every slope below 1 "
            "and a change at slope 1, where the activation is linear and its intertwiner group is all of GL_n "
            "rather than G_ReLU (Table 1). Mean ± 95% t-interval over sites and pairs (as in the figure):\n\n"
            + table(["kind"] + [f"slope {s:g}" for s in slopes], out))
    return Section(title, body, found, datasets_of(stitch_job_rows(view, "d3")))


def fmt_summary(s: dict) -> str:
    """A row of :func:`intertwiners.stitching.sweep.summarize` as ``mean ± half``."""
    from ...stats import Interval

    return fmt(Interval.from_bounds(s["mean"], s["ci_low"], s["ci_high"], s["n"]), 1)
