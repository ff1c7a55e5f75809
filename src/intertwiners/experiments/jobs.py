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
fails the run, naming the job (``ImportError``, non-zero exit). The paper's job types live with their figures in
:mod:`intertwiners.experiments.figures` (one module per experiment); this module knows none of them but
the ``probe`` job that tests the machinery itself.
"""

from __future__ import annotations

import ast
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
    """One unit of work: ``kind``, a JSON ``config``, and dependencies ``deps`` (role -> Job, or a
    :class:`Part` of a job).

    ``label`` is a human-readable name (shown in the progress bar and the store); it is not hashed.
    """

    __slots__ = ("kind", "config", "deps", "label", "id")

    def __init__(self, kind: str, config: dict, deps: dict[str, Job | Part] | None = None, label: str = ""):
        if kind not in JOB_TYPES:
            raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(sorted(JOB_TYPES))}")
        self.kind = kind
        self.config = json.loads(canonical_json(config))  # a private, JSON-normalised copy
        self.deps = dict(deps or {})
        for role, dep in self.deps.items():
            if not isinstance(dep, Job | Part):
                raise ValueError(f"dependency {role!r} must be a Job or a Part, got {type(dep).__name__}")
        self.label = label or kind
        self.id = job_id(kind, self.config, {role: d.id for role, d in self.deps.items()},
                         JOB_TYPES[kind].code_version())

    def part(self, name: str) -> Part:
        """The part ``name`` of this job's output (see :class:`Part`)."""
        return Part(self, name)

    def __repr__(self) -> str:
        return f"Job({self.kind!r}, {self.label!r}, id={self.id})"


PART_SEPARATOR = "."


class Part:
    """One named part of a job's output, as a dependency: e.g. one model of a zoo job that trains several
    together. The depending job sees only that part: its result (``result["parts"][name]`` of the job) and
    its files (the job's files named ``<name>.<file>``, without the prefix) -- exactly what a job that made
    only that part would have given it (:func:`parts_output` writes such outputs). Its ``id`` is
    ``<job id>:<name>``."""

    __slots__ = ("job", "name", "id")

    def __init__(self, job: Job, name: str):
        _check_part_name(name)
        self.job, self.name, self.id = job, name, f"{job.id}:{name}"

    @property
    def label(self) -> str:
        return f"{self.job.label} [{self.name}]"

    def __repr__(self) -> str:
        return f"Part({self.job!r}, {self.name!r})"


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

    def part(self, name: str) -> Dependency:
        """The part ``name`` of this output, as a :class:`Part` dependency sees it."""
        parts = self.result.get("parts", {})
        if name not in parts:
            raise ValueError(f"the dependency has no part {name!r} (parts: {sorted(parts)})")
        prefix = name + PART_SEPARATOR
        return Dependency(parts[name], {f[len(prefix):]: b for f, b in self.files.items() if f.startswith(prefix)})


def parts_output(parts: dict[str, Output], **shared) -> Output:
    """One output made of named parts (see :class:`Part`): result ``{"parts": {name: result}, **shared}``,
    files ``<name>.<file>``."""
    for name in parts:
        _check_part_name(name)
    return Output({"parts": {n: o.result for n, o in parts.items()}, **shared},
                  {f"{n}{PART_SEPARATOR}{f}": b for n, o in parts.items() for f, b in o.files.items()})


def _check_part_name(name: str) -> None:
    if not isinstance(name, str) or not name or PART_SEPARATOR in name or ":" in name or "/" in name:
        raise ValueError(f"part name must be a non-empty name without '.', ':' or '/', got {name!r}")


@dataclass(frozen=True)
class JobType:
    kind: str
    run: Callable[[dict, dict[str, Dependency], dict], Output]
    description: str
    needs: tuple[str, ...] = ()  # "module" or "module:attribute" that must exist (e.g. "intertwiners.stitching:stitch")
    sources: tuple[str, ...] = ()  # extra modules (or "module:function") hashed besides those derived from ``run``

    def code_version(self) -> str:
        """sha256 (16 hex digits) of the code that computes this kind of job (:func:`code_sources` of ``run``,
        plus ``sources``). Part of each job id, so a change in that code makes the next run recompute the
        job (and everything that depends on it) instead of reusing it."""
        return _code_version(self.run, self.sources)

    def missing(self) -> str | None:
        """``None`` when the job type can run here, else the reason (a module or function that does not
        exist). A module that exists but cannot be imported is a defect, not a reason to skip the
        experiment: ImportError naming this job type and the module, so the run fails with a non-zero exit."""
        for need in self.needs:
            mod, _, attr = need.partition(":")
            try:
                found = importlib.util.find_spec(mod) is not None
                module = importlib.import_module(mod) if found else None
            except ModuleNotFoundError as err:
                if err.name is None or not (mod + ".").startswith(err.name + "."):   # exists; an import in it does not
                    raise ImportError(f"job type {self.kind!r}: module {mod} cannot be imported: {err!r}") from err
                found = False
            except Exception as err:
                raise ImportError(f"job type {self.kind!r}: module {mod} cannot be imported: {err!r}") from err
            if not found:
                return f"module {mod} is not available"
            if attr:
                if not hasattr(module, attr):
                    return f"{mod}.{attr} is not available"
        return None


JOB_TYPES: dict[str, JobType] = {}

# ----------------------------------------------------------------------------------------------------------
# Code versions, derived from what a job function can reach

PACKAGE = "intertwiners"
FIGURES = "intertwiners.experiments.figures"
# The engine moves results between processes and the store; it computes none of them.
ENGINE = ("intertwiners.experiments.jobs", "intertwiners.experiments.store", "intertwiners.experiments.runner",
          "intertwiners.experiments.backends", "intertwiners.experiments.report", "intertwiners.experiments.plan",
          "intertwiners.experiments", "intertwiners.experiments.figures", "intertwiners")


def code_sources(fn) -> dict[str, str]:
    """The code a job function can reach, ``{name: source text}``, derived from the function itself:

    * the function's own source, and -- function by function -- every function or class of the experiment
      modules (:mod:`intertwiners.experiments.figures`) it refers to, and theirs in turn (a figure module's
      report code is not reached by its job functions, so rewording a report recomputes nothing);
    * every library module of :mod:`intertwiners` that any of them refers to or imports (at module level
      or inside a function), whole, with every library module *those* import, transitively (a name imported
      from a package counts as the module that defines it).

    The engine (:data:`ENGINE`: jobs, store, runner, backends, report, plan) is left out: it computes no
    result.
    """
    found: dict[str, str] = {}
    _reach_function(fn, found)
    return dict(sorted(found.items()))


def _is_library(name: str) -> bool:
    return (name == PACKAGE or name.startswith(PACKAGE + ".")) and name not in ENGINE \
        and not name.startswith(FIGURES + ".")


def _reach_function(obj, found: dict[str, str]) -> None:
    import inspect
    import textwrap

    module = getattr(obj, "__module__", None) or ""
    key = f"{module}:{getattr(obj, '__qualname__', repr(obj))}"
    if key in found:
        return
    found[key] = source = textwrap.dedent(inspect.getsource(obj))
    scope = vars(importlib.import_module(module))
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names.add(node.value.id)
    for name in sorted(names):
        if name in scope:
            _reach_object(scope[name], found)
    for target in _imports(ast.parse(source), module, is_package=False):
        _reach_object(target, found)


def _reach_object(obj, found: dict[str, str]) -> None:
    import inspect
    import types

    if isinstance(obj, types.ModuleType):
        name = obj.__name__
        if name.startswith(FIGURES + "."):
            return   # a figure module as a whole: its functions are reached one by one
        if _is_library(name):
            _reach_module(name, found)
        return
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return
    if module.startswith(FIGURES + "."):
        _reach_function(obj, found)
    elif _is_library(module):
        _reach_module(module, found)


def _reach_module(name: str, found: dict[str, str]) -> None:
    key = f"{name}/"
    if key in found:
        return
    found[key], targets = _module_source(name)
    for target in targets:
        _reach_object(target, found)


@functools.cache
def _module_source(name: str) -> tuple[str, tuple]:
    """(source text of library module ``name``, the objects its imports bind), read and parsed once per
    process (every job kind's code version walks the same modules); ``("missing", ())`` without a file."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return "missing", ()
    text = Path(spec.origin).read_text()
    return text, tuple(_imports(ast.parse(text), name, Path(spec.origin).name == "__init__.py"))


def _imports(tree: ast.AST, module: str, is_package: bool) -> list:
    """The objects (modules, functions, classes) that the import statements of ``tree`` bind."""
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    out.append(importlib.import_module(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            try:
                parent = importlib.import_module(base)
            except ImportError:
                continue
            for alias in node.names:
                try:
                    out.append(importlib.import_module(f"{base}.{alias.name}"))
                    continue
                except ImportError:
                    pass
                out.append(getattr(parent, alias.name, parent))
    return out


@functools.cache
def _code_version(fn, extra: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for name, text in code_sources(fn).items():
        digest.update(f"{name}\0{text}\0".encode())
    for name in extra:
        mod, _, attr = name.partition(":")
        if attr:
            import inspect

            digest.update(f"{name}:".encode())
            digest.update(inspect.getsource(getattr(importlib.import_module(mod), attr)).encode())
        else:
            _reach_module(mod, sub := {})
            for key, text in sorted(sub.items()):
                digest.update(f"{key}\0{text}\0".encode())
    return digest.hexdigest()[:16]


def register(kind: str, description: str, needs: tuple[str, ...] = (), sources: tuple[str, ...] = ()):
    """Decorator: register ``run(config, inputs, context) -> Output`` as the job type ``kind``. Its code version
    is derived from ``run`` (:func:`code_sources`); ``sources`` adds modules the derivation cannot see."""
    def wrap(fn):
        JOB_TYPES[kind] = JobType(kind, fn, description, needs, tuple(sources))
        return fn
    return wrap


# ----------------------------------------------------------------------------------------------------------
# Execution (in a worker process, a Ray task or inline)


def init_worker(threads: int | None) -> None:
    """Per-worker set-up: cap every thread pool a job can use -- torch's intra-op threads, numpy's BLAS and
    OpenMP pools (threadpoolctl) and numba's parallel loops -- at ``threads``, so that workers side by side do
    not oversubscribe the cores (two workers with two threads each ran jobs up to 4x slower on 2 cores)."""
    if threads:
        import numba
        import torch
        from threadpoolctl import threadpool_limits

        # numba first: starting its threading layer resets the OpenMP runtimes' thread counts
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(int(threads))
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
