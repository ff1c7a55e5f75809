"""What the paper's experiments share: cached data, model files, report sections, tables, chance checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...stats import Claim, Interval

# ----------------------------------------------------------------------------------------------------------
# job helpers

_DATA_CACHE: dict[tuple, Any] = {}


def dataset(name: str, context: dict):
    """``(train, test)`` for ``name``, cached per worker process."""
    from ...data import load

    key = (name, context.get("data_root"))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load(name, context.get("data_root"))
    return _DATA_CACHE[key]


def device(context: dict) -> str:
    return context.get("device") or "auto"


def model_files(model) -> dict[str, bytes]:
    """A model built by :mod:`intertwiners.models` as ``{"model.safetensors": ..., "config.json": ...}``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    config = json.dumps(model.intertwiners_config, indent=2, sort_keys=True).encode()
    return {"model.safetensors": save(state), "config.json": config}


def model_from_files(files: dict[str, bytes]):
    """Rebuild a model from :func:`model_files` output (safetensors + JSON; never unpickles)."""
    from safetensors.torch import load

    from ... import models

    if "model.safetensors" not in files or "config.json" not in files:
        raise ValueError(f"dependency has no saved model (files: {sorted(files)})")
    config = json.loads(files["config.json"])
    if str(config.get("arch", "")).startswith("fig3_"):
        from ...dissection.fig3_models import build_fig3_model
        model = build_fig3_model(config["arch"][len("fig3_"):], **config.get("kwargs", {}))
    else:
        model = models.build(config)
    model.load_state_dict(load(files["model.safetensors"]))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# report helpers


@dataclass(frozen=True)
class PairSimilaritySettings:
    """What the similarity experiments (Table 2, Figs. 5 and 2) share: ``pairs`` pairs of zoo models, features
    of the first ``max_samples`` test images, permutation tests with ``permutations`` shuffles of the first
    ``permutation_samples`` (0: none)."""

    pairs: int = 1
    max_samples: int = 2000
    permutations: int = 200
    permutation_samples: int = 300


@dataclass
class Section:
    """One section of ``report.md``: a title, its body (figure, tables) and its claims."""

    title: str
    body: str
    claims: list[Claim] = field(default_factory=list)
    datasets: tuple[str, ...] = ()     # what its results were measured on (:func:`datasets_of`)

    def text(self) -> str:
        lines = "".join(c.line() + "\n" for c in self.claims)
        data = f"Data: {', '.join(f'`{d}`' for d in self.datasets)}.\n\n" if self.datasets else ""
        return f"## {self.title}\n\n{data}{self.body.rstrip()}\n" + (f"\n{lines}" if lines else "")


def datasets_of(rows) -> tuple[str, ...]:
    """The datasets stored job rows ran on (their configs' ``dataset``), sorted: what a section names."""
    return tuple(sorted({r.config["dataset"] for r in rows if isinstance(r.config.get("dataset"), str)}))


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(iv: Interval, digits: int = 2) -> str:
    return iv.text(digits)


CHANCE_MARGIN = 10.0   # accuracy points above chance below which a model counts as "at chance"


def at_chance(accuracies, n_classes: int = 10) -> str | None:
    """A reason when any of the (percent) ``accuracies`` is within CHANCE_MARGIN points of chance, else None."""
    chance = 100.0 / n_classes
    low = [a for a in accuracies if a is not None and a < chance + CHANCE_MARGIN]
    if low:
        return (f"a model is at chance ({min(low):.1f}% test accuracy, chance {chance:.0f}%, "
                f"margin {CHANCE_MARGIN:.0f} points)")
    return None


def zoo_accuracies(view, rows) -> list[float]:
    """Test accuracies of the zoo models that ``rows`` depend on (roles front/back/a/b/model; each a part
    ``<zoo job id>:<part>`` of a zoo job)."""
    zoo = {r.id: r for r in view.rows(kind="zoo", status="done")}
    accs = []
    for r in rows:
        for role in ("front", "back", "a", "b", "model"):
            job, _, part = str(r.deps.get(role, "")).partition(":")
            found = zoo[job].result.get("parts", {}).get(part, {}) if job in zoo else {}
            if "test_accuracy" in found:
                accs.append(float(found["test_accuracy"]))
    return accs


def null_table(rows, key: str, measures: dict[str, str], sites: list[str]) -> str:
    """Markdown table, per measure and site: the largest p-value over the pairs in ``rows`` (results under
    ``key``, from :func:`intertwiners.similarity.permutation.same_layer_tests`) and the mean chance-corrected
    score (statistic − null mean)."""
    out = []
    for m, name in measures.items():
        got = [r.result[key][m] for r in rows if m in r.result.get(key, {})]
        if got:
            out.append([name] + [f"p ≤ {max(g['pvalue'][i] for g in got):.3g}; "
                                 f"{sum(g['chance_corrected'][i] for g in got) / len(got):+.3f}"
                                 for i in range(len(sites))])
    return table(["measure"] + list(sites), out) if out else ""


def null_claim(text: str, rows, key: str, measures: list[str], sites: list[str], precondition=None):
    """Every same-layer similarity above chance: every (pair, measure, site) permutation test at p ≤ 0.05."""
    from ...stats import decide_pvalues

    pvalues = {f"{m} {s} pair {k}": r.result[key][m]["pvalue"][i] for k, r in enumerate(rows) if key in r.result
               for m in measures if m in r.result[key] for i, s in enumerate(sites)}
    return decide_pvalues(text, pvalues, "permutation test (shuffled samples of one model) per pair, measure "
                          "and layer", precondition=precondition)
