"""Weight standardisation (issue 18's normalisation family): timm's ``StdConv2d`` (BiT, ResNet-V2) and
``ScaledStdConv2d`` (NF-ResNet, NFNet) standardise each output row of the raw weight before the convolution,
``gain · (w - mean) / sqrt(var + eps)``, written as ``F.batch_norm(w.reshape(1, out, -1), training=True)``.

The replicas below copy that forward (no timm). Every derived space leaves the outputs unchanged as derived
(float64, no safety net); the transforms the rule excludes change them: a scaling of a standardised layer's
input channels (the rows' statistics change), a scaling of its output without a gain, and a scaling put on the
raw weight's rows instead of the gain (the rows' standardisation removes it, up to eps)."""

import pytest
import torch
import torch.nn.functional as F
from symmetry_checks import one_exact_space, output_change, randomised
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

X = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d`` (forward as in timm): no gain; ``gain`` selects ``ScaledStdConv2d``'s
    ``gain * scale`` (``"scaled"``), a gain that does not scale with its parameter (``"offset"``: ``1 + g``) or
    none; ``shift`` adds a per-row bias inside the standardisation (batch norm's beta)."""

    def __init__(self, cin, cout, k, groups=1, gain=None, shift=False, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups, bias=gain is not None)
        self.mode, self.eps = gain, eps
        self.scale = self.weight[0].numel() ** -0.5
        if gain is not None:
            self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.shift = nn.Parameter(torch.zeros(cout)) if shift else None

    def forward(self, x):
        gamma = None
        if self.mode == "scaled":
            gamma = (self.gain * self.scale).view(-1)
        elif self.mode == "offset":
            gamma = (1 + self.gain).view(-1)
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=gamma, bias=self.shift,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NFBlock(nn.Module):
    """A scaled standardised conv -> ReLU -> plain conv -> ReLU -> scaled standardised conv -> pooled linear
    head: the first space may be scaled (a's gain carries it, b's columns undo it), the second only permuted
    (c standardises its input rows), the third scaled with signs (c's gain; the head is linear)."""

    def __init__(self, eps=1e-6, groups=1):
        super().__init__()
        self.a = StdConv2d(3, 6, 3, gain="scaled", eps=eps)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = StdConv2d(4, 4, 3, groups=groups, gain="scaled", eps=eps)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.head(h.mean((2, 3)))


def _space(spec, size: int) -> str:
    (name,) = [n for n, s in spec.spaces.items() if s.size == size]
    return name


def test_scaled_std_conv_scaling_goes_to_the_gain_and_inputs_are_only_permuted():
    model = randomised(NFBlock())
    spec = symmetry_spec(model, X, check=False)
    kinds = sorted((s.size, s.kind) for s in spec.spaces.values())
    # a -> relu: positive scales (a's gain, b's columns); b -> relu -> c: permutations (c standardises its
    # input rows); c -> mean -> head: any non-zero scales (c's gain and sign, the head's columns)
    assert kinds == [(4, "permutation"), (4, "scaled_permutation"), (6, "positive_scaled_permutation")], kinds
    assert not spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    old, moved = dict(model.named_parameters()), dict(new.named_parameters())
    assert [k for k in old if torch.equal(old[k], moved[k])] == ["head.bias"]
    # where each space reaches the raw weights: rows only permuted, the scaling on the gain
    first = _space(spec, 6)
    roles = {(a.param, a.dim): a.role for a in spec.actions(first)}
    assert roles[("a.weight", 0)] == "perm" and roles[("a.gain", 0)] == "out" and roles[("b.weight", 1)] == "in"


def test_std_conv_input_scaling_changes_the_output():
    """The input of a standardised conv: a positive scaling of one channel, undone by the raw weight's columns as
    a plain conv would, changes the standardised rows (their mean and variance) and so the output."""
    model = randomised(NFBlock())
    spec = symmetry_spec(model, X, check=False)
    inner = next(n for n, s in spec.spaces.items() if s.size == 4 and s.kind == "permutation")
    assert output_change(model, spec, inner, torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])), X) > 1e-3
    # while the same scaling of a plain conv's input (a's output, undone by b's columns) is a symmetry
    first = _space(spec, 6)
    assert output_change(model, spec, first, torch.diag(torch.tensor([2.0, 1, 1, 1, 1, 1])), X) < 1e-12


def test_scaling_the_raw_rows_instead_of_the_gain_changes_the_output():
    """Standardisation removes a scaling of a raw row only up to eps: the scaling must reach the gain. With a
    large eps, a's rows scaled (gain kept) against a's gain scaled (rows kept), b's columns undoing both."""
    model = randomised(NFBlock(eps=0.5))
    d = torch.tensor([2.0, 0.5, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    on_gain, on_rows = NFBlock(eps=0.5).double(), NFBlock(eps=0.5).double()
    for m in (on_gain, on_rows):
        m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in (on_gain, on_rows):
            m.a.bias.mul_(d)
            m.b.weight.div_(d[None, :, None, None])
        on_gain.a.gain.mul_(d[:, None, None, None])
        on_rows.a.weight.mul_(d[:, None, None, None])
        assert (on_gain(X) - model(X)).abs().max() < 1e-12
        assert (on_rows(X) - model(X)).abs().max() > 1e-4


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise_scaled_std_conv(groups):
    model = randomised(NFBlock(groups=groups))
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.c.weight, model.c.weight) and not torch.equal(new.c.gain, model.c.gain)


class BiTBlock(nn.Module):
    """StdConv2d without a gain (BiT), or with a gain ``1 + g`` that does not scale with g, and a per-row shift,
    followed by a pooled linear head: a plain conv there would give a general linear space; standardisation
    leaves signed permutations (a row's sign flips its standardised row; its scale does not survive)."""

    def __init__(self, gain=None, shift=False):
        super().__init__()
        self.a = StdConv2d(3, 5, 3, gain=gain, shift=shift)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.a(x).mean((2, 3)))


@pytest.mark.parametrize("gain,shift", [(None, False), ("offset", True), (None, True)])
def test_std_conv_without_a_scaling_gain_gives_signed_permutations(gain, shift):
    model = randomised(BiTBlock(gain, shift))
    spec, new = one_exact_space(model, X, 5, trials=4)
    assert next(iter(spec.spaces.values())).kind == "signed_permutation", spec
    assert not torch.equal(new.a.weight, model.a.weight)
    name = next(iter(spec.spaces))
    assert output_change(model, spec, name, torch.diag(torch.tensor([2.0, 1, 1, 1, 1])), X) > 1e-3


def test_standardised_weight_read_elsewhere_stays_in_place():
    class Reused(NFBlock):
        def forward(self, x):   # a's raw weight is also read directly: it cannot move
            return super().forward(x) + self.a.weight.sum()

    model = randomised(Reused())
    spec = symmetry_spec(model, X, check=False)
    assert verify_symmetry(model, X, spec=spec, trials=2).ok
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert torch.equal(new.a.weight, model.a.weight)


def test_standardisation_with_running_statistics_is_not_a_standardised_weight():
    """Batch norm of a weight in eval mode with running statistics is an affine map of the raw weight per row,
    not a standardisation: the rule does not apply, and nothing wrong is derived."""
    class Running(NFBlock):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.randn(6))
            self.register_buffer("var", torch.rand(6) + 0.5)

        def forward(self, x):
            w = F.batch_norm(self.a.weight.reshape(1, 6, -1), self.mean, self.var, training=False)
            h = torch.relu(F.conv2d(x, w.reshape_as(self.a.weight), self.a.bias, padding=1))
            return self.head(self.c(torch.relu(self.b(h))).mean((2, 3)))

    model = randomised(Running())
    spec = symmetry_spec(model, X, check=False)
    assert verify_symmetry(model, X, spec=spec, trials=2).ok
    assert all(s.size != 6 for s in spec.spaces.values()), spec


def test_a_model_whose_only_layer_has_a_computed_weight_has_no_space():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, 2 * self.w)

    spec = symmetry_spec(Computed().double(), torch.randn(2, 4, dtype=torch.float64), check=False)
    assert not spec.spaces


class StdLinear(nn.Module):
    """A linear layer with a scaled standardised weight (the same batch-norm form) -> ReLU -> linear -> ReLU -> a
    standardised linear layer without a gain."""

    def __init__(self):
        super().__init__()
        self.w, self.gain = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.ones(5))
        self.b, self.w2 = nn.Linear(5, 6), nn.Parameter(torch.randn(3, 6))

    @staticmethod
    def standardised(w, gain=None):
        return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=gain, training=True, momentum=0.0,
                            eps=1e-6).reshape_as(w)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(F.linear(x, self.standardised(self.w, 2 * self.gain)))))
        return F.linear(h, self.standardised(self.w2))


def test_standardised_linear_layers():
    model = randomised(StdLinear())
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = symmetry_spec(model, x, check=False)
    kinds = sorted((s.size, s.kind) for s in spec.spaces.values())
    # the first layer's gain carries positive scales (b's columns undo them); the last reads its input rows
    # standardised: permutations only
    assert kinds == [(5, "positive_scaled_permutation"), (6, "permutation")] and not spec.pinned, (kinds, spec.pinned)
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
