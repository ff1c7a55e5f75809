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
import socket
import time
import traceback
from typing import Any

from .._worker import DRIVER_ENV, set_parent_death_signal, start_parent_watchdog
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


# -- workers never outlive the driver: see intertwiners._worker (armed at `import intertwiners`, before torch)


def _init_local_worker(parent_pid: int, threads: int | None) -> None:
    """Initializer of a local worker: die with the driver (again, in case ``import intertwiners`` ran before the
    environment said so), then the usual job-worker set-up."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:        # the driver died while this worker was starting
        os._exit(1)
    start_parent_watchdog(parent_pid)
    init_worker(threads)


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

    def close(self, abort: bool = False) -> None:
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
        # workers are spawned lazily (at submit) and inherit the environment then: this tells them, at their
        # first `import intertwiners`, that this process is the driver they must not outlive
        self._env_before = os.environ.get(DRIVER_ENV)
        os.environ[DRIVER_ENV] = str(os.getpid())
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.slots, mp_context=mp.get_context("spawn"),
                                      initializer=_init_local_worker, initargs=(os.getpid(), self.threads))

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

    def close(self, abort: bool = False) -> None:
        """Stop the workers: after the jobs in flight finish, or at once with ``abort`` (the driver is failing, so
        their results could not be recorded anyway)."""
        if abort:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in processes:
                if p.is_alive():
                    p.terminate()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._env_before is None:
            os.environ.pop(DRIVER_ENV, None)
        else:
            os.environ[DRIVER_ENV] = self._env_before


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
                check_reachable(address)
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, TimeoutError, OSError, RuntimeError) as err:
                    raise ValueError(f"cannot connect to the Ray cluster at {address}: {err}") from err
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

    def close(self, abort: bool = False) -> None:
        if self._started_here:
            self._ray.shutdown()


RAY_CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail fast (ValueError) when nothing listens at a Ray ``host:port`` address (``ray://host:port`` too).

    ``ray.init`` itself retries an unreachable address for minutes; one TCP connection with a timeout tells
    at once. ``"auto"`` and addresses without a port are left to Ray.
    """
    text = address.strip()
    if text in ("", "auto", "local"):
        return
    if "://" in text:
        text = text.split("://", 1)[1]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), 'auto' or "
                         "ray://HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError | socket.timeout) else (err.strerror or str(err))
        raise ValueError(f"cannot reach the Ray cluster at {address}: {reason} (after at most {timeout_s:g} s); "
                         "is `ray start --head` running there?") from None


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
