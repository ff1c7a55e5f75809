"""Figures: the stitching penalty per site (Fig. 1) and per LeakyReLU slope (appendix D.3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .._util import save_figure
from ..models import MYRTLE_PAPER_LAYERS
from .sweep import slope_of, summarize

KIND_NAMES = {"full": "full (affine)", "grelu": "G_ReLU (P·D)", "permutation": "permutation",
              "orthogonal": "orthogonal", "identity": "identity"}


def kind_name(kind: str) -> str:
    """Legend text: ``low_rank:4`` -> ``rank 4``, ``grelu`` -> ``G_ReLU (P·D)``."""
    if kind.startswith("low_rank:"):
        return f"rank {kind.split(':', 1)[1]}"
    return KIND_NAMES.get(kind, kind)


def _site_order(rows: Sequence[dict]) -> list[str]:
    first: dict[str, float] = {}
    for i, r in enumerate(rows):
        first.setdefault(r["site"], r.get("site_index") if r.get("site_index") is not None else i)
    return sorted(first, key=lambda s: first[s])


def plot_penalties(rows: Sequence[dict], path: str | Path | None = None, *, line: str = "kind",
                   title: str | None = None, confidence: float = 0.95, ax=None,
                   reference: dict[str, dict[str, float]] | None = None):
    """Fig. 1: mean stitching penalty per site with a ``confidence`` interval band (Student t over pairs,
    :func:`intertwiners.stats.mean_ci`; no band where one pair gives no interval), one line per value of
    ``line`` (default: the stitching kind). ``reference``: {kind: {site: penalty}} drawn dashed (the
    paper's numbers). Returns the matplotlib Figure; saves a PNG when ``path`` is given. ``rows`` are the
    dicts of :func:`stitch_sweep` (keys site, kind, penalty); ``intertwiners stitch`` and the report of
    ``intertwiners reproduce`` both draw Fig. 1 with this function.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = list(rows)
    if not rows:
        raise ValueError("no stitching rows to plot")
    sites = _site_order(rows)
    summary = summarize(rows, by=(line, "site"), confidence=confidence)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6.5, 0.55 * len(sites) + 4.0), 3.8))
    else:
        fig = ax.figure
    lines = list(dict.fromkeys(r[line] for r in rows))
    for value in lines:
        pts = sorted((sites.index(s["site"]), s) for s in summary if s[line] == value)
        xs = [i for i, _ in pts]
        label = kind_name(str(value)) if line == "kind" else str(value)
        drawn, = ax.plot(xs, [s["mean"] for _, s in pts], marker="o", label=label)
        ax.fill_between(xs, [s["ci_low"] for _, s in pts], [s["ci_high"] for _, s in pts], alpha=0.2)
        ref = (reference or {}).get(str(value), {})
        if ref:
            ax.plot([i for i, s in enumerate(sites) if s in ref], [ref[s] for s in sites if s in ref], ls="--",
                    color=drawn.get_color(), alpha=0.6, label=f"{label} (paper, CIFAR-10)")
    labels = [f"{s} ({MYRTLE_PAPER_LAYERS[s]})" if s in MYRTLE_PAPER_LAYERS else s for s in sites]
    ax.set_xticks(range(len(sites)), labels, rotation=45 if len(sites) > 5 else 0, ha="right" if len(sites) > 5
                  else "center")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("stitching site")
    ax.set_ylabel("stitching penalty (accuracy points)")
    n_pairs = len({(r.get("front"), r.get("back")) for r in rows})
    ax.set_title(title or f"Stitching penalties (eq. 4.3), {n_pairs} pair(s), {int(confidence * 100)}% CI")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, path)


def plot_slope_sweep(rows: Sequence[dict], path: str | Path | None = None, *, title: str | None = None,
                     confidence: float = 0.95):
    """Appendix D.3: mean penalty over sites and pairs against the LeakyReLU negative slope, one line per
    kind (rows need an ``activation`` such as ``leaky_relu:0.3``; ``relu`` counts as slope 0)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [{**r, "slope": slope_of(r.get("activation"))} for r in rows]
    if not rows or any(r["slope"] is None for r in rows):
        raise ValueError("slope plot needs rows whose activation is relu or leaky_relu:SLOPE")
    summary = summarize(rows, by=("kind", "slope"), confidence=confidence)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = sorted((s["slope"], s) for s in summary if s["kind"] == kind)
        xs = [x for x, _ in pts]
        ax.plot(xs, [s["mean"] for _, s in pts], marker="o", label=kind_name(kind))
        ax.fill_between(xs, [s["ci_low"] for _, s in pts], [s["ci_high"] for _, s in pts], alpha=0.2)
    ax.set_xlabel("LeakyReLU negative slope")
    ax.set_ylabel("mean stitching penalty (points)")
    ax.set_title(title or "Stitching penalty vs LeakyReLU slope (mean over sites)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, path)


def _finish(fig, path):
    """Lay out ``fig``, write it to ``path`` when one is given (the figure stays open), and return it."""
    if path is not None:
        save_figure(fig, path, dpi=150, close=False)
    else:
        fig.tight_layout()
    return fig
