"""Where jobs run: ``inline`` (in the driver), ``local`` (worker processes) or ``ray`` (a Ray cluster).

A backend only executes :func:`intertwiners.experiments.jobs.execute`; the driver (the runner) keeps the
results store. Every backend has the same small interface:

* ``submit(kind, config, inputs, context) -> handle``
* ``wait(handles, timeout) -> list of finished handles`` (at least one unless the timeout passed)
* ``outcome(handle) -> dict`` the dict that ``execute`` returned (a crashed worker becomes a failure)
* ``close()``; ``slots`` (how many jobs to keep in flight); ``name``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import time
import traceback
from typing import Any

from .jobs import execute, init_worker


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Torch threads per worker: the cores shared out evenly, at least one."""
    return max(1, available_cores() // max(1, workers))


def _crash(err: BaseException) -> dict:
    return {"ok": False, "error": "".join(traceback.format_exception(err)), "started_at": time.time(),
            "wall_s": 0.0, "worker": "unknown"}


class _Finished:
    """A handle whose job already ran (hashable by identity)."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: dict):
        self.outcome = outcome


class InlineBackend:
    """Runs each job in the driver process at submission (for debugging and tests)."""

    name = "inline"

    def __init__(self, threads: int | None = None):
        self.slots = 1
        self.threads = threads

    def submit(self, kind: str, config: dict, inputs: dict, context: dict) -> Any:
        return _Finished(execute(kind, config, inputs, {**context, "threads": self.threads}))

    def wait(self, handles: list, timeout: float | None = None) -> list:
        return list(handles)

    def outcome(self, handle: Any) -> dict:
        return handle.outcome

    def close(self) -> None:
        pass


class LocalBackend:
    """A pool of ``workers`` spawned processes on this machine (concurrent.futures, spawn context).

    Each worker caps torch at ``threads`` intra-op threads (default: the cores divided by the workers).
    """

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None):
        workers = workers or max(1, min(available_cores(), 8))
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.slots = workers
        self.threads = threads or threads_per_worker(workers)
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.slots, mp_context=mp.get_context("spawn"),
                                      initializer=init_worker, initargs=(self.threads,))

    def submit(self, kind: str, config: dict, inputs: dict, context: dict) -> cf.Future:
        try:
            return self._pool.submit(execute, kind, config, inputs, context)
        except cf.process.BrokenProcessPool:
            # a worker died (e.g. out of memory): start a fresh pool for the jobs still to come
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(execute, kind, config, inputs, context)

    def wait(self, handles: list, timeout: float | None = None) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def outcome(self, handle: cf.Future) -> dict:
        try:
            return handle.result()
        except Exception as err:  # the worker process died or the inputs could not be sent
            return _crash(err)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Submits jobs as Ray tasks: to the cluster at ``address`` or to a local Ray instance.

    ``workers`` bounds the jobs in flight (default: the cluster's CPUs); each task asks for
    ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs and caps torch at that many threads.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_job: float = 1,
                 gpus_per_job: float = 0, init_kwargs: dict | None = None):
        try:
            import ray
        except ImportError as err:
            raise ValueError("the ray backend needs Ray: pip install 'intertwiners[ray]'") from err
        self._ray = ray
        self._started_here = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            if address:
                ray.init(address=address, **kwargs)
            else:
                kwargs.setdefault("num_cpus", workers or available_cores())
                ray.init(**kwargs)
            self._started_here = True
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = workers or max(1, int(cluster_cpus // max(cpus_per_job, 1e-9)))
        self._remote = ray.remote(_ray_execute).options(num_cpus=cpus_per_job, num_gpus=gpus_per_job,
                                                        max_retries=0)
        self._threads = max(1, int(cpus_per_job))

    def submit(self, kind: str, config: dict, inputs: dict, context: dict) -> Any:
        return self._remote.remote(kind, config, inputs, {**context, "threads": self._threads})

    def wait(self, handles: list, timeout: float | None = None) -> list:
        done, _ = self._ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def outcome(self, handle: Any) -> dict:
        try:
            return self._ray.get(handle)
        except Exception as err:  # the task's worker died
            return _crash(err)

    def close(self) -> None:
        if self._started_here:
            self._ray.shutdown()


def _ray_execute(kind: str, config: dict, inputs: dict, context: dict) -> dict:
    return execute(kind, config, inputs, context)


def make_backend(name: str, *, workers: int | None = None, ray_address: str | None = None,
                 threads: int | None = None, **kwargs):
    """``"inline"``, ``"local"`` or ``"ray"``; ``workers=0`` with ``local`` means inline."""
    if name == "inline" or (name == "local" and workers == 0):
        return InlineBackend(threads)
    if name == "local":
        return LocalBackend(workers, threads)
    if name == "ray":
        return RayBackend(ray_address, workers, **kwargs)
    raise ValueError(f"unknown backend {name!r}; known: inline, local, ray")
