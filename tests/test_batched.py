"""Models stacked into one batched model compute what each computes alone."""

from __future__ import annotations

import copy

import pytest
import torch

from intertwiners.batched import evaluate_many, fit_many, stack
from intertwiners.data import ArrayDataset
from intertwiners.models import myrtle_cnn
from intertwiners.rotation_penalty import Frozen
from intertwiners.training import Recipe, accuracy, fit


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


def _noise_data(n: int, seed: int, flip: bool = True, translate: int = 1) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g),
                        num_classes=10, name="noise", flip=flip, translate=translate)


def _close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("batch_norm", [True, False])
def test_fit_many_trains_each_model_as_fit_alone(batch_norm):
    """Models trained together (stacked into grouped convolutions, one Adam over all of them) end with the
    weights, best epochs and validation scores that :func:`fit` gives each alone with its seed; a model whose
    convergence criterion stops it early leaves the stack without changing the others; a shared seed is one
    shared minibatch stream. The slow reference is ``fit``, one model after another."""
    torch.manual_seed(0)
    models = [myrtle_cnn(width=4, in_channels=1, input_size=8, batch_norm=batch_norm) for _ in range(3)]
    train, val = _noise_data(48, 1), _noise_data(24, 2, flip=False, translate=0)
    recipe = Recipe(epochs=4, batch_size=16, lr=3e-3, step_size=2, patience=1)
    seeds = [0, 1, 0]
    alone = [copy.deepcopy(m) for m in models]
    expected = [fit(m, train, val, recipe, s, "cpu", progress=False) for m, s in zip(alone, seeds)]
    found = fit_many(models, train, val, recipe, seeds, "cpu", progress=False)
    for a, b, e, f in zip(models, alone, expected, found):
        _close(a, b)
        assert (f["best_epoch"], f["epochs"], f["val_accuracy"]) == (e["best_epoch"], e["epochs"], e["val_accuracy"])
        assert f["val_loss"] == pytest.approx(e["val_loss"], rel=1e-4)


def test_fit_many_with_a_frozen_prefix_trains_as_fit_on_the_whole_model():
    """A frozen front shared by every model (run once per batch) trains each back as ``fit`` trains
    ``Sequential(Frozen(front), back)``."""
    torch.manual_seed(1)
    whole = myrtle_cnn(width=4, in_channels=1, input_size=8)
    front, back = whole[:3], whole[3:]
    backs = [copy.deepcopy(back) for _ in range(2)]
    for b in backs[1:]:
        for p in b.parameters():
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.3)
    train, val = _noise_data(40, 3), _noise_data(20, 4, flip=False, translate=0)
    recipe = Recipe(epochs=2, batch_size=8, lr=3e-3)
    alone = [torch.nn.Sequential(Frozen(copy.deepcopy(front)), copy.deepcopy(b)) for b in backs]
    expected = [fit(m, train, val, recipe, s, "cpu", progress=False) for m, s in zip(alone, (5, 6))]
    found = fit_many(backs, train, val, recipe, [5, 6], "cpu", progress=False, prefix=copy.deepcopy(front))
    for b, a, e, f in zip(backs, alone, expected, found):
        _close(b, a[1])
        assert f["best_epoch"] == e["best_epoch"] and f["val_accuracy"] == e["val_accuracy"]


def test_fit_many_is_not_fit_with_other_seeds():
    """The equality above is not vacuous: another seed gives other weights."""
    torch.manual_seed(0)
    model = myrtle_cnn(width=4, in_channels=1, input_size=8)
    train, val = _noise_data(48, 1), _noise_data(24, 2, flip=False, translate=0)
    recipe = Recipe(epochs=1, batch_size=16, lr=3e-3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fit(a, train, val, recipe, 0, "cpu", progress=False)
    fit_many([b], train, val, recipe, [1], "cpu", progress=False)
    assert any(not torch.allclose(x, y, atol=1e-4) for x, y in zip(a.parameters(), b.parameters()))


def test_channels_last_is_refused_where_torch_corrupts_the_heap():
    """torch 2.13's channels-last weight gradient of a strided 1x1 convolution with fewer than 8 input channels
    (per group) corrupts the heap on CPUs; such models train in the default memory format. A width-4 ResNet20
    with projection shortcuts (4 -> 8 channels, stride 2) trains through fit_many at one thread and finishes
    (without the check it aborts the process: "corrupted double-linked list"); wider ones, and frozen or
    unstrided 1x1 convolutions, keep channels-last."""
    from intertwiners._util import channels_last_trains_safely
    from intertwiners.models import resnet20

    narrow = resnet20(in_channels=3, shortcut="B", widths=(4, 8, 16))
    assert not channels_last_trains_safely(narrow)
    assert channels_last_trains_safely(resnet20(in_channels=1, shortcut="B", widths=(8, 16, 32)))
    assert channels_last_trains_safely(resnet20(in_channels=1, shortcut="A", widths=(4, 8, 16)))
    assert channels_last_trains_safely(torch.nn.Conv2d(4, 8, 1, stride=1))
    assert channels_last_trains_safely(torch.nn.Conv2d(4, 8, 1, stride=2).requires_grad_(False))
    assert not channels_last_trains_safely(torch.nn.Conv2d(16, 8, 1, stride=2, groups=4))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(1)   # 3 channels: only fit_many can make the batches channels-last
        train, val = (ArrayDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g),
                                   10, "noise") for n in (32, 16))
        found = fit_many([narrow], train, val, Recipe(epochs=1, batch_size=16), [0], "cpu", progress=False)
    finally:
        torch.set_num_threads(before)
    assert found[0]["epochs"] == 1
