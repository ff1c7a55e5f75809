"""Job types of the reproduction and the pure functions that run them.

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
leaves them out and the report lists them as missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
        self.id = job_id(kind, self.config, {role: d.id for role, d in self.deps.items()})

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
    needs: tuple[str, ...] = ()  # modules that must be importable (e.g. "intertwiners.stitching")

    def missing(self) -> str | None:
        """``None`` when the job type can run here, else the reason (a missing module)."""
        for mod in self.needs:
            try:
                found = importlib.util.find_spec(mod) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"module {mod} is not available"
        return None


JOB_TYPES: dict[str, JobType] = {}


def register(kind: str, description: str, needs: tuple[str, ...] = ()):
    """Decorator: register ``run(config, inputs, context) -> Output`` as the job type ``kind``."""
    def wrap(fn):
        JOB_TYPES[kind] = JobType(kind, fn, description, needs)
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
# Helpers shared by the experiment jobs

_DATA_CACHE: dict[tuple, Any] = {}


def dataset(name: str, context: dict):
    """``(train, test)`` for ``name``, cached per worker process."""
    from ..data import load

    key = (name, context.get("data_root"))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load(name, context.get("data_root"))
    return _DATA_CACHE[key]


def model_files(model) -> dict[str, bytes]:
    """A model built by :mod:`intertwiners.models` as ``{"model.safetensors": ..., "config.json": ...}``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    config = json.dumps(model.intertwiners_config, indent=2, sort_keys=True).encode()
    return {"model.safetensors": save(state), "config.json": config}


def model_from_files(files: dict[str, bytes]):
    """Rebuild a model from :func:`model_files` output (safetensors + JSON; never unpickles)."""
    from safetensors.torch import load

    from .. import models

    if "model.safetensors" not in files or "config.json" not in files:
        raise ValueError(f"dependency has no saved model (files: {sorted(files)})")
    model = models.build(json.loads(files["config.json"]))
    model.load_state_dict(load(files["model.safetensors"]))
    return model.eval()


def _device(context: dict) -> str:
    return context.get("device") or "auto"


# ----------------------------------------------------------------------------------------------------------
# Job types


@register("probe", "a tiny deterministic job for testing the machinery (sleeps, then combines its inputs)")
def run_probe(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """``value = seed * 1.5 + sum(dependency values)``; fails while ``$INTERTWINERS_PROBE_FAIL`` names it.

    Config: ``name``, ``seed``, ``sleep_s`` (default 0), ``file`` (write a small file, default False).
    """
    failing = os.environ.get("INTERTWINERS_PROBE_FAIL", "").split(",")
    if config["name"] in failing:
        raise RuntimeError(f"probe {config['name']} failed on purpose (INTERTWINERS_PROBE_FAIL)")
    time.sleep(float(config.get("sleep_s", 0)))
    value = float(config["seed"]) * 1.5 + sum(float(d.result["value"]) for _, d in sorted(inputs.items()))
    files = {"probe.txt": f"{value!r}\n".encode()} if config.get("file") else {}
    return Output({"value": value, "name": config["name"], "inputs": sorted(inputs)}, files)


@register("zoo", "train one model (intertwiners.training.train_one) and keep its weights")
def run_zoo(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``arch``, ``dataset``, ``seed``, ``epochs`` (null: the recipe's), ``arch_kwargs``."""
    from ..training import train_one

    data = dataset(config["dataset"], context)
    model, metrics = train_one(config["arch"], config["dataset"], int(config["seed"]), epochs=config.get("epochs"),
                               device=_device(context), progress=False, data=data,
                               **config.get("arch_kwargs", {}))
    metrics.pop("wall_time_s", None)  # timing lives in the row, results stay deterministic
    return Output(metrics, model_files(model))
