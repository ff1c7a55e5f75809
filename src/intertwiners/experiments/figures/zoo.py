"""The model zoo: trained Myrtle CNNs and ResNet20s shared by the other experiments, and its accuracy table.

A ``zoo`` job trains the models of one group -- one architecture, dataset and setting, several seeds --
together (:func:`intertwiners.training.train_many`: each as it would train alone). Each model is a
:class:`~intertwiners.experiments.jobs.Part` of its job (``seed<k>``): a job that depends on one model sees
that model's files and metrics only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ...stats import mean_ci
from ..jobs import Dependency, Job, Output, Part, parts_output, register
from .common import Section, dataset, device, fmt, model_files, table

PAPER_ACCURACY = {"myrtle_cnn": 91.4, "myrtle_cnn-batch_norm=False": 87.4, "resnet20": 89.9}


@dataclass(frozen=True)
class Settings:
    """The zoo's models: Myrtle CNNs (Fig. 1, Table 2, Fig. 5, the extension) and ReLU ResNet20s (Fig. 2, the
    extension). ``*_epochs``: the most epochs (``None``: the dataset's recipe); ``patience``: the convergence
    criterion (:class:`intertwiners.training.Convergence`; ``None``: the recipe's)."""

    dataset: str = "digits"
    mcnn_width: int | None = None          # None: the dataset's default (16 on digits)
    mcnn_seeds: int = 3
    mcnn_epochs: int | None = None
    resnet_seeds: int = 2
    resnet_epochs: int | None = 3
    resnet_widths: tuple[int, int, int] | None = None   # None: the paper's 16/32/64
    patience: int | None = None

    def for_dataset(self, name: str) -> Settings:
        from dataclasses import replace

        return replace(self, dataset=name, mcnn_width=self.mcnn_width if name.startswith("digits") else 64)


PRESETS = {
    "smoke": Settings(mcnn_epochs=2, resnet_epochs=2, resnet_widths=(8, 16, 32)),
    # ResNet20 widths 8/16/32 on digits (as the Myrtle CNNs' 16 instead of 64): half the compute of 16/32/64
    # Myrtle CNNs 10 epochs at most (12 before): five of six seeds stopped by the criterion at 8-10 anyway; the
    # sixth's best epoch becomes 8 instead of 11, at the same test accuracy (docs/reproduce.md, "Sized to the claims")
    "small": Settings(mcnn_seeds=6, mcnn_epochs=10, resnet_seeds=4, resnet_epochs=6, resnet_widths=(8, 16, 32)),
    "paper": Settings(dataset="cifar10", mcnn_width=64, mcnn_seeds=16, resnet_seeds=8, resnet_epochs=None),
}


def zoo_job(arch: str, dataset_name: str, seeds, epochs: int | None, patience: int | None = None,
            **arch_kwargs) -> Job:
    """One group: ``arch`` on ``dataset_name`` with ``arch_kwargs``, one model per seed, trained together."""
    seeds = [int(s) for s in seeds]
    tag = "-".join(f"{k}={v}" for k, v in sorted(arch_kwargs.items()))
    label = f"zoo {arch}{'-' + tag if tag else ''} {dataset_name} seeds {','.join(map(str, seeds))}"
    return Job("zoo", {"arch": arch, "dataset": dataset_name, "seeds": seeds, "epochs": epochs,
                       "patience": patience, "arch_kwargs": arch_kwargs}, label=label)


def models_of(job: Job) -> list[Part]:
    """The models of a zoo job, one :class:`Part` per seed."""
    return [job.part(f"seed{k}") for k in job.config["seeds"]]


def mcnn_kwargs(s: Settings) -> dict:
    return {} if s.mcnn_width is None else {"width": s.mcnn_width}


def myrtle_zoo(scale) -> list[Part]:
    """The Myrtle CNNs (with batch norm) of Fig. 1, Table 2 and Fig. 5, one per seed."""
    z = scale.zoo
    return models_of(zoo_job("myrtle_cnn", z.dataset, range(z.mcnn_seeds), z.mcnn_epochs, z.patience,
                             **mcnn_kwargs(z)))


def activation_of_slope(slope: float) -> str:
    """``relu`` for slope 0, else ``leaky_relu:<slope>``."""
    return "relu" if slope == 0 else f"leaky_relu:{float(slope)}"


def resnet_zoo(scale, slope: float, dataset_name: str | None = None) -> list[Part]:
    """The ResNet20s with LeakyReLU ``slope`` (0: ReLU) on ``dataset_name`` (default: the zoo's), one per seed
    (appendix D.3 and Fig. 2)."""
    z = scale.zoo
    widths = {} if z.resnet_widths is None else {"widths": list(z.resnet_widths)}
    return models_of(zoo_job("resnet20", dataset_name or z.dataset, range(z.resnet_seeds), z.resnet_epochs,
                             z.patience, activation=activation_of_slope(slope), **widths))


@register("zoo", "train a group of models together (intertwiners.training.train_many) and keep their weights")
def run_zoo(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``arch``, ``dataset``, ``seeds``, ``epochs`` (the most; null: the recipe's), ``patience`` (null:
    the recipe's), ``arch_kwargs``. Output: one part per seed (``seed<k>``: metrics, model files)."""
    from ...training import RECIPES, train_many

    data = dataset(config["dataset"], context)
    patience = config.get("patience")
    if patience is None:
        patience = RECIPES.get(config["dataset"], RECIPES["cifar10"]).patience
    trained = train_many(config["arch"], config["dataset"], config["seeds"], epochs=config.get("epochs"),
                         patience=patience, device=device(context), progress=False, data=data,
                         **config.get("arch_kwargs", {}))
    parts = {}
    for seed, (model, metrics) in zip(config["seeds"], trained):
        metrics.pop("wall_time_s", None)  # timing lives in the row, results stay deterministic
        parts[f"seed{seed}"] = Output(metrics, model_files(model))
    return parts_output(parts)


def members(row) -> list[dict]:
    """The per-model metrics of a stored zoo row."""
    return list(row.result.get("parts", {}).values())


def section(view, figdir) -> Section:
    title = "Model zoo"
    rows = view.rows(kind="zoo", status="done")
    if not rows:
        return Section(title, "No trained models in the database.")
    groups: dict[tuple, list] = defaultdict(list)
    paper: dict[tuple, float | None] = {}
    for r in rows:
        kw = r.config.get("arch_kwargs", {})
        tag = "-".join(f"{k}={v}" for k, v in sorted(kw.items()) if k != "width")
        key = (r.config["arch"], tag, r.config["dataset"])
        groups[key] += members(r)
        # the paper's accuracy of the architecture (ReLU; with or without batch norm), whatever its widths
        ref_key = r.config["arch"] + ("-batch_norm=False" if kw.get("batch_norm", True) is False else "")
        paper[key] = PAPER_ACCURACY.get(ref_key) if kw.get("activation", "relu") == "relu" else None
    out = []
    for (arch, tag, ds), ms in sorted(groups.items()):
        iv = mean_ci(m["test_accuracy"] for m in ms)
        ref = paper[(arch, tag, ds)]
        epochs = sorted({m.get("epochs") for m in ms if m.get("epochs") is not None})
        ran = "–" if not epochs else (str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}")
        out.append([arch, tag or "default", ds, iv.n, fmt(iv, 1), ran, ms[0].get("max_epochs", "–"),
                    f"{ref} (CIFAR-10)" if ref else "–"])
    return Section(title, "Test accuracy (%) of the trained models (mean ± 95% t-interval over seeds; one seed "
                   "has no interval). Each model trains until its validation split (10% of the training set) has "
                   "not improved for the recipe's patience, at most the epochs shown.\n\n"
                   + table(["architecture", "variant", "dataset", "models", "test accuracy", "epochs run",
                            "at most", "paper"], out))


KINDS = ("zoo",)


def jobs(scale) -> list[Job]:
    """The Myrtle CNN zoo (the other zoos come with the experiments that use them)."""
    return [p.job for p in myrtle_zoo(scale)][:1]
