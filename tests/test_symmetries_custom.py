"""Weight-space symmetries of networks of our own design: pre-activation and bottleneck residual blocks,
concatenation, channel slicing, GL spaces, and what gets pinned (never a wrong symmetry)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import warmed
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from intertwiners.activations import make_activation
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry


class PreActBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(bn(conv(relu(bn(x)))))); the stream feeds batch norms."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(h)))


class PreActNet(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1, self.b2 = PreActBlock(c), PreActBlock(c)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c * 4 * 4, 5)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        x = F.avg_pool2d(F.relu(self.bn(x)), 2)
        return self.fc(x.view(x.size(0), -1))  # flatten of a 4x4 map: blocks of 16 features per channel


class Bottleneck(nn.Module):
    """ResNet-50 style: 1x1 -> 3x3 -> 1x1 (+BN each), projection shortcut when the shape changes."""

    def __init__(self, cin, mid, cout, stride=1, act="relu"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.act1, self.act2, self.act3 = (make_activation(act) for _ in range(3))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.bn2(self.conv2(h)))
        return self.act3(self.bn3(self.conv3(h)) + idt)


class BottleneckNet(nn.Module):
    def __init__(self, act="relu"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  make_activation(act), nn.MaxPool2d(2))
        self.layer = nn.Sequential(Bottleneck(8, 4, 16, 1, act), Bottleneck(16, 4, 16, 1, act),
                                   Bottleneck(16, 8, 24, 2, act))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer(self.stem(x))), 1))


class ConcatNet(nn.Module):
    """Dense-style: cat([a, f(a)]) along channels, then a 1x1 conv; plus a channel slice of a."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(10, 8, 1), nn.Linear(8 + 3, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.tanh(self.c2(a))
        h = F.leaky_relu(self.c3(torch.cat([a, b], dim=1)), 0.2)
        g = F.max_pool2d(h, 2).mean((2, 3))
        return self.fc(torch.cat([g, a[:, :3].mean((2, 3))], 1))


class LinearResNet(nn.Module):
    """No activation on the residual stream: the stream is a GL space."""

    def __init__(self, d=6):
        super().__init__()
        self.inp, self.out = nn.Linear(5, d), nn.Linear(d, 3)
        self.f1, self.g1 = nn.Linear(d, 7), nn.Linear(7, d)
        self.f2, self.g2 = nn.Linear(d, 7), nn.Linear(7, d)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.g1(torch.relu(self.f1(h)))
        h = h + self.g2(torch.sigmoid(self.f2(h)))
        return self.out(h)


class ConvBNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Conv2d(5, 6, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(6, 4, 1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.c2(self.bn(self.c1(x)))  # no activation after BN: a scaled-permutation space
        h = self.c3(h)                    # conv -> conv: a GL space
        return self.fc(torch.flatten(F.relu(h), 1))


class SequenceMLP(nn.Module):
    """Linear layers on the last axis of (N, T, F) inputs, then a mean over T."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))).mean(1))


def mlp_with_batch_norm():
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                         nn.Linear(5, 2))


class Weird(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=1)  # moves channels in a way no rule follows


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace into it
            return x.flip(1)
        return x


def weird_net(kind):
    mods = {"weird": Weird(), "instancenorm": nn.InstanceNorm2d(6, affine=True),
            "grouped": nn.Conv2d(6, 6, 3, padding=1, groups=3), "untraceable": Untraceable()}
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), mods[kind], nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


CASES = {
    "preact": (PreActNet, (4, 3, 8, 8)),
    "bottleneck": (BottleneckNet, (4, 3, 16, 16)),
    "bottleneck_gaussian": (lambda: BottleneckNet("gaussian"), (4, 3, 16, 16)),
    "bottleneck_leaky": (lambda: BottleneckNet("leaky_relu:0.1"), (4, 3, 16, 16)),
    "concat": (ConcatNet, (4, 3, 8, 8)),
    "linear_residual": (LinearResNet, (6, 5)),
    "conv_bn_conv": (ConvBNConv, (4, 3, 8, 8)),
    "sequence_mlp": (SequenceMLP, (4, 7, 3)),
    "mlp_batch_norm": (mlp_with_batch_norm, (8, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_custom_networks_are_invariant(name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    assert spec.spaces and not spec.pinned, spec
    report = verify_symmetry(model, x, spec=spec, generator=torch.Generator().manual_seed(1), trials=2)
    assert report.max_rel <= 1e-9, str(report)
    # float32 too
    model32 = copy.deepcopy(model).float()
    report32 = verify_symmetry(model32, x.float(), spec=spec, generator=torch.Generator().manual_seed(2), trials=1,
                               per_space=False)
    assert report32.max_rel <= 1e-4, str(report32)


def test_pre_activation_stream_allows_only_permutations():
    """The stream feeds batch norms directly: BN(D x) != D BN(x) (eps), so only permutations survive."""
    model = PreActNet().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    stream = spec.spaces["b1:relu"]
    assert stream.kind == "permutation" and stream.sites == ["b1:relu", "b2:relu", ":relu"] and stream.ties == 2
    # a positive scaling of the stream, forced through, changes the train-mode output
    D = torch.diag(torch.tensor([3.0, 1, 1, 1, 1, 0.5], dtype=torch.float64))
    new = apply_symmetry(model, {"b1:relu": D}, spec, check=False)
    a, b = copy.deepcopy(model).train(), new.train()
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() > 1e-9


def test_bottleneck_spaces_and_ties():
    spec = symmetry_spec(BottleneckNet(), torch.randn(2, 3, 16, 16))
    kinds = {k: s.kind for k, s in spec.spaces.items()}
    assert set(kinds.values()) == {"positive_scaled_permutation"}
    assert spec.spaces["layer.0.act3"].sites == ["layer.0.act3", "layer.1.act3"]  # identity shortcut ties
    assert spec.spaces["layer.2.act3"].sites == ["layer.2.act3"]                   # projection: a new space
    assert spec.spaces["layer.0.act3"].size == 16 and spec.spaces["stem.2"].size == 8
    # Gaussian: the stream adds a pre-activation (phi = abs on sign flips) to a post-activation value, so
    # only permutations keep both equal; inside blocks the sign flips stay
    kinds = {k: s.kind for k, s in symmetry_spec(BottleneckNet("gaussian"), torch.randn(2, 3, 16, 16)
                                                   ).spaces.items()}
    assert kinds["layer.0.act3"] == "permutation" and kinds["layer.0.act1"] == "signed_permutation"


def test_concat_and_slice_split_spaces():
    spec = symmetry_spec(ConcatNet(), torch.randn(2, 3, 8, 8))
    assert {k: (s.size, s.kind) for k, s in spec.spaces.items()} == {
        ":relu[0:3]": (3, "positive_scaled_permutation"), ":relu[3:6]": (3, "positive_scaled_permutation"),
        ":tanh": (4, "signed_permutation"), ":leaky_relu": (8, "positive_scaled_permutation")}


def test_linear_maps_give_general_linear_spaces():
    spec = symmetry_spec(LinearResNet(), torch.randn(2, 5))
    assert spec.spaces["inp"].kind == "general_linear" and spec.spaces["inp"].ties == 2
    spec = symmetry_spec(ConvBNConv(), torch.randn(2, 3, 8, 8))
    assert spec.spaces["c1"].kind == "scaled_permutation"    # conv -> BN -> conv: BN only takes P·D
    assert spec.spaces["c2"].kind == "general_linear"        # conv -> conv
    A = random_symmetry(spec, torch.Generator().manual_seed(0))["c2"]
    assert (A.abs() > 1e-3).float().mean() > 0.5             # a genuinely dense element


@pytest.mark.parametrize("kind", ["weird", "instancenorm"])
def test_unsupported_modules_pin_their_spaces(kind):
    torch.manual_seed(0)
    model = weird_net(kind).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    assert "1" in spec.pinned and spec.pinned_sizes["1"] == 6
    assert {"weird": "roll", "instancenorm": "instance norm"}[kind] in spec.pinned["1"]
    assert "1" not in spec.spaces and list(spec.spaces) == ["5"]
    report = verify_symmetry(model, x, spec=spec, trials=2)
    assert report.max_rel <= 1e-9
    # forcing a transform onto the pinned space would change the output: pinning was necessary
    import numpy as np

    from intertwiners.groups import kind_group
    from intertwiners.symmetries import Carried, Power, Rows, Slot, Space

    rows = Rows(Carried(Power(1.0, True), Power(1.0, True)))
    forced = dataclasses.replace(spec, spaces={**spec.spaces, "1": Space("1", 6, kind_group("permutation"))},
                                 all_slots=spec.slots() + [Slot("1", p, "parameter", 0, 6, np.arange(6),
                                                                np.arange(6)[:, None], rows)
                                                           for p in ("0.weight", "0.bias")])
    P = torch.eye(6, dtype=torch.float64)[[1, 0, 3, 2, 5, 4]]
    new = apply_symmetry(model, {"1": P}, forced)
    with torch.no_grad():
        assert (model(x) - new(x)).abs().max() > 1e-6


def test_grouped_convolution_keeps_channels_within_groups():
    torch.manual_seed(0)
    model = weird_net("grouped").double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    assert not spec.pinned and {k: s.size for k, s in spec.spaces.items() if k.startswith("1")} == {
        "1[0:2]": 2, "1[2:4]": 2, "1[4:6]": 2}
    assert verify_symmetry(model, x, spec=spec, trials=2).max_rel <= 1e-9
    # moving a channel to another group is not a symmetry: conv 0 permuted across groups, conv 2 in step
    new = copy.deepcopy(model)
    perm = [2, 1, 0, 3, 4, 5]
    with torch.no_grad():
        new[0].weight.copy_(model[0].weight[perm])
        new[0].bias.copy_(model[0].bias[perm])
        assert (model(x) - new(x)).abs().max() > 1e-6


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(ValueError, match="could not capture"):
        symmetry_spec(weird_net("untraceable").double(), torch.randn(4, 3, 8, 8, dtype=torch.float64))


def test_layernorm_over_channels_allows_permutations():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                          nn.Linear(5, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    assert not spec.pinned and {k: s.kind for k, s in spec.spaces.items()} == {
        "2": "permutation", "4": "positive_scaled_permutation"}
    assert verify_symmetry(model, x, spec=spec, trials=2).max_rel <= 1e-9
    # a positive scaling of the LayerNorm's input is not a symmetry
    D = torch.diag(torch.tensor([3.0, 1, 1, 1, 1, 0.5], dtype=torch.float64))
    new = apply_symmetry(model, {"2": D}, spec, check=False)
    with torch.no_grad():
        assert (model(x) - new(x)).abs().max() > 1e-6


def test_functional_and_shared_modules():
    class Shared(nn.Module):
        def __init__(s):
            super().__init__()
            s.a = nn.Linear(4, 4)
            s.b = nn.Linear(4, 3)

        def forward(s, x):
            return s.b(F.relu(s.a(F.relu(s.a(x)))))  # s.a used twice: its spaces are pinned

    spec = symmetry_spec(Shared(), torch.randn(2, 4))
    assert not spec.spaces and any("shares its weights" in r for r in spec.pinned.values())


@settings(max_examples=6, deadline=None)
@given(mid=st.integers(1, 6), out=st.integers(2, 10), seed=st.integers(0, 10**6),
       act=st.sampled_from(["relu", "tanh", "abs", "power:3"]))
def test_bottleneck_property(mid, out, seed, act):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, out, 3, padding=1), nn.BatchNorm2d(out), make_activation(act),
                          Bottleneck(out, mid, out, 1, act), Bottleneck(out, mid, out + 1, 2, act),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out + 1, 2)).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    assert not spec.pinned
    g = torch.Generator().manual_seed(seed)
    new = apply_symmetry(model, random_symmetry(spec, g), spec)
    for train in (False, True):
        a, b = copy.deepcopy(model).train(train), copy.deepcopy(new).train(train)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert (ya - yb).abs().max() <= 1e-9 * max(1.0, ya.abs().max())


def test_affine_activation_gives_unit_row_sums():
    """sigma(x) = 2x + 1 (traced inline: a scalar multiply and add): A must fix the all-ones vector."""
    class Affine(nn.Module):
        def forward(self, x):
            return 2 * x + 1

    model = nn.Sequential(nn.Linear(3, 5), Affine(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    assert spec.spaces["0"].kind == "unit_row_sum" and spec.spaces["3"].kind == "signed_permutation"
    A = random_symmetry(spec, torch.Generator().manual_seed(0))["0"]
    torch.testing.assert_close(A.sum(1), torch.ones(5, dtype=torch.float64))
    assert verify_symmetry(model, x, spec=spec, trials=2).max_rel <= 1e-9
    # a general invertible matrix (row sums != 1) is not a symmetry here
    B = A + 0.3 * torch.eye(5, dtype=torch.float64)
    new = apply_symmetry(model, {"0": B}, spec, check=False)
    with torch.no_grad():
        assert (model(x) - new(x)).abs().max() > 1e-6


def test_in_place_activation_on_a_shared_value_is_followed():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 5), nn.Linear(5, 2), nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.a(x)
            y = self.act(h)      # overwrites h, which the add below reads
            return self.b(y + h)

    model = InPlace().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x)  # export sees the aliasing: b(relu(h) + relu(h)), a ReLU space
    assert list(spec.spaces) == [":relu"] and not spec.pinned
    assert verify_symmetry(model, x, spec=spec, trials=2).max_rel <= 1e-9
