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
        """``None`` when the job type can run here, else the reason (a missing module or function)."""
        for need in self.needs:
            mod, _, attr = need.partition(":")
            try:
                found = importlib.util.find_spec(mod) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"module {mod} is not available"
            if attr:
                try:
                    module = importlib.import_module(mod)
                except Exception as err:  # a module that exists but cannot be imported yet
                    return f"module {mod} cannot be imported: {err!r}"
                if not hasattr(module, attr):
                    return f"{mod}.{attr} is not available"
        return None


JOB_TYPES: dict[str, JobType] = {}


@functools.cache
def _code_version(sources: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in sources:
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


# The library code behind the experiment jobs (the engine's own job functions included).
_ENGINE = ("intertwiners.experiments.jobs",)
_ZOO = ("intertwiners.training", "intertwiners.models", "intertwiners.data", "intertwiners.activations")
_FEATURES = ("intertwiners.features", "intertwiners.tracing")


def register(kind: str, description: str, needs: tuple[str, ...] = (), sources: tuple[str, ...] = ()):
    """Decorator: register ``run(config, inputs, context) -> Output`` as the job type ``kind``; ``sources``
    name the modules whose code goes into the job ids (see :meth:`JobType.code_version`)."""
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
    config = json.loads(files["config.json"])
    if str(config.get("arch", "")).startswith("fig3_"):
        from ..dissection.fig3_models import build_fig3_model
        model = build_fig3_model(config["arch"][len("fig3_"):], **config.get("kwargs", {}))
    else:
        model = models.build(config)
    model.load_state_dict(load(files["model.safetensors"]))
    return model.eval()


def _device(context: dict) -> str:
    return context.get("device") or "auto"


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


@register("zoo", "train one model (intertwiners.training.train_one) and keep its weights",
          sources=_ENGINE + _ZOO)
def run_zoo(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``arch``, ``dataset``, ``seed``, ``epochs`` (null: the recipe's), ``arch_kwargs``."""
    from ..training import train_one

    data = dataset(config["dataset"], context)
    model, metrics = train_one(config["arch"], config["dataset"], int(config["seed"]), epochs=config.get("epochs"),
                               device=_device(context), progress=False, data=data,
                               **config.get("arch_kwargs", {}))
    metrics.pop("wall_time_s", None)  # timing lives in the row, results stay deterministic
    return Output(metrics, model_files(model))


@register("stitch", "a stitching penalty for one (front, back) pair, site and kind (Fig. 1, D.3)",
          needs=("intertwiners.stitching:stitch",), sources=_ENGINE + ("intertwiners.stitching",) + _FEATURES)
def run_stitch(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``site``, ``kind``, ``rank``, ``epochs``, ``seed``, ``dataset``, ``settings`` (default
    ``"default"``); deps ``front``, ``back`` (zoo jobs). Result: the accuracies and the penalty (eq. 4.3)."""
    from ..stitching import stitch

    train, test = dataset(config["dataset"], context)
    front = model_from_files(inputs["front"].files)
    back = model_from_files(inputs["back"].files)
    r = stitch(front, back, config["site"], config["kind"], train, test, epochs=config["epochs"],
               rank=config.get("rank"), seed=int(config.get("seed", 0)), settings=config.get("settings", "default"),
               device=_device(context), front_accuracy=inputs["front"].result.get("test_accuracy"),
               back_accuracy=inputs["back"].result.get("test_accuracy"), keep_model=False)
    row = r.as_row()
    row.pop("seconds", None)
    return Output(row)


@register("rotation_penalty", "fixed transform before an activation, then fine-tuning (Fig. 4)",
          needs=("intertwiners.rotation_penalty:rotation_penalty",),
          sources=_ENGINE + ("intertwiners.rotation_penalty", "intertwiners.groups"))
def run_rotation_penalty(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``layer``, ``transform`` (grelu | orthogonal | ...), ``seed``, ``epochs``, ``dataset``;
    dep ``model`` (a zoo job). Result: baseline, transformed and fine-tuned accuracies and the penalty."""
    from ..rotation_penalty import rotation_penalty

    train, test = dataset(config["dataset"], context)
    model = model_from_files(inputs["model"].files)
    r = rotation_penalty(model, config["layer"], config["transform"], train, test, epochs=int(config["epochs"]),
                         seed=int(config["seed"]), device=_device(context))
    r.pop("wall_time_s", None)
    return Output(r)


def _pair(config: dict, inputs: dict[str, Dependency], context: dict):
    _, test = dataset(config["dataset"], context)
    return model_from_files(inputs["a"].files), model_from_files(inputs["b"].files), test


@register("procrustes", "G_ReLU and orthogonal Procrustes similarity per layer for one pair (Table 2)",
          needs=("intertwiners.similarity:procrustes_per_layer",),
          sources=_ENGINE + ("intertwiners.similarity",) + _FEATURES)
def run_procrustes(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``sites``, ``groups``, ``max_samples``, ``dataset``; deps ``a``, ``b``. Result: per group a
    list of similarities, one per site (features: activation outputs on test images, eval mode, channels
    as columns), through :func:`intertwiners.similarity.procrustes_per_layer`."""
    from ..similarity import procrustes_per_layer

    a, b, test = _pair(config, inputs, context)
    table = procrustes_per_layer(a, b, test, sites=config["sites"], groups=tuple(config["groups"]),
                                 max_samples=config.get("max_samples"), device=_device(context))
    sites = list(table)
    return Output({"sites": sites, **{g: [float(table[s][g]) for s in sites] for g in config["groups"]}})


CKA_MEASURES = {"linear": "cka", "grelu": "grelu_cka"}


@register("cka", "layer x layer G_ReLU-CKA and linear CKA matrices for one pair (Figs. 2 and 5)",
          needs=("intertwiners.similarity:layer_similarity_matrix",),
          sources=_ENGINE + ("intertwiners.similarity",) + _FEATURES)
def run_cka(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``measures`` (linear | grelu), ``sites`` (null: every activation site), ``max_samples``,
    ``dataset``; deps ``a``, ``b``. Result: ``{"sites": [...], measure: matrix[i][j] = CKA(a_i, b_j)}``
    (minibatch CKA with the unbiased HSIC, :func:`intertwiners.similarity.layer_similarity_matrix`)."""
    from ..similarity import layer_similarity_matrix

    a, b, test = _pair(config, inputs, context)
    result: dict = {}
    for measure in config["measures"]:
        matrix, sites, _ = layer_similarity_matrix(
            a, b, test, sites_a=config.get("sites"), sites_b=config.get("sites"), measure=CKA_MEASURES[measure],
            max_samples=config.get("max_samples"), device=_device(context), return_sites=True)
        result["sites"] = list(sites)
        result[measure] = [[float(v) for v in row] for row in matrix]
    return Output(result)


_BRODEN_CACHE: dict[tuple, str] = {}


def _synthetic_broden(config: dict) -> str:
    """A synthetic Broden-layout dataset for ``config`` (n_images, image_size, data_seed), made once per worker."""
    import tempfile

    from ..dissection import make_synthetic_broden

    key = (int(config["n_images"]), int(config.get("image_size", 32)), int(config.get("data_seed", 0)))
    if key not in _BRODEN_CACHE:
        root = tempfile.mkdtemp(prefix="intertwiners-broden-")
        make_synthetic_broden(root, n_images=key[0], seed=key[2], image_size=key[1])
        _BRODEN_CACHE[key] = root
    return _BRODEN_CACHE[key]


@register("dissection_model", "train a Fig. 3 model on the synthetic Broden-layout dataset",
          needs=("intertwiners.dissection.experiment:train_fig3_model",),
          sources=_ENGINE + ("intertwiners.dissection",))
def run_dissection_model(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``arch`` (resnet | resnet_noact | convnext), ``n_images``, ``image_size``, ``data_seed``,
    ``steps``, ``seed``. Result: training and probe-split accuracies; files: the model."""
    from ..dissection import BrodenDataset
    from ..dissection.experiment import synthetic_training_data, train_fig3_model
    from ..training import accuracy

    root = _synthetic_broden(config)
    train = synthetic_training_data(BrodenDataset(root, split="train"))
    probe = synthetic_training_data(BrodenDataset(root, split="val"))
    model, metrics = train_fig3_model(config["arch"], train, steps=int(config["steps"]), seed=int(config["seed"]),
                                      device=_device(context))
    metrics = {k: v for k, v in metrics.items() if k != "wall_time_s"}
    result = {"arch": config["arch"], **metrics, "probe_accuracy": float(accuracy(model, probe, _device(context)))}
    return Output(result, model_files(model))


@register("dissection", "interpretable units of one site in rotated bases Q**alpha (Fig. 3)",
          needs=("intertwiners.dissection.experiment:rotation_curve",),
          sources=_ENGINE + ("intertwiners.dissection",))
def run_dissection(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``site``, ``layer`` (description), ``alphas``, ``n_rotations``, ``quantile``, ``iou_threshold``,
    ``seed`` and the dataset keys of ``dissection_model``; dep ``model``. Result: one row per (alpha,
    rotation) with the fraction of interpretable units, and whether the site is an activation."""
    from ..dissection import BrodenDataset
    from ..dissection.experiment import rotation_curve

    root = _synthetic_broden(config)
    probe = BrodenDataset(root, split="val")
    model = model_from_files(inputs["model"].files)
    rows = rotation_curve(model, config["site"], probe, config["alphas"], int(config["n_rotations"]),
                          seed=int(config["seed"]), quantile=float(config["quantile"]),
                          iou_threshold=float(config["iou_threshold"]), device=_device(context))
    keep = ("alpha", "rotation", "n_units", "interpretable_units", "fraction", "unique_concepts")
    return Output({"site": config["site"], "layer": config["layer"],
                   "activation_at_site": str(config["layer"]).startswith("relu"),
                   "rows": [{k: r[k] for k in keep} for r in rows]})
