"""The driver: schedules jobs in dependency order on a backend and records every outcome in the store.

* Jobs already ``done`` in ``DIR/results.sqlite`` are skipped, so a finished run started again does no work
  -- but only when their artifact is complete: every file of the manifest recorded with the row is present
  with its recorded size. A job whose artifact file was deleted or truncated is run again.
* A job that fails is recorded with its error text; the next run tries it again. Jobs that depend on a
  failed job are *blocked* for this run (nothing is recorded for them).
* Artifacts (e.g. trained models) are written under a temporary name and renamed into
  ``DIR/artifacts/<kind>/`` before the job's row is committed, in one transaction. A run killed at any
  moment therefore leaves only complete rows whose artifacts exist; a half-written artifact folder is
  never taken for a finished one.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import Dependency, Job, Part
from .store import ResultsStore

ARTIFACTS = "artifacts"


@dataclass
class RunSummary:
    """Counts of one run: jobs planned, skipped (already done), executed, succeeded, failed, blocked."""

    planned: int = 0
    skipped: int = 0
    executed: int = 0
    succeeded: int = 0
    failed: int = 0
    blocked: int = 0
    wall_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (label, last line of the error)

    def line(self) -> str:
        return (f"{self.planned} jobs planned: {self.skipped} already done, {self.executed} executed "
                f"({self.succeeded} succeeded, {self.failed} failed), {self.blocked} blocked by failures; "
                f"{self.wall_s:.1f} s")


def closure(jobs: Iterable[Job]) -> list[Job]:
    """All ``jobs`` and their dependencies, each once, in a topological order (dependencies first).

    Ties keep the order in which jobs were given. Raises ValueError on a dependency cycle or on two
    different jobs objects claiming the same id with different kinds.
    """
    order: list[Job] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    seen: dict[str, Job] = {}

    def visit(job: Job, path: tuple[str, ...]) -> None:
        if job.id in seen and seen[job.id].kind != job.kind:  # pragma: no cover - a hash collision
            raise ValueError(f"two jobs share id {job.id}")
        s = state.get(job.id)
        if s == 2:
            return
        if s == 1:
            raise ValueError(f"dependency cycle through {' -> '.join((*path, job.label))}")
        state[job.id] = 1
        seen[job.id] = job
        for dep in job.deps.values():
            visit(producer(dep), (*path, job.label))
        state[job.id] = 2
        order.append(job)

    for job in jobs:
        visit(job, ())
    return order


def producer(dep: Job | Part) -> Job:
    """The job that computes a dependency (a :class:`Part`'s job)."""
    return dep.job if isinstance(dep, Part) else dep


def by_waiting_work(order: list[Job]) -> list[Job]:
    """``order`` (dependencies first) re-ordered so that jobs on which more jobs wait (directly or through
    others) start first, ties in the given order: the zoo trainings that feed a figure's dozens of jobs go
    before a lone long training, so the workers are not left idle waiting for them at the end. Still
    dependencies first: a job's dependency has every job waiting on it, plus that job itself."""
    dependents: dict[str, set[str]] = {j.id: set() for j in order}
    for job in reversed(order):                      # dependants before their dependencies
        for dep in job.deps.values():
            dependents[producer(dep).id] |= {job.id} | dependents[job.id]
    return sorted(order, key=lambda j: -len(dependents[j.id]))


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)[:80]


def artifact_path(out: Path, job: Job) -> Path:
    return out / ARTIFACTS / job.kind / f"{_safe(job.label)}-{job.id[:10]}"


def read_artifact(out: Path, artifact: str | None, manifest: dict[str, int] | None) -> dict[str, bytes]:
    """The files of a finished job's artifact folder (those of its manifest, when it has one)."""
    if artifact is None:
        return {}
    folder = out / artifact
    names = sorted(manifest) if manifest else sorted(p.name for p in folder.iterdir() if p.is_file())
    return {name: (folder / name).read_bytes() for name in names}


def _write_artifact(out: Path, job: Job, files: dict[str, bytes]) -> tuple[str, dict[str, int]]:
    """Write ``files`` to the job's artifact folder (a temporary name, then renamed); returns the folder relative
    to ``out`` and its manifest ``{name: size}``."""
    final = artifact_path(out, job)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = {}
    for name, data in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or not name:
            raise ValueError(f"artifact file name {name!r} must be a plain name")
        if not isinstance(data, bytes | bytearray):
            raise ValueError(f"artifact file {name!r} must be bytes, got {type(data).__name__}")
        manifest[name] = len(data)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return str(final.relative_to(out)), manifest


def artifact_complete(out: Path, artifact: str | None, manifest: dict[str, int] | None) -> bool:
    """True when the job has no artifact, or every file of its manifest exists with the recorded size.

    Rows written before manifests existed (``manifest`` None) need a non-empty artifact folder.
    """
    if artifact is None:
        return True
    folder = out / artifact
    if not folder.is_dir():
        return False
    if manifest is None:
        return any(p.is_file() for p in folder.iterdir())
    for name, size in manifest.items():
        f = folder / name
        try:
            if not f.is_file() or f.stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def finished_ids(store: ResultsStore, out: Path) -> set[str]:
    """Ids of jobs recorded ``done`` whose artifact (if they have one) is complete, file by file."""
    done = set()
    for row in store.rows(status="done"):
        if artifact_complete(out, row.artifact, store.manifest(row.id)):
            done.add(row.id)
    return done


LOCK_NAME = "driver.lock"


@contextmanager
def driver_lock(out: Path):
    """Hold ``out/driver.lock`` (an advisory flock, released by the OS even on ``kill -9``) so that only one
    driver works on a results folder at a time; a second one gets a ValueError."""
    with open(out / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ValueError(f"another driver (intertwiners reproduce) is already running in {out}; wait for it "
                             "or use another --out") from err
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _commit(store: ResultsStore, out: Path, job: Job, outcome: dict, summary: RunSummary, done: set[str],
            failed: set[str]) -> None:
    """Record one finished job: its artifact renamed into place, then its row (done), or its error (failed).
    A failure to record a result (a full disk, say) is recorded as the job's failure; nothing is lost."""
    summary.executed += 1
    common = dict(id=job.id, kind=job.kind, label=job.label, config=job.config,
                  deps={r: d.id for r, d in job.deps.items()}, started_at=outcome.get("started_at"),
                  finished_at=time.time(), wall_s=outcome.get("wall_s"), worker=outcome.get("worker"))
    if outcome.get("ok"):
        try:
            artifact, manifest = (_write_artifact(out, job, outcome["files"]) if outcome.get("files")
                                  else (None, None))
            store.record(status="done", result=outcome["result"], artifact=artifact, manifest=manifest, **common)
            done.add(job.id)
            summary.succeeded += 1
            return
        except Exception as err:  # e.g. disk full: record it as the job's failure
            outcome = {"ok": False, "error": f"recording the result failed: {err!r}"}
    store.record(status="failed", error=outcome.get("error", "unknown error"), **common)
    failed.add(job.id)
    summary.failed += 1
    summary.failures.append((job.label, (outcome.get("error") or "").strip().splitlines()[-1:][0]
                             if outcome.get("error") else "unknown error"))


def time_left(waiting: Iterable[str], running: Iterable[tuple[str, float]], finished: dict[str, list[float]],
              slots: int) -> tuple[float, int]:
    """``(seconds, untimed)``: the estimated time until the jobs of kinds already timed end, and how many jobs
    of kinds not timed yet come on top. Each waiting job (its kind) takes the mean time of the finished jobs of
    its kind, each running job (kind, seconds it has run) what is left of that mean, and ``slots`` jobs run at
    once; a kind with no finished job is not guessed (its jobs are counted in ``untimed``)."""
    def mean(kind: str) -> float | None:
        ts = finished.get(kind)
        return sum(ts) / len(ts) if ts else None

    work, untimed = 0.0, 0
    for kind, ran in [(k, 0.0) for k in waiting] + list(running):
        m = mean(kind)
        if m is None:
            untimed += 1
        else:
            work += max(m - ran, 0.0)
    return work / max(1, slots), untimed


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _left_text(seconds: float, untimed: int) -> str:
    """The progress bar's estimate: ", about 5 min left", with the jobs of kinds not timed yet on top."""
    more = f"{untimed} job{'s' if untimed != 1 else ''} of kinds not timed yet" if untimed else ""
    if seconds <= 0 and more:
        return f", {more}"
    return f", about {_minutes(seconds)} left" + (f" + {more}" if more else "")


def run_jobs(jobs: Iterable[Job], out: str | Path, backend, *, context: dict | None = None,
             progress: bool = True, plan_info: dict | None = None, meta: dict | None = None) -> RunSummary:
    """Run every job of ``jobs`` (and their dependencies) not yet done in ``out/results.sqlite``.

    ``backend``: see :mod:`intertwiners.experiments.backends`. ``context`` (data folder, device) is passed
    to every job and is not part of job ids. ``meta`` (key -> JSON value, e.g. the plan) is written to the
    store only once the driver lock is held: a second driver that is refused changes nothing.
    Returns a :class:`RunSummary`; the store holds the rest.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    context = dict(context or {})
    order = closure(jobs)
    start = time.perf_counter()
    summary = RunSummary(planned=len(order))
    with driver_lock(out), ResultsStore(out) as store:
        done = finished_ids(store, out) & {j.id for j in order}   # reads every row: a damaged one fails here
        for key, value in (meta or {}).items():
            store.set_meta(key, value)
        todo = [j for j in by_waiting_work(order) if j.id not in done]
        summary.skipped = len(order) - len(todo)
        run_id = store.start_run(plan_info or {}, backend.name, len(order), summary.skipped)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm
            # elapsed time from tqdm; what is left from the jobs' kinds (time_left), not tqdm's per-job rate
            bar = tqdm(total=len(todo), desc="jobs", unit="job", dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        failed: set[str] = set()
        waiting = list(todo)
        in_flight: dict = {}
        started: dict = {}
        finished: dict[str, list[float]] = {}
        dep_cache: dict[str, Dependency] = {}

        def dependency(dep: Job | Part) -> Dependency:
            if isinstance(dep, Part):
                return dependency(dep.job).part(dep.name)
            if dep.id not in dep_cache:
                row = store.get(dep.id)
                files = read_artifact(out, row.artifact, store.manifest(dep.id))
                dep_cache[dep.id] = Dependency(row.result or {}, files)
            return dep_cache[dep.id]

        try:
            while waiting or in_flight:
                still: list[Job] = []
                for job in waiting:
                    dep_ids = [producer(d).id for d in job.deps.values()]
                    if any(d in failed for d in dep_ids):
                        failed.add(job.id)  # blocked: propagate to its own dependants, record nothing
                        summary.blocked += 1
                        if bar is not None:
                            bar.update(1)
                        continue
                    if len(in_flight) < backend.slots and all(d in done for d in dep_ids):
                        inputs = {role: dependency(d) for role, d in job.deps.items()}
                        handle = backend.submit(job.kind, job.config, inputs, context)
                        in_flight[handle] = job
                        started[handle] = time.perf_counter()
                    else:
                        still.append(job)
                waiting = still
                if not in_flight:
                    if waiting:  # pragma: no cover - closure() guarantees dependencies come first
                        raise RuntimeError("scheduler stalled with jobs waiting and none running")
                    break
                for handle in backend.wait(list(in_flight), timeout=None):
                    job = in_flight.pop(handle)
                    finished.setdefault(job.kind, []).append(time.perf_counter() - started.pop(handle))
                    _commit(store, out, job, backend.outcome(handle), summary, done, failed)
                    if bar is not None:
                        now = time.perf_counter()
                        left, untimed = time_left([j.kind for j in waiting],
                                                  [(j.kind, now - started[h]) for h, j in in_flight.items()],
                                                  finished, backend.slots)
                        bar.set_postfix_str(f"{job.label[:40]}" + (f", {summary.failed} failed"
                                                                     if summary.failed else "")
                                            + _left_text(left, untimed))
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            summary.wall_s = time.perf_counter() - start
            store.finish_run(run_id, summary.executed, summary.succeeded, summary.failed, summary.blocked)
    return summary
