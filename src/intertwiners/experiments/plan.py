"""The reproduction plans: which jobs make up each scale (``smoke``, ``small``, ``paper``).

* ``smoke``: a tiny zoo, few epochs, one or two pairs: every experiment once, < 5 min on 2 cores (digits).
* ``small``: more seeds, pairs and epochs: the paper's shapes with visible error bars, < 30 min on 2 cores.
* ``paper``: the paper's settings (CIFAR-10, width-64 Myrtle CNNs, 50 epochs, 32 distinct pairs, 10
  rotation repeats, 20 stitching epochs): for a GPU or a Ray cluster.
* ``test`` (hidden): a handful of ``probe`` jobs for the machinery's own tests.

An experiment whose library module is not installed is left out and named in ``Plan.missing``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field, replace

from .jobs import JOB_TYPES, Job

SCALES = ("smoke", "small", "paper")

MYRTLE_SITES = ("relu1", "relu2", "relu3", "relu4")
# ResNet20 sites at the residual outputs (relu2 after each add) and inside blocks (relu1), for D.3.
RESNET_D3_SITES = ("layer1.1.relu2", "layer2.1.relu2", "layer3.1.relu2")


@dataclass(frozen=True)
class Scale:
    """Every knob of a plan. ``None`` epochs mean the dataset's training recipe (digits 12, CIFAR-10 50)."""

    name: str
    dataset: str = "digits"
    # the Myrtle CNN zoo (Fig. 1, Table 2, Fig. 5)
    mcnn_width: int | None = None
    mcnn_seeds: int = 3
    mcnn_epochs: int | None = None
    stitch_pairs: int = 1
    stitch_sites: tuple[str, ...] = MYRTLE_SITES
    stitch_kinds: tuple[str, ...] = ("full", "low_rank:1", "low_rank:4", "grelu")
    stitch_epochs: int = 2
    stitch_settings: str = "default"  # intertwiners.stitching SETTINGS: "default" (Adam) or "authors" (SGD)
    similarity_pairs: int = 1
    cka_pairs: int = 1
    max_samples: int = 2000  # test images used for Procrustes/CKA features
    # rotation penalty (Fig. 4): Myrtle CNN without batch norm
    rotation_layers: tuple[str, ...] = ("conv1", "conv2", "conv3")
    rotation_transforms: tuple[str, ...] = ("grelu", "orthogonal")
    rotation_repeats: int = 1
    rotation_epochs: int | None = 2
    rotation_activations: tuple[str, ...] = ("relu",)  # "sigmoid" too: P·D is then no symmetry (control)
    sigmoid_epochs: int | None = None  # the sigmoid base model's epochs (None: mcnn_epochs); it trains slowly
    # ResNet20 with LeakyReLU slopes (appendix D.3) and ResNet20 CKA (Fig. 2)
    resnet_seeds: int = 2
    resnet_epochs: int | None = 3
    resnet_widths: tuple[int, int, int] | None = None  # None: the paper's 16/32/64
    slopes: tuple[float, ...] = (0.0, 1.0)
    slope_pairs: int = 1
    slope_sites: tuple[str, ...] = RESNET_D3_SITES[:2]
    slope_kinds: tuple[str, ...] = ("full", "grelu")
    resnet_cka_pairs: int = 1
    # dissection under rotation (Fig. 3)
    dissection_models: tuple[str, ...] = ("resnet", "resnet_noact", "convnext")
    dissection_alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    dissection_rotations: int = 1
    dissection_images: int = 200
    dissection_steps: int = 150
    seed: int = 0  # draws the pairs

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Scale] = {
    "smoke": Scale("smoke", mcnn_epochs=6, resnet_epochs=5),
    "small": Scale(
        "small", mcnn_seeds=6, mcnn_epochs=12, stitch_pairs=4, stitch_epochs=4,
        stitch_kinds=("full", "low_rank:1", "low_rank:2", "low_rank:4", "grelu"),
        similarity_pairs=6, cka_pairs=3, rotation_repeats=3, rotation_epochs=6,
        rotation_activations=("relu", "sigmoid"), rotation_transforms=("grelu", "orthogonal", "identity"),
        sigmoid_epochs=30, resnet_seeds=4, resnet_epochs=6, slopes=(0.0, 0.1, 0.5, 0.9, 1.0), slope_pairs=2,
        slope_sites=RESNET_D3_SITES, resnet_cka_pairs=2,
        dissection_alphas=(0.0, 0.25, 0.5, 0.75, 1.0), dissection_rotations=3, dissection_images=800,
        dissection_steps=1500),
    "paper": Scale(
        "paper", dataset="cifar10", mcnn_width=64, mcnn_seeds=16, mcnn_epochs=None, stitch_pairs=32,
        stitch_kinds=("full", "low_rank:1", "low_rank:2", "low_rank:4", "grelu"), stitch_epochs=20,
        stitch_settings="authors",
        similarity_pairs=32, cka_pairs=16, max_samples=2000, rotation_repeats=10, rotation_epochs=50,
        rotation_activations=("relu", "sigmoid"), rotation_transforms=("grelu", "orthogonal", "identity"),
        resnet_seeds=8, resnet_epochs=None, slopes=(0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), slope_pairs=4,
        slope_sites=RESNET_D3_SITES, resnet_cka_pairs=16,
        dissection_alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), dissection_rotations=5, dissection_images=1600,
        dissection_steps=2000),
}


@dataclass
class Plan:
    """The jobs of one scale, the experiments left out (name -> reason) and a description."""

    name: str
    jobs: list[Job]
    missing: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def draw_pairs(n_models: int, n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """``n_pairs`` distinct unordered pairs of model indices, drawn without repetition (seeded).

    When fewer pairs exist than asked for, all of them are returned.
    """
    everything = list(itertools.combinations(range(n_models), 2))
    if n_pairs >= len(everything):
        return everything
    return sorted(random.Random(seed).sample(everything, n_pairs))


def activation_of_slope(slope: float) -> str:
    """``relu`` for slope 0, else ``leaky_relu:<slope>``."""
    return "relu" if slope == 0 else f"leaky_relu:{float(slope)}"


def _missing(kind: str) -> str | None:
    if kind not in JOB_TYPES:
        return f"job type {kind!r} is not implemented yet"
    return JOB_TYPES[kind].missing()


def zoo_job(arch: str, dataset: str, seed: int, epochs: int | None, **arch_kwargs) -> Job:
    tag = "-".join(f"{k}={v}" for k, v in sorted(arch_kwargs.items()))
    label = f"zoo {arch}{'-' + tag if tag else ''} {dataset} seed{seed}"
    return Job("zoo", {"arch": arch, "dataset": dataset, "seed": seed, "epochs": epochs,
                       "arch_kwargs": arch_kwargs}, label=label)


def build_plan(scale: str | Scale = "smoke", dataset: str | None = None) -> Plan:
    """The jobs of ``scale`` (a preset name or a :class:`Scale`), optionally on another ``dataset``."""
    if isinstance(scale, str):
        if scale == "test":
            return probe_plan()
        if scale not in PRESETS:
            raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
        scale = PRESETS[scale]
    if dataset is not None and dataset != scale.dataset:
        scale = replace(scale, dataset=dataset, mcnn_width=scale.mcnn_width if dataset == "digits" else 64)
    s = scale
    jobs: list[Job] = []
    missing: dict[str, str] = {}
    mcnn_kwargs = {} if s.mcnn_width is None else {"width": s.mcnn_width}
    # Fig. 3: dissection under rotation. Listed first: its models train longest, so they start early and
    # overlap with the rest (job ids do not depend on the order).
    reason = _missing("dissection") or _missing("dissection_model")
    if reason:
        missing["fig3_dissection"] = reason
    else:
        jobs += dissection_jobs(s)

    mcnn = [zoo_job("myrtle_cnn", s.dataset, k, s.mcnn_epochs, **mcnn_kwargs) for k in range(s.mcnn_seeds)]
    jobs += mcnn

    # Fig. 1: stitching penalties, Myrtle CNN pairs x sites x kinds
    reason = _missing("stitch")
    if reason:
        missing["fig1_stitching"] = reason
    else:
        for a, b in draw_pairs(len(mcnn), s.stitch_pairs, s.seed):
            for site in s.stitch_sites:
                for kind in s.stitch_kinds:
                    jobs.append(stitch_job("fig1", mcnn[a], mcnn[b], site, kind, s))

    # Table 2: Procrustes per layer; Fig. 5: CKA heatmaps (Myrtle CNN)
    reason = _missing("procrustes")
    if reason:
        missing["table2_procrustes"] = reason
    else:
        for a, b in draw_pairs(len(mcnn), s.similarity_pairs, s.seed + 1):
            jobs.append(Job("procrustes", {"experiment": "table2", "sites": list(MYRTLE_SITES),
                                           "groups": ["grelu", "orthogonal"], "max_samples": s.max_samples,
                                           "dataset": s.dataset},
                            {"a": mcnn[a], "b": mcnn[b]}, label=f"procrustes mcnn {a}-{b}"))
    reason = _missing("cka")
    if reason:
        missing["fig5_cka_mcnn"] = reason
    else:
        for a, b in draw_pairs(len(mcnn), s.cka_pairs, s.seed + 2):
            jobs.append(cka_job("fig5", mcnn[a], mcnn[b], s, f"mcnn {a}-{b}"))

    # Fig. 4: rotation penalty on the Myrtle CNN without batch norm
    reason = _missing("rotation_penalty")
    if reason:
        missing["fig4_rotation_penalty"] = reason
    else:
        for act in s.rotation_activations:
            base_kwargs = {**mcnn_kwargs, "batch_norm": False, **({} if act == "relu" else {"activation": act})}
            epochs = s.sigmoid_epochs if act == "sigmoid" and s.sigmoid_epochs else s.mcnn_epochs
            base = zoo_job("myrtle_cnn", s.dataset, 0, epochs, **base_kwargs)
            tag = {} if act == "relu" else {"activation": act}  # relu keeps the ids of earlier plans
            for layer in s.rotation_layers:
                for transform in s.rotation_transforms:
                    for r in range(s.rotation_repeats):
                        jobs.append(Job("rotation_penalty", {
                            "experiment": "fig4", "layer": layer, "transform": transform, "seed": r,
                            "epochs": s.rotation_epochs, "dataset": s.dataset, **tag},
                            {"model": base}, label=f"rotation {act} {layer} {transform} r{r}"))

    # Appendix D.3: ResNet20 with LeakyReLU slopes, stitching; Fig. 2: ResNet20 (ReLU) CKA
    want_d3 = _missing("stitch") is None
    want_fig2 = _missing("cka") is None
    if not want_d3:
        missing["d3_leaky_relu_sweep"] = _missing("stitch")
    if not want_fig2:
        missing["fig2_cka_resnet20"] = _missing("cka")
    if want_d3 or want_fig2:
        for slope in (s.slopes if want_d3 else (0.0,)):
            widths = {} if s.resnet_widths is None else {"widths": list(s.resnet_widths)}
            resnets = [zoo_job("resnet20", s.dataset, k, s.resnet_epochs, activation=activation_of_slope(slope),
                               **widths) for k in range(s.resnet_seeds)]
            if want_d3:
                for a, b in draw_pairs(len(resnets), s.slope_pairs, s.seed + 3):
                    for site in s.slope_sites:
                        for kind in s.slope_kinds:
                            jobs.append(stitch_job("d3", resnets[a], resnets[b], site, kind, s,
                                                   extra={"slope": float(slope)}))
            if want_fig2 and slope == 0.0:
                for a, b in draw_pairs(len(resnets), s.resnet_cka_pairs, s.seed + 4):
                    jobs.append(cka_job("fig2", resnets[a], resnets[b], s, f"resnet20 {a}-{b}"))

    return Plan(s.name, jobs, missing, {"scale": s.as_dict()})


def stitch_job(experiment: str, front: Job, back: Job, site: str, kind: str, s: Scale,
               extra: dict | None = None) -> Job:
    """One stitching penalty: ``kind`` is a stitching kind, ``low_rank:R`` for rank R."""
    base, _, rank = kind.partition(":")
    config = {"experiment": experiment, "site": site, "kind": base, "rank": int(rank) if rank else None,
              "epochs": s.stitch_epochs, "seed": 0, "dataset": s.dataset, "settings": s.stitch_settings,
              **(extra or {})}
    label = f"stitch {experiment} {front.config['seed']}-{back.config['seed']} {site} {kind}"
    if extra and "slope" in extra:
        label += f" slope={extra['slope']}"
    return Job("stitch", config, {"front": front, "back": back}, label=label)


def cka_job(experiment: str, a: Job, b: Job, s: Scale, name: str) -> Job:
    return Job("cka", {"experiment": experiment, "measures": ["linear", "grelu"], "max_samples": s.max_samples,
                       "dataset": s.dataset}, {"a": a, "b": b}, label=f"cka {experiment} {name}")


def dissection_jobs(s: Scale) -> list[Job]:
    """One training job per Fig. 3 model and one dissection job per (model, probed site), all alphas at once."""
    from ..dissection.experiment import DEFAULT_SITES

    data = {"n_images": s.dissection_images, "image_size": 32, "data_seed": 0}
    jobs = []
    for arch in s.dissection_models:
        model = Job("dissection_model", {**data, "arch": arch, "steps": s.dissection_steps, "seed": 0},
                    label=f"dissection model {arch}")
        for site, layer in DEFAULT_SITES.get(arch, []):
            jobs.append(Job("dissection", {
                **data, "experiment": "fig3", "site": site, "layer": layer, "alphas": list(s.dissection_alphas),
                "n_rotations": s.dissection_rotations, "quantile": 0.05, "iou_threshold": 0.1, "seed": 0},
                {"model": model}, label=f"dissection {arch} {site}"))
    return jobs


def probe_plan(sleep_s: float = 0.3, n: int = 8) -> Plan:
    """A diamond-and-chain of ``probe`` jobs (for the machinery's tests; ``--scale test``)."""
    roots = [Job("probe", {"name": f"root{k}", "seed": k, "sleep_s": sleep_s, "file": True}, label=f"root{k}")
             for k in range(n // 2)]
    jobs = list(roots)
    for k in range(n // 2):
        deps = {"a": roots[k], "b": roots[(k + 1) % len(roots)]}
        jobs.append(Job("probe", {"name": f"child{k}", "seed": 10 + k, "sleep_s": sleep_s}, deps,
                        label=f"child{k}"))
    jobs.append(Job("probe", {"name": "sink", "seed": 100, "sleep_s": 0.0},
                    {f"c{k}": j for k, j in enumerate(jobs[len(roots):])}, label="sink"))
    return Plan("test", jobs, {}, {"scale": {"name": "test", "sleep_s": sleep_s, "n": n}})
