"""Linear interpolation between two models and the loss/accuracy barrier along it.

``interpolate(A, B, data, alphas)`` evaluates the models ``(1 - alpha)·A + alpha·B`` (every floating
parameter and buffer interpolated). With ``reset_batchnorm=True`` (the default, as in REPAIR and
git-re-basin) the batch-norm running statistics of each interpolated model are recomputed from scratch
on ``train_data`` (``data`` when no training data is given), since averaged statistics do not describe
the averaged network: the exact statistics of each norm's input in eval mode, norm after norm. With
``repair=True`` every hidden channel of each interpolated model is corrected by REPAIR (:mod:`.repair`,
Jordan et al. 2023) so that its mean and standard deviation on the training inputs interpolate those of the
two end models. The barrier is the largest rise of the loss, and the largest drop of the accuracy, above the
straight line between the two ends.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._util import as_tensor, resolve_device

DEFAULT_ALPHAS = tuple(np.linspace(0.0, 1.0, 11).round(6).tolist())


@dataclass
class InterpolationCurve:
    """``alphas`` (k,), ``loss`` (k,) mean cross-entropy, ``accuracy`` (k,) percent, ``barrier``:
    {"loss": largest rise above the line, "accuracy": largest drop below it (points)}."""

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    barrier: dict

    def rows(self, label: str = "") -> list[dict]:
        return [{"variant": label, "alpha": float(a), "loss": float(lo), "accuracy": float(ac)}
                for a, lo, ac in zip(self.alphas, self.loss, self.accuracy)]


def labelled_data(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a dataset with ``.x``/``.y`` or an ``(x, y)`` pair."""
    if hasattr(data, "x") and hasattr(data, "y"):
        x, y = data.x, data.y
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
    else:
        raise ValueError("data must be a dataset with .x and .y, or an (x, y) pair (labels are needed for "
                         "the loss and the accuracy)")
    x, y = as_tensor(x, name="x"), as_tensor(y, name="y").long()
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"data has {len(x)} inputs and {len(y)} labels")
    return x, y


def inputs_of(data) -> torch.Tensor:
    if hasattr(data, "x"):
        return as_tensor(data.x, name="x")
    if isinstance(data, tuple | list) and len(data) == 2:
        return as_tensor(data[0], name="x")
    return as_tensor(data, name="inputs")


def barrier(alphas: np.ndarray, values: np.ndarray, higher_is_worse: bool) -> float:
    """Largest deviation of ``values`` from the line between the ends, in the bad direction (NaN-propagating).

    ``alphas`` must start at 0 and end at 1."""
    line = values[0] + (values[-1] - values[0]) * alphas
    dev = values - line if higher_is_worse else line - values
    return float(np.max(dev))


def lerp_model(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A copy of A with every floating parameter and buffer set to (1 - alpha)·A + alpha·B."""
    out = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    with torch.no_grad():
        for k, v in out.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.lerp(v, sb[k].to(v.device, v.dtype), float(alpha)))
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int = 2048) -> nn.Module:
    """Set every batch norm's running statistics (in place) to the exact mean and population variance of its
    input over ``inputs`` as the model in eval mode sees it: in forward order, each norm measured with the
    earlier norms' new statistics in place, so that every norm standardises its input exactly on these inputs
    and the result does not depend on ``batch_size`` (the batch of the statistics passes: one pass when the
    inputs fit one batch, else one streamed pass per norm; :func:`.repair.correct_in_forward_order`).

    A model whose batch norm runs more than once in one forward pass (or not at all) gets the usual reset
    instead: train-mode passes of ``batch_size`` inputs, the statistics the cumulative average over batches."""
    from .repair import batchnorm_sites, correct_in_forward_order, fold_statistics

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    sites = batchnorm_sites(model, inputs[:2])
    if sites is not None:
        return correct_in_forward_order(model, sites, fold_statistics, inputs, batch_size)
    was = model.training
    saved = [m.momentum for m in bns]
    p = next(model.parameters())
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i:i + batch_size].to(p.device, p.dtype))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) in eval mode."""
    was = model.training
    model.eval()
    p = next(model.parameters())
    total, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size].to(p.device, p.dtype))
            yb = y[i:i + batch_size].to(out.device)
            total += float(F.cross_entropy(out.double(), yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was)
    return total / len(x), 100.0 * correct / len(x)


def interpolate(model_a: nn.Module, model_b: nn.Module, data, alphas=DEFAULT_ALPHAS, reset_batchnorm: bool = True,
                train_data=None, repair: bool = False, *, device: str = "auto", batch_size: int = 512,
                repair_batch_size: int = 2048) -> InterpolationCurve:
    """Loss and accuracy of (1 - alpha)·A + alpha·B on ``data`` ((x, y) or a dataset with .x/.y).

    ``alphas``: increasing, from 0 to 1 (the barrier is measured against the line between the ends).
    ``reset_batchnorm``: recompute batch-norm statistics at each alpha on ``train_data`` (inputs; ``data``'s
    inputs when None), exactly, as the model in eval mode sees its inputs (:func:`recompute_batchnorm`).
    ``repair``: correct every hidden channel at each alpha so that its mean and standard deviation on the same
    inputs are ``(1 - alpha)`` times A's plus ``alpha`` times B's (REPAIR, Jordan et al. 2023;
    :mod:`intertwiners.alignment.repair` says which channels), the end models taken as the curve's ends (batch
    norm recomputed when ``reset_batchnorm``). The statistics (the batch-norm reset's and REPAIR's) are taken in
    one forward pass when the inputs fit one batch of ``repair_batch_size``, else in one pass per corrected
    layer. Returns an :class:`InterpolationCurve`.
    """
    from .align import check_runs, check_same_structure_params
    from .repair import PathRepair

    check_same_structure_params(model_a, model_b)
    x, y = labelled_data(data)
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim != 1 or len(a) < 2 or a[0] != 0.0 or a[-1] != 1.0 or np.any(np.diff(a) <= 0):
        raise ValueError(f"alphas must increase from 0 to 1, got {alphas}")
    dev = resolve_device(device)
    bn_inputs = inputs_of(train_data) if train_data is not None else x
    check_runs(model_a, x[:2], "data")
    check_runs(model_a, bn_inputs[:2], "train_data")
    repairer = None
    if repair:
        ends = [copy.deepcopy(m).to(dev) for m in (model_a, model_b)]
        if reset_batchnorm:
            for m in ends:
                recompute_batchnorm(m, bn_inputs, repair_batch_size)
        repairer = PathRepair(*ends, bn_inputs, repair_batch_size)
    losses, accs = [], []
    for alpha in a:
        model = lerp_model(model_a, model_b, alpha).to(dev)
        if reset_batchnorm and has_batchnorm(model) and not (repairer and repairer.covers_batchnorm):
            recompute_batchnorm(model, bn_inputs, repair_batch_size)
        if repairer is not None:
            repairer(model, alpha)
        lo, ac = evaluate(model, x, y, batch_size)
        losses.append(lo)
        accs.append(ac)
    loss, acc = np.array(losses), np.array(accs)
    return InterpolationCurve(a, loss, acc, {"loss": barrier(a, loss, True), "accuracy": barrier(a, acc, False)})
