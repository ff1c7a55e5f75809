"""Merging several models into one: bring them all into one basis, average the weights, recompute batch norm.

With two models, B is aligned to A and the two are averaged. With three or more, aligning every model to the
first leaves the average tied to the first model's idiosyncrasies; :func:`merge` refines the basis with
Ainsworth et al.'s MergeMany (git re-basin, Algorithm 3): in rounds, each model in turn is aligned (with
:func:`~intertwiners.alignment.align`) to the average of all the others, until a round moves no model by a
permutation or ``max_rounds`` is reached. Then the models are averaged and the batch-norm statistics of the
average recomputed.

The result is a model (``merged(x)`` works, it saves like any model) that carries a :class:`MergeReport` as
``merged.merge_report``: the accuracy (and loss) of the merged model next to each input model's and the
unaligned average's, when labelled data is given, and how the rounds went.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .align import align, check_same_structure_params
from .interpolation import evaluate, has_batchnorm, inputs_of, labelled_data, recompute_batchnorm


@dataclass
class MergeReport:
    """How a merge went. ``accuracy`` / ``loss``: ``{"merged": ..., "unaligned average": ..., "models": [...]}``
    (percent / mean cross-entropy, on ``eval_data``; None when no labelled data was given); ``rounds``: the
    MergeMany rounds run; ``moved``: per round, how many models were moved by a permutation that is not the
    identity; ``converged``: the last round moved none; ``seconds``: wall time."""

    accuracy: dict | None
    loss: dict | None
    rounds: int
    moved: list[int] = field(default_factory=list)
    converged: bool = True
    seconds: float = 0.0
    method: str = "activations"
    group: str = "full"

    def rows(self) -> list[dict]:
        """One row per model (the inputs, the unaligned average, the merged model) with accuracy and loss."""
        if self.accuracy is None:
            return []
        names = [f"model {i}" for i in range(len(self.accuracy["models"]))] + ["unaligned average", "merged"]
        accs = list(self.accuracy["models"]) + [self.accuracy["unaligned average"], self.accuracy["merged"]]
        losses = list(self.loss["models"]) + [self.loss["unaligned average"], self.loss["merged"]]
        return [{"model": n, "accuracy": a, "loss": lo} for n, a, lo in zip(names, accs, losses)]


ROUND_GROUP = "permutation"  # rounds keep the first alignment's scales (full-group rounds: no better)


def average_models(models: list[nn.Module]) -> nn.Module:
    """A copy of the first model holding the mean of every floating parameter and buffer."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for k, v in out.state_dict().items():
            if v.is_floating_point():
                total = torch.zeros_like(v, dtype=torch.float64)
                for s in states:  # one tensor at a time: no stack of every model's copy
                    total += s[k].to(v.device, torch.float64)
                v.copy_(total / len(states))
    return out


def _moved_by_permutation(elements: dict) -> bool:
    """True when some monomial element of ``elements`` ((perm, scale) pairs) has a permutation that is not the
    identity. GL elements (dense matrices) have no discrete part and are not counted."""
    for el in elements.values():
        if isinstance(el, tuple) and len(el) == 2 and isinstance(el[0], torch.Tensor) and el[0].ndim == 1:
            if not torch.equal(el[0].cpu(), torch.arange(len(el[0]))):
                return True
    return False


def _has_labels(data) -> bool:
    return (hasattr(data, "x") and hasattr(data, "y")) or (
        isinstance(data, tuple | list) and len(data) == 2 and all(hasattr(d, "shape") for d in data))


def merge(models: list[nn.Module], data, *, method: str = "activations", group: str = "full", train_data=None,
          reset_batchnorm: bool = True, example_input=None, eval_data=None, max_rounds: int = 5) -> nn.Module:
    """Merge two or more models of one architecture into one model.

    ``data``: inputs for the activations (tensor, ``(x, y)`` or a dataset with ``.x``); ``method``/``group``:
    those of :func:`~intertwiners.alignment.align`. Every model is first aligned to ``models[0]``; then, with
    three or more models, MergeMany rounds align each model to the average of the others until no model moves
    by a permutation (at most ``max_rounds``). The average's batch-norm statistics are recomputed on
    ``train_data`` (``data``'s inputs when None). ``eval_data`` (labelled; default ``data`` when it has labels)
    gives the accuracies of the report. Returns the merged model (eval mode) with ``merged.merge_report``
    (:class:`MergeReport`).
    """
    start = time.perf_counter()
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(models)}")
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 0:
        raise ValueError(f"max_rounds must be a non-negative integer, got {max_rounds!r}")
    for m in models[1:]:
        check_same_structure_params(models[0], m)
    stat_inputs = inputs_of(train_data if train_data is not None else data) if data is not None else None
    if eval_data is None and data is not None and _has_labels(data):
        eval_data = data
    if eval_data is not None:
        labelled_data(eval_data)  # ValueError now, not after the alignments

    def ready(model):  # batch norm of an average recomputed, so that its features (and accuracy) are its own
        if reset_batchnorm and has_batchnorm(model) and stat_inputs is not None:
            recompute_batchnorm(model, stat_inputs)
        return model

    current = [models[0]] + [align(models[0], m, data, example_input, method, group=group).model for m in models[1:]]
    moved_per_round: list[int] = []  # one entry per MergeMany round run
    if len(models) > 2:
        while len(moved_per_round) < max_rounds:
            moved = 0
            for i in range(len(current)):
                others = ready(average_models([m for j, m in enumerate(current) if j != i]))
                r = align(others, current[i], data, example_input, method, group=ROUND_GROUP, monomial=True)
                moved += _moved_by_permutation(r.elements)
                current[i] = r.model
            moved_per_round.append(moved)
            if moved == 0:
                break
    merged = ready(average_models(current)).eval()
    accuracy = loss = None
    if eval_data is not None:
        x, y = labelled_data(eval_data)
        each = [evaluate(m, x, y) for m in models]
        plain = evaluate(ready(average_models(models)), x, y)
        mine = evaluate(merged, x, y)
        accuracy = {"merged": mine[1], "unaligned average": plain[1], "models": [e[1] for e in each]}
        loss = {"merged": mine[0], "unaligned average": plain[0], "models": [e[0] for e in each]}
    merged.merge_report = MergeReport(accuracy, loss, len(moved_per_round), moved_per_round,
                                      converged=not moved_per_round or moved_per_round[-1] == 0,
                                      seconds=time.perf_counter() - start, method=method, group=group)
    return merged
