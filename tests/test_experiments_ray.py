"""The Ray backend against a local Ray instance started by the test (skipped only without Ray)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from intertwiners.experiments import ResultsStore, run_jobs
from intertwiners.experiments.backends import InlineBackend, RayBackend
from intertwiners.experiments.plan import probe_plan

ray = pytest.importorskip("ray")


def values(out) -> dict[str, float]:
    with sqlite3.connect(out / "results.sqlite") as conn:
        return {i: json.loads(r)["value"] for i, r in conn.execute("SELECT id, result FROM jobs WHERE status='done'")}


def test_ray_backend_runs_a_plan_like_the_inline_one(tmp_path, monkeypatch):
    plan = probe_plan(sleep_s=0.05)
    run_jobs(plan.jobs, tmp_path / "inline", InlineBackend(), progress=False)
    monkeypatch.setenv("INTERTWINERS_PROBE_FAIL", "child2")  # Ray workers inherit the driver's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = tmp_path / "ray"
    try:
        backend = RayBackend()  # uses the running instance
        assert backend.slots == 2
        first = run_jobs(plan.jobs, out, backend, progress=False)
    finally:
        ray.shutdown()
    assert (first.executed, first.failed, first.blocked) == (len(plan.jobs) - 1, 1, 1)
    with ResultsStore(out) as store:
        (failed,) = store.rows(status="failed")
        assert failed.label == "child2" and "failed on purpose" in failed.error
        assert store.runs()[-1]["backend"] == "ray"
        workers = {r.worker for r in store.rows()}
    assert len(workers) >= 1 and all(":" in w for w in workers)  # where each job ran is recorded
    monkeypatch.delenv("INTERTWINERS_PROBE_FAIL")
    second = run_jobs(plan.jobs, out, InlineBackend(), progress=False)  # the retry, on another backend
    assert (second.executed, second.failed) == (2, 0)
    assert values(out) == values(tmp_path / "inline")
