"""Every experiment job type runs end to end on a tiny plan (inline), and the report draws every figure.

This is the contract between the engine and the experiment modules: when one of them changes its API,
this test names the job that broke.
"""

from __future__ import annotations

import pytest

from intertwiners.experiments import ResultsStore, Scale, build_plan, run_jobs
from intertwiners.experiments.backends import InlineBackend
from intertwiners.experiments.report import write_report
from intertwiners.experiments.runner import closure

TINY = Scale.preset(
    "tiny", base="smoke",
    zoo={"mcnn_width": 4, "mcnn_seeds": 2, "mcnn_epochs": 1, "resnet_seeds": 2, "resnet_epochs": 1,
         "resnet_widths": (4, 4, 8)},
    fig1_stitching={"sites": ("relu2",), "kinds": ("full", "grelu"), "epochs": 1},
    table2_procrustes={"max_samples": 64, "permutations": 20}, cka={"max_samples": 64, "permutations": 20},
    fig4_rotation={"width": 4, "layers": ("conv2",), "epochs": 1, "base_epochs": 1},
    d3_slopes={"slopes": (0.0,), "sites": ("layer1.1.relu2",), "kinds": ("grelu",), "epochs": 1},
    fig3_dissection={"models": ("resnet",), "alphas": (0.0, 1.0), "images": 40, "steps": 4})

KINDS = {"zoo", "stitch", "rotation_penalty", "procrustes", "cka", "dissection_model", "dissection",
         "alignment_barrier"}


def test_every_experiment_runs_on_a_tiny_plan(tmp_path):
    plan = build_plan(TINY)
    assert plan.missing == {}, f"experiments left out of the plan: {plan.missing}"
    jobs = closure(plan.jobs)
    assert {j.kind for j in jobs} == KINDS
    summary = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    with ResultsStore(tmp_path) as store:
        errors = {r.label: r.error.strip().splitlines()[-1] for r in store.rows(status="failed")}
        assert summary.failed == 0, errors
        rows = {r.kind: r for r in store.rows()}
        store.set_meta("plan", {"name": "tiny", "scale": TINY.as_dict(), "missing": {}, "jobs": len(jobs)})
    assert summary.succeeded == len(jobs)
    stitched = rows["stitch"].result["kinds"]          # one stitch job holds every kind of its pair and site
    assert set(stitched) == {"full", "grelu"}
    for stitch in stitched.values():
        assert stitch["penalty"] == pytest.approx((stitch["front_accuracy"] + stitch["back_accuracy"]) / 2
                                                  - stitch["accuracy"])
    cka = rows["cka"].result
    assert len(cka["grelu"]) == len(cka["sites"]) == len(cka["linear"][0])
    assert all(0 <= v <= 1 + 1e-9 for row in cka["grelu"] + cka["linear"] for v in row)
    assert len(rows["procrustes"].result["grelu"]) == 4
    assert rows["dissection"].result["rows"]
    assert all("penalty" in run for run in rows["rotation_penalty"].result["runs"])
    text = write_report(tmp_path).read_text()
    for name in ("fig1_stitching", "fig4_rotation_penalty", "d3_leaky_relu", "table2_procrustes", "fig5_cka",
                 "fig2_cka", "fig3_dissection", "ext_alignment_barriers"):
        assert (tmp_path / "figures" / f"{name}.png").is_file() and f"figures/{name}.png" in text, name
    assert "not run" not in text
