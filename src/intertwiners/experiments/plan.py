"""The reproduction plans: which jobs make up each scale (``smoke``, ``small``, ``paper``).

* ``smoke``: a tiny zoo, few epochs, one or two pairs: every experiment once, < 5 min on 2 cores (digits).
* ``small``: more seeds, pairs and epochs: the paper's shapes with visible error bars, < 30 min on 2 cores.
* ``paper``: the paper's settings (CIFAR-10, width-64 Myrtle CNNs, 50 epochs, 32 distinct pairs, 10
  rotation repeats, 20 stitching epochs): for a GPU or a Ray cluster.
* ``test`` (hidden): a handful of ``probe`` jobs for the machinery's own tests.

An experiment whose library module is not installed is left out and named in ``Plan.missing``. The jobs
of each experiment come from its module in :mod:`intertwiners.experiments.figures` (``jobs(scale)``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field, replace

from .figures import EXPERIMENTS  # importing the experiment modules registers their job types
from .jobs import JOB_TYPES, Job

SCALES = ("smoke", "small", "paper")

MYRTLE_SITES = ("relu1", "relu2", "relu3", "relu4")
# ResNet20 sites at the residual outputs (relu2 after each add) and inside blocks (relu1), for D.3.
RESNET_D3_SITES = ("layer1.1.relu2", "layer2.1.relu2", "layer3.1.relu2")
ALIGN_VARIANTS_ACTIVATIONS = ("none", "permutation (activations)", "full group (activations)",
                              "full group + REPAIR (activations)")
ALIGN_VARIANTS = ALIGN_VARIANTS_ACTIVATIONS + ("permutation (weights)", "full group (weights)",
                                               "full group + REPAIR (weights)")


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
    # extension beyond the paper: interpolation barriers of zoo pairs before/after alignment (Myrtle, ResNet20)
    align_pairs: int = 1  # per architecture
    align_alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    align_variants: tuple[str, ...] = ALIGN_VARIANTS_ACTIVATIONS
    align_samples: int = 256  # training images for the activation and batch-norm statistics
    # null calibration of Table 2 and Figs. 5/2: permutation tests of the same-layer similarity
    permutations: int = 200
    permutation_samples: int = 300  # test images in each permutation test (full Gram matrices: O(N^2))
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
        dissection_steps=1500, permutations=500, permutation_samples=400, align_pairs=2,
        align_alphas=(0.0, 0.25, 0.5, 0.75, 1.0), align_variants=ALIGN_VARIANTS_ACTIVATIONS, align_samples=500),
    "paper": Scale(
        "paper", dataset="cifar10", mcnn_width=64, mcnn_seeds=16, mcnn_epochs=None, stitch_pairs=32,
        stitch_kinds=("full", "low_rank:1", "low_rank:2", "low_rank:4", "grelu"), stitch_epochs=20,
        stitch_settings="authors",
        similarity_pairs=32, cka_pairs=16, max_samples=2000, rotation_repeats=10, rotation_epochs=50,
        rotation_activations=("relu", "sigmoid"), rotation_transforms=("grelu", "orthogonal", "identity"),
        resnet_seeds=8, resnet_epochs=None, slopes=(0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), slope_pairs=4,
        slope_sites=RESNET_D3_SITES, resnet_cka_pairs=16,
        dissection_alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), dissection_rotations=5, dissection_images=1600,
        dissection_steps=2000, permutations=1000, permutation_samples=1000, align_pairs=4,
        align_alphas=tuple(i / 10 for i in range(11)), align_variants=ALIGN_VARIANTS, align_samples=5000),
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


def _missing(kind: str) -> str | None:
    if kind not in JOB_TYPES:
        return f"job type {kind!r} is not implemented yet"
    return JOB_TYPES[kind].missing()


def build_plan(scale: str | Scale = "smoke", dataset: str | None = None) -> Plan:
    """The jobs of ``scale`` (a preset name or a :class:`Scale`), optionally on another ``dataset``: the
    fragments of every experiment module whose job types can run here, each job once."""
    if isinstance(scale, str):
        if scale == "test":
            return probe_plan()
        if scale not in PRESETS:
            raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
        scale = PRESETS[scale]
    if dataset is not None and dataset != scale.dataset:
        scale = replace(scale, dataset=dataset, mcnn_width=scale.mcnn_width if dataset == "digits" else 64)
    jobs: dict[str, Job] = {}
    missing: dict[str, str] = {}
    for name, module in EXPERIMENTS:
        reason = next((r for r in map(_missing, module.KINDS) if r), None)
        if reason:
            missing[name] = reason
            continue
        for job in module.jobs(scale):
            jobs.setdefault(job.id, job)
    return Plan(scale.name, list(jobs.values()), missing, {"scale": scale.as_dict()})


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
