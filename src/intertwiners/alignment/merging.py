"""Merging models: align every model to the first, average the weights, recompute batch-norm statistics."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .align import align, check_same_structure_params
from .interpolation import has_batchnorm, inputs_of, recompute_batchnorm


def average_models(models: list[nn.Module]) -> nn.Module:
    """A copy of the first model holding the mean of every floating parameter and buffer."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for k, v in out.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.stack([s[k].to(v.device, v.dtype) for s in states]).mean(0))
    return out


def merge(models: list[nn.Module], data, *, method: str = "activations", group: str = "full", train_data=None,
          reset_batchnorm: bool = True, example_input=None) -> nn.Module:
    """Align every model to ``models[0]`` (:func:`~intertwiners.alignment.align` with ``method`` and
    ``group``), average their weights, and recompute batch-norm statistics on ``train_data`` (``data``'s
    inputs when None). ``data``: inputs for the activations (tensor, (x, y) or a dataset with .x)."""
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(models)}")
    for m in models[1:]:
        check_same_structure_params(models[0], m)
    aligned = [models[0]] + [align(models[0], m, data, example_input, method, group=group).model
                             for m in models[1:]]
    merged = average_models(aligned)
    if reset_batchnorm and has_batchnorm(merged):
        recompute_batchnorm(merged, inputs_of(train_data if train_data is not None else data))
    return merged.eval()
