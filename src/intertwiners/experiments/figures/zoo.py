"""The model zoo: trained Myrtle CNNs and ResNet20s shared by the other experiments, and its accuracy table."""

from __future__ import annotations

from collections import defaultdict

from ...stats import mean_ci
from ..jobs import Dependency, Job, Output, register
from .common import COMMON, Section, dataset, device, fmt, model_files, table

PAPER_ACCURACY = {"myrtle_cnn": 91.4, "myrtle_cnn-batch_norm=False": 87.4, "resnet20": 89.9}
ZOO_SOURCES = ("intertwiners.training", "intertwiners.models", "intertwiners.data", "intertwiners.activations")


def zoo_job(arch: str, dataset_name: str, seed: int, epochs: int | None, **arch_kwargs) -> Job:
    tag = "-".join(f"{k}={v}" for k, v in sorted(arch_kwargs.items()))
    label = f"zoo {arch}{'-' + tag if tag else ''} {dataset_name} seed{seed}"
    return Job("zoo", {"arch": arch, "dataset": dataset_name, "seed": seed, "epochs": epochs,
                       "arch_kwargs": arch_kwargs}, label=label)


def mcnn_kwargs(s) -> dict:
    return {} if s.mcnn_width is None else {"width": s.mcnn_width}


def myrtle_zoo(s) -> list[Job]:
    """The Myrtle CNNs (with batch norm) of Fig. 1, Table 2 and Fig. 5, one per seed."""
    return [zoo_job("myrtle_cnn", s.dataset, k, s.mcnn_epochs, **mcnn_kwargs(s)) for k in range(s.mcnn_seeds)]


def activation_of_slope(slope: float) -> str:
    """``relu`` for slope 0, else ``leaky_relu:<slope>``."""
    return "relu" if slope == 0 else f"leaky_relu:{float(slope)}"


def resnet_zoo(s, slope: float) -> list[Job]:
    """The ResNet20s with LeakyReLU ``slope`` (0: ReLU) of appendix D.3 and Fig. 2."""
    widths = {} if s.resnet_widths is None else {"widths": list(s.resnet_widths)}
    return [zoo_job("resnet20", s.dataset, k, s.resnet_epochs, activation=activation_of_slope(slope), **widths)
            for k in range(s.resnet_seeds)]


@register("zoo", "train one model (intertwiners.training.train_one) and keep its weights",
          sources=(COMMON, "intertwiners.experiments.figures.zoo:run_zoo") + ZOO_SOURCES)
def run_zoo(config: dict, inputs: dict[str, Dependency], context: dict) -> Output:
    """Config: ``arch``, ``dataset``, ``seed``, ``epochs`` (null: the recipe's), ``arch_kwargs``."""
    from ...training import train_one

    data = dataset(config["dataset"], context)
    model, metrics = train_one(config["arch"], config["dataset"], int(config["seed"]), epochs=config.get("epochs"),
                               device=device(context), progress=False, data=data,
                               **config.get("arch_kwargs", {}))
    metrics.pop("wall_time_s", None)  # timing lives in the row, results stay deterministic
    return Output(metrics, model_files(model))


def section(view, figdir) -> Section:
    title = "Model zoo"
    rows = view.rows(kind="zoo", status="done")
    if not rows:
        return Section(title, "No trained models in the database.")
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        kw = r.config.get("arch_kwargs", {})
        tag = "-".join(f"{k}={v}" for k, v in sorted(kw.items()) if k != "width")
        groups[(r.config["arch"], tag, r.config["dataset"])].append(r)
    out = []
    for (arch, tag, ds), rs in sorted(groups.items()):
        iv = mean_ci(r.result["test_accuracy"] for r in rs)
        ref_key = arch + ("-batch_norm=False" if "batch_norm=False" in tag else "")
        ref = PAPER_ACCURACY.get(ref_key) if "activation" not in tag or "activation=relu" == tag else None
        out.append([arch, tag or "default", ds, iv.n, fmt(iv, 1), rs[0].result.get("epochs", "–"),
                    f"{ref} (CIFAR-10)" if ref else "–"])
    return Section(title, "Test accuracy (%) of the trained models (mean ± 95% t-interval over seeds; one seed "
                   "has no interval).\n\n"
                   + table(["architecture", "variant", "dataset", "models", "test accuracy", "epochs", "paper"],
                           out))


KINDS = ("zoo",)


def jobs(s) -> list[Job]:
    """The Myrtle CNN zoo (the other zoos come with the experiments that use them)."""
    return myrtle_zoo(s)
