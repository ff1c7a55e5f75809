"""The job engine: :class:`Job`, :class:`JobType`, the :data:`JOB_TYPES` registry and :func:`execute`.

A :class:`Job` is a kind (a key of :data:`JOB_TYPES`), a JSON configuration and the jobs it depends on
(by role, e.g. ``{"front": zoo_job, "back": zoo_job}``). Its id is the hash of all of that (see
:func:`intertwiners.experiments.store.job_id`), so the same configuration is the same job in every run.

A job type's ``run(config, inputs, context)`` is a pure function of its configuration and its inputs
(the results and files of its dependencies) and returns an :class:`Output`: a plain-JSON ``result`` and
optional ``files`` (bytes, e.g. a trained model's ``model.safetensors`` and ``config.json``). It never
touches the results store: the driver writes the files and the row. ``context`` holds what may differ
between machines without changing the answer (the data folder, the device); it is not part of the id.
Results are deterministic for a given configuration (seeds are part of every configuration).

Experiment job types whose library module is not installed report it through ``missing()``; the plan
leaves them out and the report lists them as missing. A module that is installed but fails to import
fails the run, naming the job (:func:`need_missing`). The paper's job types live with their figures in
:mod:`intertwiners.experiments.figures` (one module per experiment); this module knows none of them but
the ``probe`` job that tests the machinery itself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .store import canonical_json, job_id

# ----------------------------------------------------------------------------------------------------------
# Jobs and outputs


class Job:
    """One unit of work: ``kind``, a JSON ``config``, and dependencies ``deps`` (role -> Job).

    ``label`` is a human-readable name (shown in the progress bar and the store); it is not hashed.
    """

    __slots__ = ("kind", "config", "deps", "label", "id")

    def __init__(self, kind: str, config: dict, deps: dict[str, Job] | None = None, label: str = ""):
        if kind not in JOB_TYPES:
            raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(sorted(JOB_TYPES))}")
        self.kind = kind
        self.config = json.loads(canonical_json(config))  # a private, JSON-normalised copy
        self.deps = dict(deps or {})
        self.label = label or kind
        self.id = job_id(kind, self.config, {role: d.id for role, d in self.deps.items()},
                         JOB_TYPES[kind].code_version())

    def __repr__(self) -> str:
        return f"Job({self.kind!r}, {self.label!r}, id={self.id})"


@dataclass
class Output:
    """What a job returns: a plain-JSON ``result`` and optional ``files`` (name -> bytes)."""

    result: dict
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Dependency:
    """A finished dependency as a job sees it: its stored ``result`` and its ``files`` (name -> bytes)."""

    result: dict
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class JobType:
    kind: str
    run: Callable[[dict, dict[str, Dependency], dict], Output]
    description: str
    needs: tuple[str, ...] = ()  # "module" or "module:attribute" that must exist (e.g. "intertwiners.stitching:stitch")
    sources: tuple[str, ...] = ()  # modules/packages whose source is part of every job id of this kind

    def code_version(self) -> str | None:
        """sha256 (16 hex digits) of the source files of ``sources`` (packages: every ``.py`` in them), or
        ``None`` when there are none. Part of each job id, so a change in the code that computes a result
        makes the next run recompute it (and everything that depends on it) instead of reusing it."""
        return _code_version(self.sources) if self.sources else None

    def missing(self) -> str | None:
        """``None`` when the job type can run here, else the reason (a module that is not installed, or a
        missing function). A module that is installed but fails to import raises (:func:`need_missing`)."""
        for need in self.needs:
            reason = need_missing(need, self.kind)
            if reason:
                return reason
        return None


def need_missing(need: str, kind: str) -> str | None:
    """Why ``need`` ("module" or "module:attribute") is not available, or ``None`` when it is.

    A module that is not installed is a reason (the plan leaves the experiment out and the report names
    it). A module that is installed but cannot be imported is a broken experiment, never a skipped one:
    ``ValueError`` naming the job kind and the error, so that the run fails with a non-zero exit.
    """
    mod, _, attr = need.partition(":")
    try:
        if importlib.util.find_spec(mod) is None:
            return f"module {mod} is not available"
        module = importlib.import_module(mod)
    except ModuleNotFoundError as err:
        if err.name is not None and mod.startswith(err.name) and mod[len(err.name):len(err.name) + 1] in ("", "."):
            return f"module {mod} is not available"         # the module (or a package above it) is not there
        raise ValueError(f"experiment job {kind!r}: module {mod} cannot be imported: {err!r}") from err
    except Exception as err:
        raise ValueError(f"experiment job {kind!r}: module {mod} cannot be imported: {err!r}") from err
    if attr and not hasattr(module, attr):
        return f"{mod}.{attr} is not available"
    return None


JOB_TYPES: dict[str, JobType] = {}


@functools.cache
def _code_version(sources: tuple[str, ...]) -> str:
    """sha256 of the named sources: a module or package (every ``.py`` in it), or ``module:function``
    (that function's source text only, so that a figure module's report code does not change its job ids)."""
    digest = hashlib.sha256()
    for name in sources:
        mod, _, attr = name.partition(":")
        if attr:
            import inspect

            digest.update(f"{name}:".encode())
            digest.update(inspect.getsource(getattr(importlib.import_module(mod), attr)).encode())
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            digest.update(f"{name}:missing".encode())
            continue
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for f in files:
            digest.update(f"{name}/{f.relative_to(origin.parent)}".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def register(kind: str, description: str, needs: tuple[str, ...] = (), sources: tuple[str, ...] = ()):
    """Decorator: register ``run(config, inputs, context) -> Output`` as the job type ``kind``; ``sources``
    name the modules (or ``module:function``) whose code goes into the job ids (see :meth:`JobType.code_version`)."""
    def wrap(fn):
        JOB_TYPES[kind] = JobType(kind, fn, description, needs, tuple(sources))
        return fn
    return wrap


# ----------------------------------------------------------------------------------------------------------
# Execution (in a worker process, a Ray task or inline)


def init_worker(threads: int | None) -> None:
    """Per-worker set-up: cap torch's intra-op threads so that workers do not oversubscribe the cores."""
    if threads:
        import torch
        torch.set_num_threads(int(threads))


def execute(kind: str, config: dict, inputs: dict[str, Dependency], context: dict) -> dict:
    """Run one job and never raise for the job's own errors.

    Returns ``{"ok": True, "result", "files", "started_at", "wall_s", "worker"}`` or
    ``{"ok": False, "error": <traceback text>, "started_at", "wall_s", "worker"}``.
    """
    started = time.time()
    t0 = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        if context.get("threads"):
            init_worker(context["threads"])
        if kind not in JOB_TYPES:
            raise ValueError(f"unknown job kind {kind!r}")
        out = JOB_TYPES[kind].run(config, inputs, context)
        if not isinstance(out, Output):
            raise TypeError(f"job type {kind!r} returned {type(out).__name__}, expected Output")
        result = json.loads(canonical_json(out.result))  # refuses NaN/Inf and non-JSON values
        return {"ok": True, "result": result, "files": dict(out.files), "started_at": started,
                "wall_s": time.perf_counter() - t0, "worker": worker}
    except Exception:
        return {"ok": False, "error": traceback.format_exc(limit=20), "started_at": started,
                "wall_s": time.perf_counter() - t0, "worker": worker}


# ----------------------------------------------------------------------------------------------------------
# Job types


@register("probe", "a tiny deterministic job for testing the machinery (sleeps, then combines its inputs)")
def run_probe(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """``value = seed * 1.5 + sum(dependency values)``; raises while ``$INTERTWINERS_PROBE_FAIL`` names it,
    and kills its worker process (as an out-of-memory kill would) while ``$INTERTWINERS_PROBE_CRASH`` does.

    Config: ``name``, ``seed``, ``sleep_s`` (default 0), ``file`` (write a small file, default False).
    """
    if config["name"] in os.environ.get("INTERTWINERS_PROBE_FAIL", "").split(","):
        raise RuntimeError(f"probe {config['name']} failed on purpose (INTERTWINERS_PROBE_FAIL)")
    if config["name"] in os.environ.get("INTERTWINERS_PROBE_CRASH", "").split(","):
        os._exit(3)
    time.sleep(float(config.get("sleep_s", 0)))
    value = float(config["seed"]) * 1.5 + sum(float(d.result["value"]) for _, d in sorted(inputs.items()))
    files = {"probe.txt": f"{value!r}\n".encode()} if config.get("file") else {}
    return Output({"value": value, "name": config["name"], "inputs": sorted(inputs)}, files)
