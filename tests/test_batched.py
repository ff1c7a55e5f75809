"""Models stacked into one batched model compute what each computes alone."""

from __future__ import annotations

import pytest
import torch

from intertwiners.batched import evaluate_many, stack
from intertwiners.data import ArrayDataset
from intertwiners.models import myrtle_cnn
from intertwiners.training import accuracy


def _models(steps):
    torch.manual_seed(0)
    out = []
    for n in steps:
        m = myrtle_cnn(width=4, in_channels=1, input_size=8)
        m.train()
        for _ in range(n):
            m(torch.randn(4, 1, 8, 8))
        out.append(m.eval())
    return out


def test_models_that_trained_different_steps_are_evaluated_together_as_alone():
    # models that stopped at different epochs differ in their batch norms' step counters; with momentum set the
    # counter is never read, so they stack, and the stack evaluates each model as it is alone
    models = _models((1, 3))
    assert int(models[0].bn1.num_batches_tracked) != int(models[1].bn1.num_batches_tracked)
    data = ArrayDataset(torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,)), num_classes=10, name="noise")
    together = evaluate_many(models, data, "cpu")
    assert [acc for acc, _ in together] == pytest.approx([accuracy(m, data, "cpu") for m in models])


def test_stacking_refuses_a_differing_counter_of_a_cumulative_batch_norm():
    models = _models((0, 0))
    for m in models:
        m.bn1.momentum = None
    models[1].train()
    models[1](torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        stack(models)
