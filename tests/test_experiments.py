"""The reproduction engine: job ids, the results store, scheduling, kill-and-resume, failures, report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intertwiners import cli
from intertwiners.experiments import Job, Output, ResultsStore, build_plan, job_id, register, run_jobs
from intertwiners.experiments import store as store_mod
from intertwiners.experiments.backends import InlineBackend, LocalBackend
from intertwiners.experiments.plan import CLUTTERED, PRESETS, draw_pairs, probe_plan
from intertwiners.experiments.runner import closure


def rows_of(out: Path) -> dict[str, tuple]:
    """``{id: (kind, status, result JSON)}`` straight from the database file."""
    with sqlite3.connect(out / "results.sqlite") as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT id, kind, status, result FROM jobs")}


# ----------------------------------------------------------------------------------------------------------
# ids and the store


def test_job_id_hashes_the_full_canonical_configuration(monkeypatch):
    a = job_id("probe", {"name": "x", "seed": 1, "nested": {"b": 2, "a": 1}})
    assert a == job_id("probe", {"nested": {"a": 1, "b": 2}, "seed": 1, "name": "x"})  # key order is irrelevant
    assert a != job_id("probe", {"name": "x", "seed": 2, "nested": {"b": 2, "a": 1}})
    assert a != job_id("zoo", {"name": "x", "seed": 1, "nested": {"b": 2, "a": 1}})
    assert a != job_id("probe", {"name": "x", "seed": 1, "nested": {"b": 2, "a": 1}}, {"dep": "0" * 20})
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", store_mod.SCHEMA_VERSION + 1)
    assert a != job_id("probe", {"name": "x", "seed": 1, "nested": {"b": 2, "a": 1}})  # the code version counts


def test_job_ids_follow_the_code_that_computes_them(monkeypatch):
    import dataclasses

    from intertwiners.experiments import jobs

    # the code version is derived from the job function: the library it reaches, not the engine or the report
    reached = jobs.code_sources(jobs.JOB_TYPES["zoo"].run)
    assert "intertwiners.training/" in reached and "intertwiners.models/" in reached
    assert "intertwiners.experiments.figures.zoo:run_zoo" in reached
    assert not any(k.startswith(("intertwiners.experiments.store", "intertwiners.experiments.report",
                                 "intertwiners.experiments.figures.zoo:section")) for k in reached)
    config = {"arch": "mlp", "dataset": "digits", "seeds": [0], "epochs": 1, "arch_kwargs": {}}
    before = Job("zoo", config).id
    monkeypatch.setitem(jobs.JOB_TYPES, "zoo", dataclasses.replace(jobs.JOB_TYPES["zoo"],
                                                                   sources=("intertwiners.experiments.store",)))
    assert Job("zoo", config).id != before  # other code, other job: nothing stale is reused


def test_job_ids_follow_dependencies():
    r1 = Job("probe", {"name": "r", "seed": 1})
    r2 = Job("probe", {"name": "r", "seed": 2})
    assert Job("probe", {"name": "c", "seed": 0}, {"a": r1}).id != Job("probe", {"name": "c", "seed": 0}, {"a": r2}).id
    assert Job("probe", {"name": "c", "seed": 0}, {"a": r1}).id == Job("probe", {"name": "c", "seed": 0}, {"a": r1}).id
    with pytest.raises(ValueError, match="unknown job kind"):
        Job("no_such_kind", {})


def test_store_refuses_nan_and_keeps_one_row_per_job(tmp_path):
    with ResultsStore(tmp_path) as store:
        common = dict(id="j1", kind="probe", label="j1", config={"a": 1}, deps={})
        with pytest.raises(ValueError, match="NaN"):
            store.record(status="done", result={"value": math.nan}, **common)
        assert store.count() == 0  # nothing half-written
        store.record(status="failed", error="boom", **common)
        store.record(status="done", result={"value": 1.0}, **common)
        assert store.count() == 1
        row = store.get("j1")
        assert (row.status, row.attempts, row.error, row.result) == ("done", 2, None, {"value": 1.0})


def test_closure_orders_dependencies_first_and_dedupes():
    plan = probe_plan(sleep_s=0)
    order = closure(reversed(plan.jobs))
    assert len(order) == len({j.id for j in plan.jobs}) == len(order)
    position = {j.id: i for i, j in enumerate(order)}
    for job in order:
        assert all(position[d.id] < position[job.id] for d in job.deps.values())


# ----------------------------------------------------------------------------------------------------------
# running, skipping, failing, retrying


def expected_values(plan) -> dict[str, float]:
    """The probe values computed independently of the runner: seed*1.5 + sum of dependencies' values."""
    values: dict[str, float] = {}
    for job in closure(plan.jobs):
        values[job.id] = job.config["seed"] * 1.5 + sum(values[d.id] for d in job.deps.values())
    return values


def test_inline_run_then_rerun_does_no_work(tmp_path):
    plan = probe_plan(sleep_s=0)
    first = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    assert (first.executed, first.succeeded, first.failed) == (len(plan.jobs), len(plan.jobs), 0)
    rows = rows_of(tmp_path)
    assert {i: json.loads(r[2])["value"] for i, r in rows.items()} == expected_values(plan)
    root = plan.jobs[0]
    with ResultsStore(tmp_path) as store:
        art = store.get(root.id).artifact
        finished_before = {r.id: r.finished_at for r in store.rows()}
    assert float((tmp_path / art / "probe.txt").read_text()) == expected_values(plan)[root.id]
    again = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    assert (again.executed, again.skipped) == (0, len(plan.jobs))
    with ResultsStore(tmp_path) as store:
        assert {r.id: r.finished_at for r in store.rows()} == finished_before
        assert store.runs()[-1]["executed"] == 0
    # a done job whose artifact disappeared is not done: it runs again (and only it)
    shutil.rmtree(tmp_path / art)
    third = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    assert third.executed == 1 and (tmp_path / art / "probe.txt").is_file()


def test_a_second_driver_on_the_same_folder_is_refused(tmp_path):
    from intertwiners.experiments.runner import driver_lock

    with driver_lock(tmp_path):
        with pytest.raises(ValueError, match="another driver"):
            run_jobs(probe_plan(sleep_s=0).jobs, tmp_path, InlineBackend(), progress=False)
    assert run_jobs(probe_plan(sleep_s=0).jobs, tmp_path, InlineBackend(), progress=False).failed == 0


_FLAKY = {"fail": True}


@register("test_flaky", "fails while the test says so")
def _flaky(config, inputs, context):
    if _FLAKY["fail"]:
        raise RuntimeError(f"injected failure of {config['name']}")
    return Output({"value": float(config["seed"]) + sum(d.result["value"] for d in inputs.values())})


def test_failing_job_is_recorded_blocks_dependants_and_is_retried(tmp_path):
    root = Job("probe", {"name": "root", "seed": 1})
    flaky = Job("test_flaky", {"name": "flaky", "seed": 2}, {"a": root}, label="flaky")
    sink = Job("probe", {"name": "sink", "seed": 3}, {"f": flaky}, label="sink")
    other = Job("probe", {"name": "other", "seed": 4}, {"a": root}, label="other")
    jobs = [sink, other]
    _FLAKY["fail"] = True
    s1 = run_jobs(jobs, tmp_path, InlineBackend(), progress=False)
    assert (s1.executed, s1.succeeded, s1.failed, s1.blocked) == (3, 2, 1, 1)
    with ResultsStore(tmp_path) as store:
        row = store.get(flaky.id)
        assert row.status == "failed" and row.attempts == 1 and "injected failure of flaky" in row.error
        assert store.get(sink.id) is None  # blocked jobs leave no row
        assert store.get(other.id).status == "done"
    _FLAKY["fail"] = False
    s2 = run_jobs(jobs, tmp_path, InlineBackend(), progress=False)
    assert (s2.executed, s2.succeeded, s2.failed, s2.skipped) == (2, 2, 0, 2)
    with ResultsStore(tmp_path) as store:
        row = store.get(flaky.id)
        assert (row.status, row.attempts, row.error, row.result) == ("done", 2, None, {"value": 2 + 1.5})
        assert store.get(sink.id).result["value"] == 3 * 1.5 + 3.5


def test_local_workers_record_failures_from_the_environment(tmp_path, monkeypatch):
    plan = probe_plan(sleep_s=0, n=4)
    monkeypatch.setenv("INTERTWINERS_PROBE_FAIL", "child0")
    backend = LocalBackend(workers=2, threads=1)
    try:
        s = run_jobs(plan.jobs, tmp_path, backend, progress=False)
    finally:
        backend.close()
    assert (s.failed, s.blocked, s.succeeded) == (1, 1, len(plan.jobs) - 2)
    with ResultsStore(tmp_path) as store:
        (failed,) = store.rows(status="failed")
        assert failed.label == "child0" and "failed on purpose" in failed.error and failed.worker


def test_a_worker_that_dies_is_a_failed_job_not_a_crashed_run(tmp_path, monkeypatch):
    plan = probe_plan(sleep_s=0, n=4)
    monkeypatch.setenv("INTERTWINERS_PROBE_CRASH", "child1")
    backend = LocalBackend(workers=1, threads=1)
    try:
        s = run_jobs(plan.jobs, tmp_path, backend, progress=False)
    finally:
        backend.close()
    assert (s.failed, s.blocked, s.succeeded) == (1, 1, len(plan.jobs) - 2)
    with ResultsStore(tmp_path) as store:
        (failed,) = store.rows(status="failed")
        assert failed.label == "child1" and "BrokenProcessPool" in failed.error


# ----------------------------------------------------------------------------------------------------------
# kill and resume


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "intertwiners.cli", *args]


def test_killed_run_resumes_to_the_same_rows(tmp_path):
    plan = probe_plan()
    reference = tmp_path / "reference"
    run_jobs(plan.jobs, reference, InlineBackend(), progress=False)
    ref_rows = rows_of(reference)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli("reproduce", "--scale", "test", "--out", str(out), "--workers", "1", "--quiet",
                                 "--no-report"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    n_rows = 0
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.sqlite").is_file():
            try:
                n_rows = len(rows_of(out))
            except sqlite3.OperationalError:
                n_rows = 0
            if n_rows >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker, mid-run
    proc.wait()
    partial = rows_of(out)
    assert 2 <= len(partial) < len(ref_rows)
    assert all(partial[i] == ref_rows[i] for i in partial)  # what was committed is complete and correct

    resumed = subprocess.run(_cli("reproduce", "--scale", "test", "--out", str(out), "--workers", "2", "--quiet"),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(partial)} already done" in resumed.stdout
    assert rows_of(out) == ref_rows  # same ids, statuses and values as the uninterrupted run; no duplicates
    assert not list(out.glob("artifacts/*/*.partial"))
    with ResultsStore(out) as store:
        assert all(r.attempts == 1 for r in store.rows())
        runs = store.runs()
    assert runs[0]["executed"] is None  # the killed run never finished
    assert runs[-1]["executed"] == len(ref_rows) - len(partial)

    again = run_jobs(plan.jobs, out, InlineBackend(), progress=False)
    assert again.executed == 0 and again.skipped == len(ref_rows)


# ----------------------------------------------------------------------------------------------------------
# plans


def test_plans_have_distinct_pairs_and_unique_ids():
    pairs = draw_pairs(16, 32, seed=0)
    assert len(pairs) == len(set(pairs)) == 32 and all(a < b for a, b in pairs)
    assert draw_pairs(3, 10, 0) == [(0, 1), (0, 2), (1, 2)]
    for scale in ("smoke", "small", "paper"):
        plan = build_plan(scale)
        ids = [j.id for j in closure(plan.jobs)]
        assert len(ids) == len(set(ids))
        zoo = [j for j in closure(plan.jobs) if j.kind == "zoo"]
        assert sum(len(j.config["seeds"]) for j in zoo if j.config["arch"] == "myrtle_cnn"
                   and j.config["arch_kwargs"].get("batch_norm", True)) == PRESETS[scale].zoo.mcnn_seeds
    paper = build_plan("paper")
    assert all(j.config["dataset"] == "cifar10" for j in closure(paper.jobs) if j.kind == "zoo")
    first_zoo = next(j for j in build_plan("smoke", dataset="cifar10").jobs if j.kind == "zoo")
    assert first_zoo.config["dataset"] == "cifar10"
    with pytest.raises(ValueError, match="unknown scale"):
        build_plan("huge")


def _of(job, experiments) -> bool:
    """Whether ``job`` is a job of Fig. 4 or D.3 named in ``experiments``."""
    return (job.kind == "rotation_penalty" and "fig4_rotation" in experiments) or (
        job.config.get("experiment") == "d3" and "d3_slopes" in experiments)


@pytest.mark.parametrize("moved", [CLUTTERED, {"fig4_rotation": "digits-cluttered", "d3_slopes": "digits-cluttered"}])
def test_moving_experiments_to_another_dataset_keeps_every_other_job(moved):
    assert CLUTTERED == {"fig4_rotation": "digits-cluttered"}   # D.3 stays: its ResNet20s do not learn it (docs)
    plain, plan = build_plan("small"), build_plan("small", datasets=moved)
    data = {j.id: j.config.get("dataset") for j in closure(plan.jobs)}
    chosen = [j for j in plan.jobs if _of(j, moved)]
    assert len({j.kind for j in chosen}) == len(moved) and plan.datasets == ["digits", "digits-cluttered"]
    for job in chosen:   # the jobs and the models they start from
        assert {data[job.id]} | {data[d.id] for d in closure([job]) if d.kind == "zoo"} == {"digits-cluttered"}
    # everything else is the main job's, the same ids: a run moved later resumes the main job's results
    readers = {j.id: [r for r in plain.jobs if j.id in {d.id for d in closure([r])}] for j in closure(plain.jobs)}
    stays = {j.id for j in closure(plain.jobs) if not all(_of(r, moved) for r in readers[j.id])}
    assert stays and stays == {j.id for j in closure(plan.jobs) if data[j.id] != "digits-cluttered"}
    with pytest.raises(ValueError, match="no dataset to choose"):
        build_plan("small", datasets={"nothing": "digits"})
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_plan("small", datasets={"fig4_rotation": "mnist"})


def test_only_runs_the_chosen_experiments_and_what_they_need():
    plan = build_plan("small", only=["fig4_rotation"])
    assert {j.kind for j in plan.jobs} == {"rotation_penalty"}
    assert {j.kind for j in closure(plan.jobs)} == {"rotation_penalty", "zoo"}
    both = build_plan("small", datasets=CLUTTERED, only=["fig4_rotation", "d3_slopes"])
    assert {j.id for j in both.jobs} == {j.id for j in build_plan("small", datasets=CLUTTERED).jobs
                                         if _of(j, ("fig4_rotation", "d3_slopes"))}
    with pytest.raises(ValueError, match="unknown experiments \\['fig9'\\]"):
        build_plan("small", only=["fig9"])
    with pytest.raises(ValueError, match="no experiment chosen"):
        build_plan("small", only=[])


def test_reproduce_list_prints_the_plan_and_cifar_needs_a_folder(capsys, tmp_path):
    assert cli.main(["reproduce", "--scale", "smoke", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "zoo myrtle_cnn digits seeds 0,1,2" in printed
    assert cli.main(["reproduce", "--scale", "paper", "--out", str(tmp_path / "p")]) == 2
    assert "--data-root" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert cli.main(["reproduce", "--scale", "huge", "--out", str(tmp_path / "h")]) == 2
    assert cli.main(["reproduce", "--scale", "smoke", "--cluttered", "--only", "fig4_rotation", "--list"]) == 0
    printed = capsys.readouterr().out
    assert "zoo myrtle_cnn-batch_norm=False digits-cluttered seeds 0" in printed and " digits seeds" not in printed
    assert cli.main(["reproduce", "--only", "fig4,zoo", "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only: unknown 'fig4'" in err[0]


def test_zoo_job_trains_and_keeps_a_loadable_model(tmp_path, digits):
    from intertwiners.experiments.figures.common import model_from_files
    from intertwiners.training import accuracy

    job = Job("zoo", {"arch": "mlp", "dataset": "digits", "seeds": [0, 1], "epochs": 1,
                      "arch_kwargs": {"hidden": [16]}}, label="tiny mlps")
    s = run_jobs([job], tmp_path, InlineBackend(), progress=False)
    assert s.succeeded == 1
    with ResultsStore(tmp_path) as store:
        row = store.get(job.id)
    folder = tmp_path / row.artifact
    for seed in (0, 1):  # each model of the group is kept on its own and evaluates to its own metrics
        files = {f.name.split(".", 1)[1]: f.read_bytes() for f in folder.iterdir() if f.name.startswith(f"seed{seed}.")}
        part = row.result["parts"][f"seed{seed}"]
        assert accuracy(model_from_files(files), digits[1]) == pytest.approx(part["test_accuracy"])
        assert "wall_time_s" not in part  # results stay deterministic; timing lives in the row


def test_an_experiment_whose_module_cannot_be_imported_fails_with_its_name(tmp_path, monkeypatch):
    """A module that does not exist makes its job type unavailable (a reason); one that exists but raises
    on import is a defect: ImportError naming the job type and the module, never a silent skip."""
    from intertwiners.experiments.jobs import JobType

    (tmp_path / "broken_job_module.py").write_text("raise RuntimeError('half-edited')\n")
    (tmp_path / "needs_absent_dep.py").write_text("import absent_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def job(needs):
        return JobType("demo", lambda *a: {}, "demo", needs=needs)

    assert job(("no_such_module_xyz",)).missing() == "module no_such_module_xyz is not available"
    assert job(("json:no_such_function",)).missing() == "json.no_such_function is not available"
    assert job(("json:dumps",)).missing() is None
    for mod, why in (("broken_job_module", "half-edited"), ("needs_absent_dep", "absent_package_xyz")):
        with pytest.raises(ImportError, match=f"job type 'demo': module {mod} cannot be imported.*{why}"):
            job((mod,)).missing()


def test_jobs_that_more_jobs_wait_on_start_first_and_dependencies_stay_first():
    from intertwiners.experiments.runner import by_waiting_work

    def probe(name, **deps):
        return Job("probe", {"name": name, "seed": 0, "sleep_s": 0.0}, deps, label=name)

    lone = probe("lone long training")
    feed = probe("zoo")
    mid = probe("stitch", model=feed)
    last = probe("report input", a=mid, b=feed)
    other = probe("other", model=feed)
    order = closure([lone, last, other])
    assert [j.label for j in order][0] == "lone long training"
    ranked = [j.label for j in by_waiting_work(order)]
    assert ranked[0] == "zoo" and ranked.index("stitch") < ranked.index("report input")
    position = {j.id: i for i, j in enumerate(by_waiting_work(order))}
    assert all(position[d.id] < position[j.id] for j in order for d in j.deps.values())
    # the real plan: a zoo training before any Fig. 3 model
    ranked = [j.kind for j in by_waiting_work(closure(build_plan("smoke").jobs))]
    assert ranked.index("zoo") < ranked.index("dissection_model")


def test_time_left_counts_each_job_at_the_mean_of_its_kind():
    """What is left = (waiting jobs at their kind's mean time + what running jobs have left of it) / slots; jobs
    of a kind with no finished job are counted apart, never guessed from other kinds' times."""
    from intertwiners.experiments.runner import time_left

    finished = {"zoo": [60.0, 80.0], "stitch": [10.0, 20.0, 30.0]}
    assert time_left(["stitch"], [], {}, 2) == (0.0, 1)
    assert time_left([], [], finished, 2) == (0.0, 0)
    # 2 stitches (20 each) + a zoo job 50 s in (70 - 50 = 20 left); the cka job is not timed yet
    seconds, untimed = time_left(["stitch", "stitch", "cka"], [("zoo", 50.0)], finished, 2)
    assert seconds == pytest.approx((20 + 20 + 20) / 2) and untimed == 1
    # a running job past its kind's mean has nothing left, never a negative time
    assert time_left([], [("stitch", 100.0)], finished, 1) == (0.0, 0)
    assert time_left(["zoo"], [("cka", 3.0)], finished, 0) == (70.0, 1)
    from intertwiners.experiments.runner import _left_text

    assert _left_text(0.0, 74) == ", 74 jobs of kinds not timed yet"
    assert _left_text(300.0, 1) == ", about 5 min left + 1 job of kinds not timed yet"
    assert _left_text(42.0, 0) == ", about 42 s left"


def test_a_worker_caps_every_thread_pool():
    """torch, numpy's BLAS/OpenMP pools and numba's parallel loops all run on the worker's share of the
    cores (two workers with two threads each ran jobs up to 4x slower on 2 cores)."""
    code = ("import numba, torch; from threadpoolctl import threadpool_info; "
            "from intertwiners.experiments.jobs import init_worker; init_worker(1); "
            "print(torch.get_num_threads(), numba.get_num_threads(), "
            "max(p['num_threads'] for p in threadpool_info()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"})
    assert out.stdout.split() == ["1", "1", "1"]
