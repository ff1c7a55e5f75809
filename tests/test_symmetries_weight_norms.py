"""Group norm and weight normalisation (issue 18's normalisation family) on replica blocks: every derived space
leaves the outputs unchanged as derived (no safety net, float64), and the transforms the rules exclude (a scale
or a sign inside a group, a permutation across groups, a scaling that would change ``||v||``) change them."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from symmetry_checks import one_exact_space, output_change, randomised
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

AUDIO = torch.randn(2, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
X = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class GroupNormBlock(nn.Module):
    """conv -> GroupNorm -> (no activation) -> conv: the norm alone constrains the space."""

    def __init__(self, groups: int):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv1d(1, 8, 3), nn.GroupNorm(groups, 8), nn.Conv1d(8, 3, 1)

    def forward(self, x):
        return self.b(self.norm(self.a(x[:, None])))


def test_group_norm_with_one_channel_per_group_gives_signed_permutations():
    model = randomised(GroupNormBlock(8))
    spec, new = one_exact_space(model, AUDIO, 8, trials=3)
    assert next(iter(spec.spaces.values())).kind == "signed_permutation", spec
    assert not torch.equal(new.a.weight, model.a.weight) and not torch.equal(new.norm.weight, model.norm.weight)
    # a scale other than +-1 on the norm's input changes the output (eps; the group must not be scaled)
    name = next(iter(spec.spaces))
    assert output_change(model, spec, name, torch.diag(torch.tensor([2.0] + [1.0] * 7)), AUDIO) > 1e-6


def test_group_norm_with_groups_permutes_within_each_group_only():
    model = randomised(GroupNormBlock(4))
    spec = symmetry_spec(model, AUDIO, check=False)
    assert sorted(s.size for s in spec.spaces.values()) == [2, 2, 2, 2] and not spec.pinned, spec
    assert {s.kind for s in spec.spaces.values()} == {"permutation"}
    report = verify_symmetry(model, AUDIO, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    # what the rule leaves out changes the output: a permutation across two groups, a sign inside a group
    cross = GroupNormBlock(4).double()
    cross.load_state_dict(model.state_dict())
    perm = torch.tensor([0, 2, 1, 3, 4, 5, 6, 7])
    with torch.no_grad():
        cross.a.weight.copy_(model.a.weight[perm])
        cross.a.bias.copy_(model.a.bias[perm])
        cross.norm.weight.copy_(model.norm.weight[perm])
        cross.norm.bias.copy_(model.norm.bias[perm])
        cross.b.weight.copy_(model.b.weight[:, perm])
    assert (cross(AUDIO) - model(AUDIO)).abs().max() > 1e-6
    name = next(iter(spec.spaces))
    assert output_change(model, spec, name, torch.diag(torch.tensor([-1.0, 1.0])), AUDIO) > 1e-6


class WeightNormBlock(nn.Module):
    """Linear -> ReLU -> weight-normalised Linear -> ReLU -> Linear. Without weight normalisation both hidden
    spaces are positive scaled permutations; ``||v||`` restricts them."""

    def __init__(self, dim, legacy: bool = False):
        super().__init__()
        self.a, self.c = nn.Linear(4, 6), nn.Linear(5, 3)
        if legacy:   # the hook-based torch.nn.utils.weight_norm (weight_g, weight_v)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.b = nn.utils.weight_norm(nn.Linear(6, 5), dim=dim)
        else:
            self.b = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5), dim=dim)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("legacy", [False, True])
def test_weight_norm_per_row_moves_the_magnitude_with_the_scaling(legacy):
    model = randomised(WeightNormBlock(0, legacy))
    spec = symmetry_spec(model, X, check=False)
    kinds = {s.size: s.kind for s in spec.spaces.values()}
    # the layer's input must keep ||v_i||: no scaling; its output's scaling goes to the magnitude g
    assert kinds == {6: "permutation", 5: "positive_scaled_permutation"} and not spec.pinned, spec
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    old, moved = dict(model.named_parameters()), dict(new.named_parameters())
    assert [k for k in old if torch.equal(old[k], moved[k])] == ["c.bias"]   # only the output bias stays
    # a positive scaling of the layer's input (a symmetry without weight normalisation) changes the output
    (six,) = [n for n, s in spec.spaces.items() if s.size == 6]
    assert output_change(model, spec, six, torch.diag(torch.tensor([2.0] + [1.0] * 5)), X) > 1e-6


def test_weight_norm_over_the_whole_weight_allows_no_scaling():
    model = randomised(WeightNormBlock(None))
    spec = symmetry_spec(model, X, check=False)
    assert {s.kind for s in spec.spaces.values()} == {"permutation"} and len(spec.spaces) == 2, spec
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    (five,) = [n for n, s in spec.spaces.items() if s.size == 5]
    assert output_change(model, spec, five, torch.diag(torch.tensor([2.0] + [1.0] * 4)), X) > 1e-6
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert torch.equal(new.b.parametrizations.weight.original0, model.b.parametrizations.weight.original0)


class Wav2Vec2Front(nn.Module):
    """wav2vec2's feature encoder and positional convolution in miniature: raw audio -> Conv1d -> GroupNorm with
    one channel per group -> GELU -> Conv1d -> GELU (the features, one hidden space), and a grouped Conv1d with
    weight normalisation over (out, in) per kernel tap (``dim=2``), trimmed and added back as a residual."""

    def __init__(self, with_norm: bool = True):
        super().__init__()
        self.c0, self.gn = nn.Conv1d(1, 8, 5, stride=2, bias=False), nn.GroupNorm(8, 8)
        self.c1 = nn.Conv1d(8, 8, 3, bias=False)
        pos = nn.Conv1d(8, 8, 4, padding=2, groups=2)
        self.pos = nn.utils.parametrizations.weight_norm(pos, dim=2) if with_norm else pos
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.gelu(self.c1(F.gelu(self.gn(self.c0(x[:, None])))))
        h = h + F.gelu(self.pos(h)[..., :-1])
        return self.head(h.transpose(1, 2))


def test_wav2vec2_front_end_group_norm_and_weight_normalised_positional_conv():
    model = randomised(Wav2Vec2Front())
    spec = symmetry_spec(model, AUDIO, check=False)
    assert not spec.pinned and sorted(s.size for s in spec.spaces.values()) == [4, 4, 8], spec
    report = verify_symmetry(model, AUDIO, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    old, moved = dict(model.named_parameters()), dict(new.named_parameters())
    still = sorted(k for k in old if torch.equal(old[k], moved[k]))
    # only the magnitudes per kernel tap (a norm over all channels: no symmetry moves it) and the output bias
    assert still == ["head.bias", "pos.parametrizations.weight.original0"], still
    # the stream (the grouped conv's channels) must not be scaled: ||v[:, :, k]|| would change
    (stream,) = [n for n, s in spec.spaces.items() if s.size == 4][:1]
    assert output_change(model, spec, stream, torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])), AUDIO) > 1e-6


def test_weight_norm_used_outside_a_layer_is_untransformed():
    class Reused(WeightNormBlock):
        def forward(self, x):   # the normalised weight is also read directly: v and g must stay
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.c(h) + self.b.weight.sum()

    model = randomised(Reused(0))
    spec = symmetry_spec(model, X, check=False)
    assert verify_symmetry(model, X, spec=spec, trials=2).ok
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert torch.equal(new.b.parametrizations.weight.original1, model.b.parametrizations.weight.original1)
