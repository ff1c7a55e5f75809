"""The report's extension section: interpolation barriers of zoo pairs before and after alignment.

On a tiny plan (the zoo's tiny models, one pair per architecture) the alignment jobs run, resume, and the
section draws its figure, its CSV and sentences that quote its own table. Aligning B changes its weights,
never its function: every variant ends (alpha = 1) at B's loss and accuracy, and starts (alpha = 0) at A's.
"""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from intertwiners.alignment.interpolation import barrier
from intertwiners.experiments import ResultsStore, Scale, build_plan, run_jobs
from intertwiners.experiments.backends import InlineBackend
from intertwiners.experiments.figures import alignment_barriers as ab
from intertwiners.experiments.report import write_report

SCALE = Scale.preset(
    "tiny", base="smoke",
    zoo={"mcnn_width": 4, "mcnn_seeds": 2, "mcnn_epochs": 1, "resnet_seeds": 2, "resnet_epochs": 1,
         "resnet_widths": (4, 4, 8)},
    alignment_barriers={"alphas": (0.0, 0.5, 1.0), "samples": 64,
                        "variants": ("none", "permutation (activations)", "full group (activations)",
                                     "full group + REPAIR (activations)", "full group (weights)")})
ALIGN = SCALE.alignment_barriers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alignment")
    jobs = [j for j in build_plan(SCALE).jobs if j.kind == "alignment_barrier"]
    summary = run_jobs(jobs, out, InlineBackend(), progress=False)
    with ResultsStore(out) as store:
        errors = {r.label: (r.error or "").strip().splitlines()[-1:] for r in store.rows(status="failed")}
        rows = store.rows(kind="alignment_barrier", status="done")
    assert summary.failed == 0, errors
    return out, jobs, rows


def test_one_pair_per_architecture_of_models_the_zoo_trains_already():
    jobs = [j for j in build_plan(SCALE).jobs if j.kind == "alignment_barrier"]
    zoo = {j.id for js in ab.zoos(SCALE).values() for j in js}
    assert len(jobs) == 2 and all({d.id for d in j.deps.values()} <= zoo for j in jobs)
    assert {j.label.split()[1] for j in jobs} == {"myrtle_cnn", "resnet20"}


def test_barriers_follow_the_curves_and_alignment_keeps_b_s_function(run):
    _, _, rows = run
    assert {r.result["arch"] for r in rows} == {"myrtle_cnn", "resnet20"}
    for r in rows:
        alphas = np.array(r.result["alphas"])
        curves = r.result["curves"]
        assert set(curves) == set(ALIGN.variants)
        for label, c in curves.items():
            assert c["barrier"]["accuracy"] == pytest.approx(barrier(alphas, np.array(c["accuracy"]), False))
            assert c["barrier"]["loss"] == pytest.approx(barrier(alphas, np.array(c["loss"]), True))
            # the ends: A itself, and B moved into A's basis (the same function as B, BN recomputed alike)
            assert c["loss"][0] == pytest.approx(curves["none"]["loss"][0], rel=1e-6), label
            assert c["loss"][-1] == pytest.approx(curves["none"]["loss"][-1], rel=1e-3), label
            assert abs(c["accuracy"][-1] - curves["none"]["accuracy"][-1]) <= 0.6, label
        assert curves["full group (activations)"]["loss"][1] != curves["none"]["loss"][1]  # B did move


def test_jobs_resume_without_work(run):
    out, jobs, _ = run
    again = run_jobs(jobs, out, InlineBackend(), progress=False)
    assert again.executed == 0 and again.skipped == len(again_jobs(jobs))


def again_jobs(jobs):
    from intertwiners.experiments.runner import closure

    return closure(jobs)


def test_section_is_marked_as_an_extension_and_quotes_its_numbers(run):
    out, _, rows = run
    text = write_report(out).read_text()
    part = text[text.index(f"## {ab.TITLE}"):]
    part = part[:part.index("\n## ", 3)] if "\n## " in part[3:] else part
    assert "Extension (beyond the paper)" in ab.TITLE and "paper does not align" in part
    assert (out / "figures" / ab.FIGURE).stat().st_size > 1000 and f"figures/{ab.FIGURE}" in part
    with open(out / "figures" / ab.CSV) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows) * len(ALIGN.variants) * len(ALIGN.alphas)
    for arch in ("myrtle_cnn", "resnet20"):
        r = next(r for r in rows if r.result["arch"] == arch)
        none = r.result["curves"]["none"]["barrier"]["accuracy"]
        full = r.result["curves"]["full group (activations)"]["barrier"]["accuracy"]
        fixed = r.result["curves"][ab.REPAIR]["barrier"]["accuracy"]
        sentence = re.search(rf"^{arch}: the accuracy barrier is (\S+) points without alignment and (\S+) with "
                             r"the full group .*?, (\S+) with the full group \+ REPAIR; .*? lowers it in (\d) of 1 "
                             r"pair.*?REPAIR leaves it no higher than the full group alone in (\d) of 1", part,
                             flags=re.M)
        assert sentence, part
        assert float(sentence.group(1)) == pytest.approx(none, abs=0.051)
        assert float(sentence.group(2)) == pytest.approx(full, abs=0.051)
        assert float(sentence.group(3)) == pytest.approx(fixed, abs=0.051)
        assert int(sentence.group(4)) == int(full < none)
        assert int(sentence.group(5)) == int(fixed <= full)
        assert f"| {arch} | none | 1 | {none:.1f} |" in part  # the table holds the same number
