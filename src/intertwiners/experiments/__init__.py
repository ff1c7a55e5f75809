"""The whole paper as resumable jobs: ``intertwiners reproduce`` and ``intertwiners report``.

* :mod:`.store` — the SQLite results store ``DIR/results.sqlite`` (job id = hash of the configuration).
* :mod:`.jobs` — job types and the pure functions that run them.
* :mod:`.plan` — which jobs make up the ``smoke``, ``small`` and ``paper`` scales.
* :mod:`.backends` — ``local`` worker processes or a ``ray`` cluster.
* :mod:`.runner` — dependency-ordered scheduling, skipping done jobs, recording failures.
* :mod:`.report` — figures and ``DIR/report.md``, from the database alone.
"""

from .jobs import JOB_TYPES, Dependency, Job, Output, register
from .plan import PRESETS, SCALES, Plan, Scale, build_plan
from .runner import RunSummary, run_jobs
from .store import ResultsStore, job_id

__all__ = ["JOB_TYPES", "PRESETS", "SCALES", "Dependency", "Job", "Output", "Plan", "ResultsStore", "RunSummary",
           "Scale", "build_plan", "job_id", "register", "reproduce", "run_jobs"]


def reproduce(out, scale="smoke", *, dataset=None, data_root=None, backend="local", workers=None,
              ray_address=None, device="auto", progress=True, report=True, gpus_per_job: float = 0,
              datasets=None, only=None) -> RunSummary:
    """Run (or resume) the plan of ``scale`` into ``out`` and write the report; returns the run summary.

    ``datasets``: experiments moved to another dataset (e.g. :data:`.plan.CLUTTERED`); ``only``: run just these
    experiments (and the jobs they depend on); see :func:`.plan.build_plan`."""
    from pathlib import Path

    from .._util import resolve_device
    from .backends import make_backend
    from .runner import closure

    plan = build_plan(scale, dataset, datasets=datasets, only=only)
    if "cifar10" in plan.datasets and data_root is None:
        raise ValueError("this plan trains on CIFAR-10: pass --data-root DIR (the folder with data_batch_1..5 and "
                         "test_batch; nothing is downloaded), or use --dataset digits")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    resolve_device(device)                       # a device that does not exist fails before anything runs
    ids = [j.id for j in closure(plan.jobs)]
    # the plan is recorded by run_jobs once it holds the driver lock: a refused second driver changes nothing
    meta = {"plan": {"name": plan.name, **plan.info, "missing": plan.missing, "jobs": len(ids)}, "plan_ids": ids}
    with ResultsStore(out):                      # a damaged database fails here, before workers start
        pass
    extra = {"gpus_per_job": gpus_per_job} if backend == "ray" else {}
    runner = make_backend(backend, workers=workers, ray_address=ray_address, **extra)
    try:
        summary = run_jobs(plan.jobs, out, runner, context={"data_root": None if data_root is None
                                                            else str(Path(data_root).resolve()),
                                                            "device": device},
                           progress=progress, plan_info={"name": plan.name, "backend": backend}, meta=meta)
    except BaseException:
        runner.close(abort=True)        # e.g. a full disk or Ctrl-C: report it now, not after the jobs in flight
        raise
    runner.close()
    if report:
        from .report import write_report
        write_report(out)
    return summary
