"""REPAIR along an interpolation path, and merging three or more models (MergeMany).

REPAIR: which channels it corrects (one rule per layer type), that it leaves the end models' functions alone,
that every corrected channel ends with exactly the interpolated statistics (checked against statistics computed
here, independently, from captured outputs), and that it lowers the barrier of a trained pair. Merging: three
small digits models trained here merge into a model far better than their unaligned average; the report's
numbers are the models' own.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import intertwiners as it
from intertwiners import models
from intertwiners.alignment.interpolation import evaluate, lerp_model, recompute_batchnorm
from intertwiners.alignment.repair import (
    Moments,
    affine_correction,
    channel_statistics,
    interpolated_targets,
    repair,
    repair_sites,
)

# ----------------------------------------------------------------------------------------------------
# A model with one layer of every kind REPAIR knows, and the captured outputs it is checked on
# ----------------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    """conv (bias) | conv (no bias) -> BN | conv (bias) -> GroupNorm | pool | linear -> LayerNorm | linear (bias)
    | a linear called twice | head. Sites, in order: conv1, bn2, gn3, ln, fc2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.gn3 = nn.GroupNorm(2, 6)
        self.fc1 = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.gn3(self.conv3(x)))
        x = x.mean((2, 3))
        x = torch.relu(self.ln(self.fc1(x)))
        x = torch.tanh(self.fc2(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.head(x)


SITES = ["conv1", "bn2", "gn3", "ln", "fc2"]


def mixed(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = Mixed().double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms with random affine parameters and statistics, some gammas negative
        for mod in (m.bn2, m.gn3, m.ln):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64))
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64))
        m.bn2.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64) * 0.1)
        m.bn2.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    x = torch.randn(96, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return mixed(1), mixed(2), x


def captured(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each named module's output on x (eval mode), as numpy arrays with the channel axis last."""
    out, handles = {}, []
    mods = dict(model.named_modules())
    for n in names:
        axis = -1 if isinstance(mods[n], nn.Linear | nn.LayerNorm) else 1
        handles.append(mods[n].register_forward_hook(
            lambda _m, _i, o, n=n, axis=axis: out.__setitem__(n, np.moveaxis(o.detach().numpy(), axis, -1))))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return out


def slow_stats(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std, channel by channel with numpy (the independent reference)."""
    flat = outputs.reshape(-1, outputs.shape[-1])
    return (np.array([flat[:, c].mean() for c in range(flat.shape[1])]),
            np.array([flat[:, c].std() for c in range(flat.shape[1])]))


# ----------------------------------------------------------------------------------------------------
# REPAIR
# ----------------------------------------------------------------------------------------------------

def test_sites_one_rule_per_layer_kind(pair):
    """Corrected: a conv with a bias before an activation, a batch norm, a group norm, a layer norm, a linear
    before tanh. Not corrected: a conv without a bias feeding a batch norm, a conv and a linear feeding a norm
    (the norm is corrected), a layer called twice, the output layer."""
    a, _, x = pair
    sites = repair_sites(a, x[:2])
    assert [s.name for s in sites] == SITES
    assert [s.rule for s in sites] == ["producer", "batchnorm", "norm", "norm", "producer"]
    assert [s.axis for s in sites] == [1, 1, 1, -1, -1]
    assert repair_sites(nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 2)),
                        torch.randn(2, 3)) == []


def test_affine_correction_formula_and_a_constant_channel():
    mean, std = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 0.5, 0.0],
                                                                                   dtype=torch.float64)
    t_mean, t_std = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64), torch.tensor([1.0, 1.0, 7.0],
                                                                                      dtype=torch.float64)
    scale, shift = affine_correction(mean, std, t_mean, t_std)
    assert torch.allclose(scale, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))  # constant channel: 1
    assert torch.allclose(scale * mean + shift, t_mean)


def test_statistics_stream_independently_of_batch_size(pair):
    a, _, x = pair
    sites = repair_sites(a, x[:2])
    whole, streamed = channel_statistics(a, sites, x, 1000), channel_statistics(a, sites, x, 7)
    ref = captured(a, SITES, x)
    for n in SITES:
        mean, std = slow_stats(ref[n])
        for got in (whole[n], streamed[n]):
            assert np.allclose(got[0].numpy(), mean, atol=1e-12) and np.allclose(got[1].numpy(), std, atol=1e-12)
    m = Moments()  # an empty channel axis is never divided by zero: count grows with the samples
    m.update(torch.ones(4, 3, dtype=torch.float64), 1)
    assert m.count == 4 and torch.equal(m.mean_std()[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("batch_size", [1000, 13])  # one pass with correcting hooks; one streamed pass per site
def test_ends_keep_their_function(pair, batch_size):
    """REPAIR towards a model's own statistics (alpha 0 and 1) changes no output."""
    a, b, x = pair
    sites = repair_sites(a, x[:2])
    sa, sb = channel_statistics(a, sites, x), channel_statistics(b, sites, x)
    for model, alpha in ((a, 0.0), (b, 1.0)):
        fixed = repair(copy.deepcopy(model), sites, interpolated_targets(sa, sb, alpha), x, batch_size)
        with torch.no_grad():
            assert torch.allclose(fixed(x), model(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.3, 0.5])
@pytest.mark.parametrize("batch_size", [1000, 13])
def test_repaired_channels_have_the_interpolated_statistics(pair, alpha, batch_size):
    """Every corrected channel of (1 - alpha)·A + alpha·B ends with mean (1 - alpha)·mu_A + alpha·mu_B and std
    (1 - alpha)·sigma_A + alpha·sigma_B on the data (statistics of captured outputs, computed here with numpy);
    batch norms end with their exact input statistics as running statistics and the target mean as bias."""
    a, b, x = pair
    sites = repair_sites(a, x[:2])
    ref_a, ref_b = captured(a, SITES, x), captured(b, SITES, x)
    model = lerp_model(a, b, alpha)
    plain = captured(model, SITES, x)
    repair(model, sites, interpolated_targets(channel_statistics(a, sites, x), channel_statistics(b, sites, x),
                                              alpha), x, batch_size)
    got = captured(model, SITES, x)
    for n in SITES:
        (ma, sa), (mb, sb) = slow_stats(ref_a[n]), slow_stats(ref_b[n])
        mean, std = slow_stats(got[n])
        assert np.allclose(mean, (1 - alpha) * ma + alpha * mb, atol=1e-9), n
        assert np.allclose(std, (1 - alpha) * sa + alpha * sb, atol=1e-9), n
        assert not np.allclose(slow_stats(plain[n])[1], std, rtol=1e-2, atol=0), n  # the correction did something
    with torch.no_grad():  # batch norm: exact statistics of its input, bias = target mean
        bn_in = model.conv2(torch.relu(model.conv1(x)))
    assert torch.allclose(model.bn2.running_mean, bn_in.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(model.bn2.running_var, bn_in.var((0, 2, 3), unbiased=False), atol=1e-12)
    assert np.allclose(model.bn2.bias.detach().numpy(), (1 - alpha) * slow_stats(ref_a["bn2"])[0]
                       + alpha * slow_stats(ref_b["bn2"])[0], atol=1e-9)


def test_interpolate_with_repair_keeps_the_ends_and_needs_channels(pair):
    a, b, x = pair
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    plain = it.interpolate(a, b, (x, y), alphas=[0, 0.5, 1])
    fixed = it.interpolate(a, b, (x, y), alphas=[0, 0.5, 1], repair=True)
    assert fixed.loss[[0, 2]] == pytest.approx(plain.loss[[0, 2]], rel=1e-9)
    assert fixed.loss[1] != pytest.approx(plain.loss[1], rel=1e-6)  # the middle model was corrected
    bare = nn.Sequential(nn.Flatten(), nn.Linear(36, 3, bias=False)).double()
    with pytest.raises(ValueError, match="no channel REPAIR can correct"):
        it.interpolate(bare, copy.deepcopy(bare), (x, y), repair=True)
    with pytest.raises(ValueError, match="does not fit"):
        it.interpolate(a, b, (torch.randn(8, 2, 6, 6, dtype=torch.float64), y[:8]))


# ----------------------------------------------------------------------------------------------------
# Three small digits models, trained once for the module
# ----------------------------------------------------------------------------------------------------

def train_mlp(train, seed: int, steps: int = 200) -> nn.Module:
    """MLP 256-32-32-32-10 (no norms), Adam on batches of 256 digits."""
    torch.manual_seed(seed)
    m = models.mlp(256, hidden=(32, 32, 32))
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train.x), (256,), generator=g)
        loss = nn.functional.cross_entropy(m(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def trained(digits):
    with torch.random.fork_rng(devices=[]):
        return [train_mlp(digits[0], s) for s in range(3)]


def test_repair_lowers_the_barrier_of_a_trained_pair(trained, digits):
    """Two MLPs without norms, B aligned to A by weights: REPAIR lowers the loss barrier of the path (variance
    collapse undone) by more than a tenth (this pair: 0.248 -> 0.217), and the ends stay the end models'."""
    train, test = digits
    a, b = trained[0], it.align(trained[0], trained[1], method="weights", example_input=train.x[:8]).model
    plain = it.interpolate(a, b, test, alphas=[0, 0.5, 1], train_data=train)
    fixed = it.interpolate(a, b, test, alphas=[0, 0.5, 1], train_data=train, repair=True)
    assert fixed.barrier["loss"] < 0.9 * plain.barrier["loss"], (plain.barrier, fixed.barrier)
    assert fixed.loss[[0, 2]] == pytest.approx(plain.loss[[0, 2]], rel=1e-4)


def test_merge_many_beats_the_unaligned_average(trained, digits):
    """Three trained models: the merged model is far more accurate than the plain average of the three, and the
    report holds the models' own accuracies."""
    train, test = digits
    merged = it.merge(trained, train, method="weights", eval_data=test, max_rounds=2)
    r = merged.merge_report
    assert isinstance(merged, nn.Module) and merged(test.x[:4]).shape == (4, 10)
    assert r.accuracy["merged"] > r.accuracy["unaligned average"] + 20, r
    assert r.accuracy["models"] == pytest.approx([evaluate(m, test.x, test.y)[1] for m in trained])
    assert r.accuracy["merged"] == pytest.approx(evaluate(merged, test.x, test.y)[1])
    assert 1 <= r.rounds <= 2 and len(r.moved) == r.rounds and r.moved[0] > 0
    assert [row["model"] for row in r.rows()] == ["model 0", "model 1", "model 2", "unaligned average", "merged"]


def test_merge_of_an_orbit_converges_at_once():
    """Three models in one orbit: aligned to the first they coincide, the first MergeMany round moves nothing,
    and the merge is the model itself."""
    torch.manual_seed(13)
    x = torch.randn(512, 5, dtype=torch.float64)
    model = models.mlp(5, hidden=(6, 4)).double()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.bias.uniform_(0.2, 0.5)  # every unit fires
    spec = it.symmetry_spec(model, x[:2])
    moved = [it.apply_symmetry(model, it.random_symmetry(spec, torch.Generator().manual_seed(s)), spec)
             for s in range(2)]
    merged = it.merge([model] + moved, x, max_rounds=3)
    assert merged.merge_report.moved == [0] and merged.merge_report.converged
    for (k, p), q in zip(model.named_parameters(), merged.parameters()):
        assert torch.allclose(p, q, atol=1e-6), k
    assert merged.merge_report.accuracy is None  # no labels given


def test_merge_bad_input_names_the_difference(digits):
    a, b = models.mlp(256, hidden=(8,)), models.mlp(256, hidden=(9,))
    with pytest.raises(ValueError, match=r"fc1.weight.*\(8, 256\) vs \(9, 256\)"):
        it.merge([a, b], digits[0].x[:16])
    with pytest.raises(ValueError, match="does not fit"):
        it.merge([a, copy.deepcopy(a)], torch.randn(16, 3))
    with pytest.raises(ValueError, match="max_rounds"):
        it.merge([a, a], digits[0].x[:16], max_rounds=-1)


def test_bn_reset_is_what_repair_does_for_batch_norm_models():
    """In a model whose every batch norm is corrected, REPAIR makes the batch-norm reset redundant: the repaired
    model computes the same function whether its statistics were recomputed first or not."""
    torch.manual_seed(3)
    a = models.myrtle_cnn(width=2, in_channels=1, input_size=8).double().eval()
    b = models.myrtle_cnn(width=2, in_channels=1, input_size=8).double().eval()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    sites = repair_sites(a, x[:2])
    assert [s.rule for s in sites] == ["batchnorm"] * 4
    targets = interpolated_targets(channel_statistics(a, sites, x), channel_statistics(b, sites, x), 0.5)
    stale, reset = lerp_model(a, b, 0.5), recompute_batchnorm(lerp_model(a, b, 0.5), x)
    for m in (stale, reset):
        repair(m, sites, targets, x)
    with torch.no_grad():
        assert torch.allclose(stale(x), reset(x), atol=1e-10)


def _positive_gain_myrtle(seed: int, eps: float) -> nn.Module:
    torch.manual_seed(seed)
    model = models.myrtle_cnn(width=2, in_channels=1, input_size=8).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = eps
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_repair_of_a_batch_norm_network_with_positive_gains_is_the_batch_norm_reset():
    """Every corrected site a batch norm, every gain positive, eps negligible (1e-12): the reset standardises
    each norm's input exactly, so the interpolated gain and bias already give each channel the interpolated
    standard deviation and mean, and REPAIR changes nothing. A gain of opposite signs in A and B breaks it
    (REPAIR keeps the channel's spread, the reset lets it collapse)."""
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (60,))
    a, b = _positive_gain_myrtle(1, 1e-12), _positive_gain_myrtle(2, 1e-12)
    alphas = (0.0, 0.3, 0.5, 1.0)
    plain = it.interpolate(a, b, (x, y), alphas, train_data=x, device="cpu")
    repaired = it.interpolate(a, b, (x, y), alphas, train_data=x, repair=True, device="cpu")
    np.testing.assert_allclose(repaired.loss, plain.loss, rtol=1e-9)
    with torch.no_grad():
        b.bn2.weight[0] = -b.bn2.weight[0]
    plain = it.interpolate(a, b, (x, y), alphas, train_data=x, device="cpu")
    repaired = it.interpolate(a, b, (x, y), alphas, train_data=x, repair=True, device="cpu")
    assert abs(repaired.loss[2] - plain.loss[2]) > 1e-6
    np.testing.assert_allclose(repaired.loss[[0, -1]], plain.loss[[0, -1]], rtol=1e-9)
