"""Figures (PNG) and ``DIR/report.md``, rendered from ``DIR/results.sqlite`` alone.

The sections come from the experiment modules (:data:`intertwiners.experiments.figures.SECTIONS`). Each
puts our numbers beside the paper's (from the authors' CIFAR-10 runs, see ``REFERENCE.md``) and ends
with one sentence per claim, answered **yes**, **no**, **inconclusive** or **not testable** with the
numbers and the test that decide it (:mod:`intertwiners.stats`); the report opens with those answers
grouped. Nothing but the database is read: the trained models and other artifacts may be gone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..stats import summary
from .figures import SECTIONS
from .figures.common import pyplot, table
from .store import JobRow, ResultsStore

FIGURES = "figures"


def section_probe(store: PlanView, figdir: Path) -> str:
    rows = store.rows(kind="probe", status="done")
    if not rows:
        return ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(len(rows)), [r.result["value"] for r in rows])
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(figdir / "probe.png", dpi=80)
    plt.close(fig)
    return ("## Probe jobs (machinery test)\n\n![probe](figures/probe.png)\n\n"
            + table(["job", "value"], [[r.label, f"{r.result['value']:g}"] for r in rows]) + "\n")


def section_runs(store: PlanView) -> str:
    rows = store.rows()
    n_done, n_failed = sum(r.status == "done" for r in rows), sum(r.status == "failed" for r in rows)
    compute = sum(r.wall_s or 0 for r in rows)
    lines = ["## Runs and jobs\n", f"{n_done} jobs done, {n_failed} failed; {compute:.0f} s of job compute time "
             "in total (summed over workers).\n"]
    by_kind: dict[str, list[JobRow]] = defaultdict(list)
    for r in rows:
        by_kind[r.kind].append(r)
    lines.append(table(["job kind", "done", "failed", "compute (s)", "mean per job (s)"], [
        [k, sum(r.status == "done" for r in rs), sum(r.status == "failed" for r in rs),
         f"{sum(r.wall_s or 0 for r in rs):.1f}", f"{np.mean([r.wall_s or 0 for r in rs]):.2f}"]
        for k, rs in sorted(by_kind.items())]))
    runs = store.runs()
    if runs:
        lines.append("\n\nRuns (each `reproduce` invocation):\n")
        lines.append(table(["run", "backend", "planned", "already done", "executed", "failed", "wall (s)"], [
            [r["run_id"], r["backend"], r["planned"], r["skipped"], r["executed"] if r["executed"] is not None
             else "interrupted", r["failed"] if r["failed"] is not None else "–",
             f"{r['finished_at'] - r['started_at']:.0f}" if r["finished_at"] else "–"] for r in runs]))
    if store.hidden:
        lines.append(f"\n\n{store.hidden} rows of earlier plans (other scales or settings) are kept in the "
                     "database and not shown.")
    failed = store.rows(status="failed")
    if failed:
        lines.append("\n\nFailed jobs (retried by the next run):\n")
        for r in failed:
            last = (r.error or "").strip().splitlines()[-1:] or ["unknown error"]
            lines.append(f"- `{r.label}` (attempts: {r.attempts}): {last[0]}")
    return "\n".join(lines) + "\n"


class PlanView:
    """The store's rows restricted to the jobs of the last plan run in it (all rows when it is unknown)."""

    def __init__(self, store: ResultsStore):
        self.store = store
        ids = store.get_meta("plan_ids")
        self.ids = None if ids is None else set(ids)
        self.hidden = 0 if self.ids is None else sum(r.id not in self.ids for r in store.rows())

    def rows(self, kind: str | None = None, status: str | None = None) -> list[JobRow]:
        rows = self.store.rows(kind=kind, status=status)
        return rows if self.ids is None else [r for r in rows if r.id in self.ids]

    def runs(self) -> list[dict]:
        return self.store.runs()


def write_report(out: str | Path) -> Path:
    """Render the figures into ``out/figures/`` and write ``out/report.md`` from ``out/results.sqlite``."""
    out = Path(out)
    with ResultsStore(out, readonly=True) as raw:
        store = PlanView(raw)
        figdir = out / FIGURES
        figdir.mkdir(parents=True, exist_ok=True)
        plan = raw.get_meta("plan", {}) or {}
        sections = [make(store, figdir) for make in SECTIONS]
        parts = _header(plan)
        claims = _claims_named(sections)
        if claims:
            parts.append("## Summary: the paper's claims on this data\n\n"
                         "Each claim is answered **yes** (every 95% interval lies on the claimed side), **no** "
                         "(an interval lies wholly on the other side), **inconclusive** (the data cannot decide "
                         "at this sample size) or **not testable** (a precondition fails, e.g. a model at "
                         "chance); the sentence under each section names the test and the numbers.\n\n"
                         + summary(claims) + "\n")
        parts += [sec.text() for sec in sections]
        parts.append(section_probe(store, figdir))
        parts.append(section_runs(store))
    path = out / "report.md"
    tmp = path.with_suffix(".md.partial")
    tmp.write_text("\n".join(p for p in parts if p))
    tmp.replace(path)
    return path


def _claims_named(sections) -> list:
    """Every section's claims; where the sections ran on different datasets, each claim names its own."""
    mixed = len({d for sec in sections for d in sec.datasets}) > 1
    return [replace(c, text=f"{c.text} (on {', '.join(f'`{d}`' for d in sec.datasets)})")
            if mixed and sec.datasets else c for sec in sections for c in sec.claims]


def _header(plan: dict) -> list[str]:
    parts = ["# Reproduction report\n",
             "Godfrey et al., *On the Symmetries of Deep Learning Models and their Internal Representations* "
             "(NeurIPS 2022). Rendered from `results.sqlite` alone by `intertwiners report`. The paper's "
             "numbers are from CIFAR-10 at full scale; at smaller scales or on `digits` only the "
             "qualitative claims are comparable.\n"]
    if plan:
        datasets = ", ".join(f"`{d}`" for d in plan.get("datasets", [])) or "–"
        parts.append(f"Plan: scale `{plan.get('name')}`, datasets {datasets} (each section names its own), "
                     f"{plan.get('jobs', '–')} jobs.\n")
        if plan.get("missing"):
            parts.append("Experiments **not run** because their code is missing here:\n\n"
                         + "\n".join(f"- {k}: {v}" for k, v in plan["missing"].items()) + "\n")
    return parts
