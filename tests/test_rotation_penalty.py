"""Rotation penalty (paper §3.3, Fig. 4): transforms, insertion point, freezing, the measured numbers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from intertwiners import models
from intertwiners.groups import intersection, intertwiner_group, kind_group
from intertwiners.rotation_penalty import (
    ChannelTransform,
    Frozen,
    insert_transform,
    insertion_index,
    plot_rotation_penalties,
    rotation_penalties,
    rotation_penalty,
    sample_transform,
    summarize,
    with_control,
)
from intertwiners.training import Recipe, fit


def tiny_cnn(activation="relu", batch_norm=False, seed=0):
    torch.manual_seed(seed)
    return models.myrtle_cnn(width=4, num_classes=10, in_channels=1, input_size=16, activation=activation,
                             batch_norm=batch_norm)


@pytest.fixture(scope="module")
def small_digits(digits):
    train, test = digits
    return train.subset(torch.arange(300)), test.subset(torch.arange(120))


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------

def test_grelu_transform_is_in_g_relu_and_lognormal():
    g = torch.Generator().manual_seed(0)
    A = sample_transform("grelu", 2000, g)
    G = intertwiner_group("relu")
    assert G.contains(A) and not intertwiner_group("sigmoid").contains(A)
    d = A.abs().sum(0)  # the diagonal factor, one entry per column
    z = torch.log(d) + 0.5  # D = exp(z) / exp(1/2)
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.1
    assert abs(float(d.mean()) - 1.0) < 0.1  # E[exp(z)] = exp(1/2)


def test_other_transforms():
    g = torch.Generator().manual_seed(1)
    Q = sample_transform("orthogonal", 12, g)
    assert torch.allclose(Q.T @ Q, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert not intertwiner_group("relu").contains(Q)
    P = sample_transform("permutation", 12, g)
    assert intertwiner_group("sigmoid").contains(P)
    assert torch.equal(sample_transform("identity", 3), torch.eye(3, dtype=torch.float64))
    a = sample_transform("grelu", 5, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_transform("grelu", 5, torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="unknown transform"):
        sample_transform("rotation", 3)


def test_channel_transform_is_a_1x1_conv():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g)
    x = torch.randn(3, 5, 4, 4, generator=g)
    ref = F.conv2d(x, M[:, :, None, None])
    assert torch.allclose(ChannelTransform(M)(x), ref, atol=1e-6)
    v = torch.randn(3, 5, generator=g)
    assert torch.allclose(ChannelTransform(M)(v), v @ M.T, atol=1e-6)
    with pytest.raises(ValueError):
        ChannelTransform(torch.ones(2, 3))
    with pytest.raises(ValueError, match="channels"):
        ChannelTransform(M)(torch.randn(1, 4, 2, 2))


# --------------------------------------------------------------------------------------------------
# insertion point and Proposition 3.4
# --------------------------------------------------------------------------------------------------

def test_insertion_index():
    m = tiny_cnn()
    names = [n for n, _ in m.named_children()]
    relu2 = names.index("relu2")
    assert insertion_index(m, "conv2") == relu2 == insertion_index(m, "relu2") == insertion_index(m, 2)
    assert names[insertion_index(m, 5)] == "relu3"  # the paper's layers 0/2/5 are conv1/conv2/conv3
    bn = tiny_cnn(batch_norm=True)
    bn_names = [n for n, _ in bn.named_children()]
    idx = insertion_index(bn, "conv2")
    assert bn_names[idx] == "relu2" and bn_names[idx - 1] == "bn2"  # after the batch norm: pre-activation
    with pytest.raises(ValueError, match="unknown layer"):
        insertion_index(m, "conv9")
    with pytest.raises(ValueError, match="no activation"):
        insertion_index(m, "fc")
    with pytest.raises(ValueError, match="out of range"):
        insertion_index(m, 99)
    with pytest.raises(ValueError, match="Sequential"):
        insertion_index(models.resnet20(in_channels=1), "conv1")


def _compensate(model: nn.Sequential, next_conv: str, B_inv: torch.Tensor) -> None:
    """W_next <- W_next · B^-1 over input channels (Proposition 3.4)."""
    conv = dict(model.named_modules())[next_conv]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oc...,cd->od...", conv.weight.double(), B_inv).to(conv.weight.dtype))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu:0.1", "tanh", "power:3"])
def test_inserted_group_element_can_be_undone_exactly(activation, small_digits):
    """Prop. 3.4: A in G_sigma before the activation is undone by phi(A)^-1 in the next conv.

    A max-pool follows relu2, so only the part of G_sigma that commutes with max-pooling (positive
    scalings and permutations) may be used: the intersection of the two groups.
    """
    model = tiny_cnn(activation).double()
    x = small_digits[1].x[:16].double()
    G = intersection(intertwiner_group(activation), kind_group("positive_scaled_permutation", "max_pool"))
    A = G.sample(8, generator=torch.Generator().manual_seed(3))
    new = insert_transform(model, "conv2", A).double()
    new.transform.matrix = A.clone()  # exact float64 transform for the identity check
    assert not torch.allclose(new(x), model(x), atol=1e-3)
    _compensate(new, "conv3", torch.linalg.inv(G.phi(A)))
    assert torch.allclose(new(x), model(x), rtol=1e-9, atol=1e-9)


def test_sign_flip_before_tanh_and_max_pool_cannot_be_undone(small_digits):
    """A sign flip is in G_tanh, but max-pooling after tanh does not commute with it."""
    model = tiny_cnn("tanh").double()
    x = small_digits[1].x[:16].double()
    S = torch.diag(torch.tensor([-1.0] + [1.0] * 7, dtype=torch.float64))
    assert intertwiner_group("tanh").contains(S)
    new = insert_transform(model, "conv2", S).double()
    new.transform.matrix = S.clone()
    _compensate(new, "conv3", S)
    assert (new(x) - model(x)).abs().max() > 1e-4
    new1 = insert_transform(model, "conv1", S[:4, :4]).double()  # conv1's activation has no pool after it
    new1.transform.matrix = S[:4, :4].clone()
    _compensate(new1, "conv2", S[:4, :4])
    assert torch.allclose(new1(x), model(x), rtol=1e-9, atol=1e-9)


def test_orthogonal_transform_cannot_be_undone_by_the_next_layer(small_digits):
    model = tiny_cnn("relu").double()
    x = small_digits[1].x[:16].double()
    Q = sample_transform("orthogonal", 8, torch.Generator().manual_seed(0))
    new = insert_transform(model, "conv2", Q).double()
    new.transform.matrix = Q.clone()
    _compensate(new, "conv3", Q.T)  # the best linear guess, exact for sigma = identity
    assert (new(x) - model(x)).abs().max() > 1e-2


def test_insert_transform_freezes_the_front_and_leaves_model_untouched():
    model = tiny_cnn(batch_norm=True)
    before = copy.deepcopy(model.state_dict())
    new = insert_transform(model, "conv2", torch.eye(8))
    assert isinstance(new.frozen, Frozen)
    assert [n for n, _ in new.frozen.inner.named_children()] == ["conv1", "bn1", "relu1", "conv2", "bn2"]
    assert all(not p.requires_grad for p in new.frozen.parameters())
    assert all(p.requires_grad for n, p in new.named_parameters() if not n.startswith("frozen"))
    new.train()
    assert not new.frozen.inner.training and new.conv3.training
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    new.eval()
    assert torch.allclose(new(x), model(x), atol=1e-6)  # the identity transform changes nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetuning_changes_only_the_back_and_not_batch_norm_statistics(small_digits):
    train, test = small_digits
    model = tiny_cnn(batch_norm=True)
    model.train()
    with torch.no_grad():
        model(train.x[:64])  # non-trivial running statistics
    new = insert_transform(model, "conv2", sample_transform("grelu", 8, torch.Generator().manual_seed(0)))
    front_before = copy.deepcopy(new.frozen.state_dict())
    back_before = copy.deepcopy(new.conv3.state_dict())
    fit(new, train, test, Recipe(epochs=1, batch_size=32), seed=0, device="cpu", progress=False)
    assert all(torch.equal(front_before[k], v) for k, v in new.frozen.state_dict().items())
    assert not torch.equal(back_before["weight"], new.conv3.weight)
    assert not torch.equal(new.bn3.running_mean, torch.zeros_like(new.bn3.running_mean))


# --------------------------------------------------------------------------------------------------
# the measurement
# --------------------------------------------------------------------------------------------------

def test_rotation_penalty_numbers(small_digits):
    train, test = small_digits
    model = tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    r = rotation_penalty(model, "conv2", "identity", train, test, epochs=1, seed=0, device="cpu")
    assert r["transformed_accuracy"] == r["baseline_accuracy"]
    assert math.isclose(r["penalty"], r["baseline_accuracy"] - r["finetuned_accuracy"])
    assert (r["site"], r["conv"], r["channels"], r["transform"]) == ("relu2", "conv2", 8, "identity")
    assert all(isinstance(v, int | float | str) for v in r.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q = rotation_penalty(model, "conv3", "orthogonal", train, test, epochs=1, seed=0, device="cpu",
                         baseline=50.0)
    assert q["baseline_accuracy"] == 50.0 and q["channels"] == 16
    with pytest.raises(ValueError, match="invertible"):
        rotation_penalty(model, "conv2", torch.zeros(8, 8), train, test, epochs=1, device="cpu")
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        rotation_penalty(model, "conv2", torch.eye(3), train, test, epochs=1, device="cpu")


def test_rotation_penalties_together_equal_each_run_alone(small_digits):
    """Every (transform, seed) trained together (one frozen front, stacked backs, each with its own stream
    and convergence) gives the row :func:`rotation_penalty` gives that run alone: the slow reference."""
    train, test = small_digits
    train = train.subset(torch.arange(120))
    model = tiny_cnn()
    fit(model, *small_digits, Recipe(epochs=3, lr=1e-2), 0, "cpu", progress=False)     # off chance: runs differ
    runs = [("grelu", 0), ("orthogonal", 0), ("identity", 1), ("grelu", 2)]
    kw = dict(epochs=3, patience=1, device="cpu", step_size=2)
    together = rotation_penalties(model, "conv2", runs, train, test, **kw)
    for (kind, seed), row in zip(runs, together):
        alone = rotation_penalty(model, "conv2", kind, train, test, seed=seed, **kw)
        for key in ("transform", "seed", "best_epoch", "transformed_accuracy", "baseline_accuracy", "site"):
            assert row[key] == alone[key], key
        for key in ("finetuned_accuracy", "val_accuracy", "penalty"):
            assert row[key] == pytest.approx(alone[key], abs=1e-9), key
    assert len({row["transformed_accuracy"] for row in together}) > 1
    with pytest.raises(ValueError, match="at least one"):
        rotation_penalties(model, "conv2", [], train, test, **kw)


def test_selection_never_looks_at_the_test_set(small_digits):
    """The chosen epoch and validation accuracy do not depend on the test set."""
    train, test = small_digits
    model = tiny_cnn()
    other_test = test.subset(torch.arange(60))
    kw = dict(epochs=2, seed=1, device="cpu", train_subset=96)
    a = rotation_penalty(model, "conv2", "grelu", train, test, **kw)
    b = rotation_penalty(model, "conv2", "grelu", train, other_test, **kw)
    assert (a["best_epoch"], a["val_accuracy"]) == (b["best_epoch"], b["val_accuracy"])


def test_summarize_and_plot(tmp_path):
    rows = [{"layer": "conv2", "conv": "conv2", "position": 3, "transform": t, "penalty": p, "panel": "relu"}
            for t, p in [("grelu", 0.0), ("grelu", 1.0), ("grelu", 2.0), ("orthogonal", 4.0),
                         ("orthogonal", 6.0)]]
    s = {r["transform"]: r for r in summarize(rows)}
    assert s["grelu"]["mean"] == 1.0 and s["grelu"]["n"] == 3 and math.isclose(s["grelu"]["std"], 1.0)
    assert math.isclose(s["grelu"]["ci95"], 4.302652729911275 / math.sqrt(3))  # t_{0.975, 2}
    # two runs: a standard deviation but no interval (fewer than three values never decide a claim)
    assert math.isclose(s["orthogonal"]["std"], math.sqrt(2)) and math.isnan(s["orthogonal"]["ci95"])
    plot_rotation_penalties(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_cli(tmp_path, capsys):
    from intertwiners.cli import main

    args = ["rotation-penalty", "--epochs", "1", "--seeds", "0", "--model-epochs", "1", "--train-subset", "64",
            "--layers", "conv2", "--transforms", "grelu,identity", "--activations", "relu", "--width", "4",
            "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    csv_text = (tmp_path / "rotation_penalty.csv").read_text().splitlines()
    assert len(csv_text) == 3 and csv_text[0].startswith("panel,layer")
    assert (tmp_path / "rotation_penalty.png").is_file()
    assert (tmp_path / "rotation_penalty_vs_identity.png").is_file()
    summary = (tmp_path / "rotation_penalty_summary.csv").read_text().splitlines()
    assert "mean_vs_identity" in summary[0] and len(summary) == 3
    assert "grelu" in capsys.readouterr().out
    assert main(args) == 0  # resumes: nothing new to run, rows kept
    assert len((tmp_path / "rotation_penalty.csv").read_text().splitlines()) == 3
    assert main([*args[:-5], "--transforms", "bogus", "--out", str(tmp_path), "--quiet"]) == 2


def test_finetune_next_only_trains_the_next_layer(small_digits):
    train, test = small_digits
    model = tiny_cnn()
    new = insert_transform(model, "conv2", torch.eye(8), finetune="next")
    trainable = {n.split(".")[0] for n, p in new.named_parameters() if p.requires_grad}
    assert trainable == {"conv3"}
    assert isinstance(new.tail, Frozen)
    x = train.x[:4]
    assert torch.allclose(new.eval()(x), model.eval()(x), atol=1e-6)
    tail_before = copy.deepcopy(new.tail.state_dict())
    fit(new, train, test, Recipe(epochs=1, batch_size=32), seed=0, device="cpu", progress=False)
    assert all(torch.equal(tail_before[k], v) for k, v in new.tail.state_dict().items())
    with pytest.raises(ValueError, match="finetune"):
        insert_transform(model, "conv2", torch.eye(8), finetune="some")
    r = rotation_penalty(model, "conv3", "grelu", train, test, epochs=1, device="cpu", finetune="next",
                         train_subset=64)
    assert r["finetune"] == "next"


def test_with_control_pairs_by_seed():
    rows = [{"layer": "conv2", "seed": s, "epochs": 3, "transform": t, "finetuned_accuracy": acc}
            for s, t, acc in [(0, "identity", 90.0), (0, "grelu", 89.0), (1, "identity", 95.0), (1, "grelu", 91.0),
                              (2, "grelu", 80.0)]]
    out = with_control(rows)
    vs = {(r["seed"], r["transform"]): r["penalty_vs_control"] for r in out}
    assert vs[(0, "grelu")] == 1.0 and vs[(1, "grelu")] == 4.0 and vs[(0, "identity")] == 0.0
    assert math.isnan(vs[(2, "grelu")])
    s = {r["transform"]: r for r in summarize(out, key="penalty_vs_control", by=("transform",))}
    assert s["grelu"]["mean"] == 2.5 and s["grelu"]["n"] == 2  # the unmatched seed is left out
