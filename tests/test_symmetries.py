"""Weight-space symmetries of the paper's models (§3.2, Proposition 3.4, Remark 3.6)."""

import copy

import numpy as np
import pytest
import torch
from conftest import warmed
from hypothesis import given, settings
from hypothesis import strategies as st

from intertwiners import extract_features, models
from intertwiners.groups import monomial_matrix
from intertwiners.symmetries import apply_symmetry, compare, random_symmetry, symmetry_spec, verify_symmetry

ACTIVATIONS = ["relu", "leaky_relu:0.2", "tanh", "sigmoid", "gaussian", "abs", "power:3", "power:2"]


def max_rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


def outputs_agree(model, new, x, tol):
    """Eval mode, train mode (batch statistics) and eval again after the train-mode update."""
    import copy
    model, new = copy.deepcopy(model), copy.deepcopy(new)
    errs = []
    with torch.no_grad():
        for train in (False, True, False):
            model.train(train)
            new.train(train)
            errs.append(max_rel(model(x), new(x)))
    assert max(errs) <= tol, errs
    return max(errs)


# --------------------------------------------------------------------------------------------------
# Invariance on the paper's architectures
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_myrtle_invariance_float64(activation, batch_norm):
    g = torch.Generator().manual_seed(0)
    model = models.myrtle_cnn(4, activation=activation, batch_norm=batch_norm, input_size=8).double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=g)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    assert list(spec.spaces) == ["relu1", "relu2", "relu3", "relu4"] and not spec.pinned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = apply_symmetry(model, random_symmetry(spec, g), spec)
    outputs_agree(model, new, x, 1e-9)
    # the input model is untouched and the copy really differs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.allclose(new.conv2.weight, model.conv2.weight)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gaussian"])
def test_myrtle_invariance_float32(activation):
    g = torch.Generator().manual_seed(1)
    model = models.myrtle_cnn(8, activation=activation, input_size=16)
    x = torch.randn(8, 3, 16, 16, generator=g)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    new = apply_symmetry(model, random_symmetry(spec, g), spec)
    outputs_agree(model, new, x, 1e-4)


def test_myrtle_groups_follow_the_activation_and_max_pooling():
    x = torch.randn(2, 3, 8, 8)
    kinds = {act: {k: s.kind for k, s in symmetry_spec(models.myrtle_cnn(4, activation=act, input_size=8),
                                                       x).spaces.items()} for act in ["relu", "tanh", "power:3"]}
    assert set(kinds["relu"].values()) == {"positive_scaled_permutation"}
    # relu1 is not max-pooled: tanh keeps its sign flips there; max-pooling after tanh removes them
    assert kinds["tanh"] == {"relu1": "signed_permutation", "relu2": "permutation", "relu3": "permutation",
                             "relu4": "permutation"}
    # x**3 allows any non-zero scaling, but max-pooling its output only positive ones
    assert kinds["power:3"]["relu1"] == "scaled_permutation"
    assert kinds["power:3"]["relu2"] == "positive_scaled_permutation"


@pytest.mark.parametrize("activation", ["relu", "tanh", "gaussian", "identity"])
@settings(max_examples=8, deadline=None)
@given(hidden=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_mlp_invariance_property(activation, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    model = models.mlp(5, hidden, 3, activation=activation).double()
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    spec = symmetry_spec(model, x)
    assert [s.size for s in spec.spaces.values()] == list(hidden)
    new = apply_symmetry(model, random_symmetry(spec, g), spec)
    with torch.no_grad():
        assert max_rel(model(x), new(x)) <= 1e-9


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_resnet20_invariance(shortcut, activation):
    g = torch.Generator().manual_seed(2)
    model = models.resnet20(activation=activation, shortcut=shortcut, widths=(4, 8, 16)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    assert not spec.pinned
    for _ in range(2):
        outputs_agree(model, apply_symmetry(model, random_symmetry(spec, g), spec), x, 1e-9)
    model32 = models.resnet20(activation=activation, shortcut=shortcut, widths=(4, 8, 16))
    x32 = x.float()
    warmed(model32, x32)
    spec32 = symmetry_spec(model32, x32)
    outputs_agree(model32, apply_symmetry(model32, random_symmetry(spec32, g), spec32), x32, 1e-4)


# --------------------------------------------------------------------------------------------------
# Remark 3.6: residual connections tie spaces
# --------------------------------------------------------------------------------------------------

def test_resnet20_option_b_ties_each_stage():
    model = models.resnet20(shortcut="B")
    spec = symmetry_spec(model, torch.randn(2, 3, 32, 32))
    sites = sorted(s for sp in spec.spaces.values() for s in sp.sites)
    assert len(sites) == 19 and len(set(sites)) == 19  # every site in exactly one space
    stream = {name: sp.sites for name, sp in spec.spaces.items() if len(sp.sites) > 1}
    assert stream == {
        "relu": ["relu", "layer1.0.relu2", "layer1.1.relu2", "layer1.2.relu2"],
        "layer2.0.relu2": ["layer2.0.relu2", "layer2.1.relu2", "layer2.2.relu2"],
        "layer3.0.relu2": ["layer3.0.relu2", "layer3.1.relu2", "layer3.2.relu2"]}
    inner = [sp for sp in spec.spaces.values() if len(sp.sites) == 1]
    assert sorted(sp.sites[0] for sp in inner) == sorted(f"layer{s}.{b}.relu1" for s in (1, 2, 3) for b in range(3))
    assert {spec.spaces[name].size for name in stream} == {16, 32, 64}


def test_resnet20_option_a_embeds_the_padded_shortcut():
    """Option A: zero-padded channels carry nothing from the shortcut, so the previous stage's stream space
    continues in the middle channels of the next stage and the padded channels form a new space."""
    model = models.resnet20(shortcut="A")
    spec = symmetry_spec(model, torch.randn(2, 3, 32, 32))
    assert not spec.pinned and len(spec.spaces) == 12
    stage1 = spec.spaces["relu"]
    assert stage1.size == 16
    assert stage1.sites == ["relu"] + [f"layer{s}.{b}.relu2" for s in (1, 2, 3) for b in range(3)]
    stage2 = spec.spaces["layer2.0.relu2[0:8,24:32]"]
    assert stage2.size == 16 and stage2.sites == [f"layer{s}.{b}.relu2" for s in (2, 3) for b in range(3)]
    stage3 = spec.spaces["layer3.0.relu2[0:16,48:64]"]
    assert stage3.size == 32 and stage3.sites == [f"layer3.{b}.relu2" for b in range(3)]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_stream_features_transform_by_the_tied_element(shortcut):
    """Eq. (3.5) at the end of residual blocks: f'_{<=m}(x) = phi(A_m) f_{<=m}(x), with one A per tied space."""
    g = torch.Generator().manual_seed(3)
    model = models.resnet20(shortcut=shortcut, widths=(4, 8, 16)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    el = random_symmetry(spec, g, monomial=True)
    new = apply_symmetry(model, el, spec)
    sites = ["layer1.2.relu2", "layer2.0.relu2", "layer3.2.relu2"]
    old_f, new_f = extract_features(model, sites, x), extract_features(new, sites, x)

    def expected(feat, pieces):
        # pieces: (space name, channel positions of its indices); relu: phi(P·D) = P·D
        out = feat.clone()
        for name, pos in pieces:
            perm, scale = el[name]
            pos = torch.as_tensor(pos)
            out[:, pos[perm]] = feat[:, pos] * scale.view(1, -1, 1, 1)
        return out

    if shortcut == "B":
        pieces = {"layer1.2.relu2": [("relu", range(4))], "layer2.0.relu2": [("layer2.0.relu2", range(8))],
                  "layer3.2.relu2": [("layer3.0.relu2", range(16))]}
    else:
        pieces = {"layer1.2.relu2": [("relu", range(4))],
                  "layer2.0.relu2": [("relu", range(2, 6)), ("layer2.0.relu2[0:2,6:8]", [0, 1, 6, 7])],
                  "layer3.2.relu2": [("relu", range(6, 10)), ("layer2.0.relu2[0:2,6:8]", [4, 5, 10, 11]),
                                     ("layer3.0.relu2[0:4,12:16]", [0, 1, 2, 3, 12, 13, 14, 15])]}
    for site in sites:
        torch.testing.assert_close(new_f[site], expected(old_f[site], pieces[site]), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The action on weights, against a slow independent implementation
# --------------------------------------------------------------------------------------------------

def test_mlp_weights_match_proposition_3_4():
    g = torch.Generator().manual_seed(4)
    model = models.mlp(4, (5, 3), 2, activation="relu").double()
    spec = symmetry_spec(model, torch.randn(2, 4, dtype=torch.float64))
    el = random_symmetry(spec, g)
    A1, A2 = el["act1"], el["act2"]
    new = apply_symmetry(model, el, spec)
    # W' = (A1 W1, A1 b1, A2 W2 phi(A1)^-1, A2 b2, W3 phi(A2)^-1, b3) with phi(A) = A for ReLU
    torch.testing.assert_close(new.fc1.weight, A1 @ model.fc1.weight)
    torch.testing.assert_close(new.fc1.bias, A1 @ model.fc1.bias)
    torch.testing.assert_close(new.fc2.weight, A2 @ model.fc2.weight @ torch.linalg.inv(A1))
    torch.testing.assert_close(new.head.weight, model.head.weight @ torch.linalg.inv(A2))
    torch.testing.assert_close(new.head.bias, model.head.bias)


def test_gaussian_phi_is_abs_in_the_consumer():
    g = torch.Generator().manual_seed(5)
    model = models.mlp(4, (6,), 2, activation="gaussian").double()
    spec = symmetry_spec(model, torch.randn(2, 4, dtype=torch.float64))
    A = random_symmetry(spec, g)["act1"]
    assert (A < 0).any()  # sign flips happen
    new = apply_symmetry(model, {"act1": A}, spec)
    torch.testing.assert_close(new.fc1.weight, A @ model.fc1.weight)
    torch.testing.assert_close(new.head.weight, model.head.weight @ torch.linalg.inv(A.abs()))


def test_batch_norm_parameters_and_running_statistics_move():
    """conv -> BN -> relu with A = P·D: the conv is only permuted, BN's gamma/beta carry D, the running
    statistics are permuted (slow per-channel loop as the reference)."""
    g = torch.Generator().manual_seed(6)
    model = models.myrtle_cnn(4, input_size=8).double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=g)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    el = random_symmetry(spec, g, monomial=True)
    new = apply_symmetry(model, {"relu1": el["relu1"]}, spec)
    perm, scale = el["relu1"]
    for j in range(4):
        i = int(perm[j])
        torch.testing.assert_close(new.conv1.weight[i], model.conv1.weight[j])
        torch.testing.assert_close(new.bn1.weight[i], scale[j] * model.bn1.weight[j])
        torch.testing.assert_close(new.bn1.bias[i], scale[j] * model.bn1.bias[j])
        torch.testing.assert_close(new.bn1.running_mean[i], model.bn1.running_mean[j])
        torch.testing.assert_close(new.bn1.running_var[i], model.bn1.running_var[j])
        torch.testing.assert_close(new.conv2.weight[:, i], model.conv2.weight[:, j] / scale[j])
    assert not torch.allclose(model.bn1.running_mean, torch.zeros(4, dtype=torch.float64))


def test_flatten_into_linear_moves_blocks_of_features():
    """Feature c*H*W + k after a flatten belongs to channel c: a channel permutation moves whole blocks."""
    from torch import nn
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=g)
    spec = symmetry_spec(model, x)
    assert list(spec.spaces) == ["1"]
    el = random_symmetry(spec, g, monomial=True)
    perm, scale = el["1"]
    new = apply_symmetry(model, el, spec)
    W, W2 = model[3].weight.view(2, 3, 16), new[3].weight.view(2, 3, 16)
    for j in range(3):
        torch.testing.assert_close(W2[:, int(perm[j])], W[:, j] / scale[j])
    with torch.no_grad():
        assert max_rel(model(x), new(x)) <= 1e-12


# --------------------------------------------------------------------------------------------------
# Non-invariance: elements outside the group change the output (so the tests above can fail)
# --------------------------------------------------------------------------------------------------

def _rotation(n, g):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return q


def test_rotation_on_a_relu_space_changes_the_output_and_is_rejected():
    g = torch.Generator().manual_seed(8)
    model = models.myrtle_cnn(4, batch_norm=False, input_size=8).double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=g)
    spec = symmetry_spec(model, x)
    Q = _rotation(8, g)
    with pytest.raises(ValueError, match="not in G"):
        apply_symmetry(model, {"relu2": Q}, spec)
    new = apply_symmetry(model, {"relu2": Q}, spec, check=False)
    with torch.no_grad():
        assert max_rel(model(x), new(x)) > 1e-3


def test_sign_flip_before_max_pool_changes_the_output():
    """tanh allows sign flips, but a max-pool after it does not: the analysis must drop them."""
    g = torch.Generator().manual_seed(9)
    model = models.myrtle_cnn(4, activation="tanh", batch_norm=False, input_size=8).double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=g)
    spec = symmetry_spec(model, x)
    assert spec.spaces["relu2"].kind == "permutation"
    flip = torch.diag(torch.tensor([-1.0] + [1.0] * 7, dtype=torch.float64))
    new = apply_symmetry(model, {"relu2": flip}, spec, check=False)
    with torch.no_grad():
        assert max_rel(model(x), new(x)) > 1e-3
    # on relu1 (no max-pool) the same flip is a symmetry
    new = apply_symmetry(model, {"relu1": flip[:4, :4]}, spec)
    with torch.no_grad():
        assert max_rel(model(x), new(x)) <= 1e-12


def test_negative_scaling_on_a_relu_space_changes_the_output():
    g = torch.Generator().manual_seed(10)
    model = models.mlp(4, (5,), 3).double()
    x = torch.randn(9, 4, dtype=torch.float64, generator=g)
    spec = symmetry_spec(model, x)
    D = torch.diag(torch.tensor([-2.0, 1, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ValueError):
        apply_symmetry(model, {"act1": D}, spec)
    new = apply_symmetry(model, {"act1": D}, spec, check=False)
    with torch.no_grad():
        assert max_rel(model(x), new(x)) > 1e-3


def test_resnet_tie_is_needed():
    """Proposition 3.4 applied naively to one block (producer layer1.1.bn2, consumer layer1.2.conv1), ignoring
    that the skip connections carry the same space on, changes the output: the tie of Remark 3.6 matters."""
    import dataclasses
    g = torch.Generator().manual_seed(11)
    model = models.resnet20(shortcut="B", widths=(4, 8, 16)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g)
    warmed(model, x)
    spec = symmetry_spec(model, x)
    el = random_symmetry(spec, g, monomial=True)
    kept = ("layer1.1.bn2", "layer1.2.conv1")
    untied = dataclasses.replace(spec, all_slots=tuple(
        s for s in spec.slots() if s.space != "relu" or s.tensor.rsplit(".", 1)[0] in kept))
    new = apply_symmetry(model, {"relu": el["relu"]}, untied)
    with torch.no_grad():
        assert max_rel(model.eval()(x), new.eval()(x)) > 1e-3
    tied = apply_symmetry(model, {"relu": el["relu"]}, spec)
    with torch.no_grad():
        assert max_rel(model.eval()(x), tied.eval()(x)) < 1e-12


# --------------------------------------------------------------------------------------------------
# The verifier and bad input
# --------------------------------------------------------------------------------------------------

def test_verify_names_every_space_and_mode():
    model = models.resnet20(widths=(4, 8, 16)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    warmed(model, x)
    report = verify_symmetry(model, x, generator=torch.Generator().manual_seed(0), trials=1)
    spaces = report.by_space()
    assert set(spaces) == set(symmetry_spec(model, x).spaces) | {"<all spaces>"}
    assert all(set(v) == {"eval", "train"} for v in spaces.values())
    assert report.max_rel <= 1e-9 and report.max_abs <= 1e-9
    assert "layer2.0.relu2[0:2,6:8]" in str(report)


def test_apply_rejects_bad_elements():
    model = models.mlp(4, (5,), 3)
    spec = symmetry_spec(model, torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown space"):
        apply_symmetry(model, {"nope": torch.eye(5)}, spec)
    with pytest.raises(ValueError, match="shape"):
        apply_symmetry(model, {"act1": torch.eye(4)}, spec)
    with pytest.raises(ValueError, match="non-finite"):
        apply_symmetry(model, {"act1": torch.full((5, 5), float("nan"))}, spec)
    with pytest.raises(ValueError):
        random_symmetry("not a spec")
    with pytest.raises(ValueError, match="non-finite"):  # also when membership is not checked
        apply_symmetry(model, {"act1": torch.full((5, 5), float("nan"))}, spec, check=False)
    # the identity changes nothing
    new = apply_symmetry(model, {"act1": torch.eye(5)}, spec)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), new.parameters()))


def test_sampled_matrix_edited_in_place_is_read_again():
    """apply_symmetry reuses the (perm, scale) behind a matrix from random_symmetry only while the matrix is
    unchanged: an in-place edit makes it read the matrix itself (here: no longer in G, so rejected)."""
    model = models.mlp(4, (5,), 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    el = random_symmetry(spec, torch.Generator().manual_seed(0))
    new = apply_symmetry(model, el, spec)
    assert torch.allclose(new(x), model(x), atol=1e-12)
    el["act1"][0, :] = 1.0
    with pytest.raises(ValueError, match="not in G"):
        apply_symmetry(model, el, spec)
    fresh = random_symmetry(spec, torch.Generator().manual_seed(1))
    fresh["act1"].data.fill_(float("nan"))  # .data bypasses the version counter; the entries are compared too
    with pytest.raises(ValueError, match="non-finite"):
        apply_symmetry(model, fresh, spec)


def test_dense_and_monomial_elements_agree():
    g = torch.Generator().manual_seed(12)
    model = models.myrtle_cnn(4, input_size=8).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    el = random_symmetry(spec, g, monomial=True)
    a = apply_symmetry(model, el, spec)
    b = apply_symmetry(model, {k: monomial_matrix(*v) for k, v in el.items()}, spec)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


class Cancelling(torch.nn.Module):
    """An MLP whose hidden units sit at 1e9 (a's bias) and whose output takes the constant back off (a buffer):
    in real arithmetic an MLP with O(1) outputs, but every float64 forward sums terms of size 1e9, so a correct
    permutation's output differs from the original's by rounding (~1e-7 relative) far above 1e-8, as in a deep
    train-mode batch-norm network."""

    def __init__(self):
        super().__init__()
        f64 = torch.float64
        self.a, self.b = torch.nn.Linear(4, 6, dtype=f64), torch.nn.Linear(6, 2, dtype=f64)
        with torch.no_grad():
            self.a.bias.add_(1e9)
            self.register_buffer("k", self.b.weight @ torch.full((6,), 1e9, dtype=f64))

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))) - self.k


def test_safety_check_judges_errors_against_the_models_rounding_noise():
    from intertwiners.symmetries.compare import noise_floor

    torch.manual_seed(0)
    model = Cancelling().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    floor = noise_floor(model, (x,), ("eval",))["eval"]
    assert floor > 1e-8 and noise_floor(models.mlp(4, (6,), 2).double(), (x,), ("eval",))["eval"] < 1e-13
    derived = symmetry_spec(model, x, check=False)
    (name,) = derived.spaces
    new = apply_symmetry(model, random_symmetry(derived, torch.Generator().manual_seed(1)), derived)
    err = compare(model, new, (x,), ("eval",))["eval"][1]
    assert 1e-8 < err <= 10 * floor     # over the fixed tolerance, within the model's own rounding
    spec = symmetry_spec(model, x)      # (the suite's guard fails this test on any safety pin)
    assert list(spec.spaces) == [name] and not spec.pinned


class SpecAugment(torch.nn.Module):
    """A speech-model encoder in miniature: in train mode the time steps drawn with numpy's global random state
    are replaced by a learned mask embedding (transformers' wav2vec2/HuBERT), a path the eval-mode capture does
    not take. ``embed``: False draws the steps but masks with zeros (no train-only parameter)."""

    def __init__(self, embed=True):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)
        self.mask_embed = torch.nn.Parameter(torch.randn(6)) if embed else None

    def forward(self, x):                                          # (B, T, 4)
        h = self.a(x)
        if self.training:
            steps = torch.from_numpy(np.random.rand(x.shape[1]) < 0.5)
            h = h.clone()
            h[:, steps] = self.mask_embed if self.mask_embed is not None else 0.0
        return self.c(torch.relu(self.b(h)))


@pytest.mark.safety_pins
def test_train_mode_only_parameters_are_checked_in_train_mode():
    """A parameter the eval-mode graph does not read: the as-derived spec moves the stream it is written into
    without it, which verify reports in train mode; symmetry_spec's check then runs train mode too and pins
    the stream, saying why. Random choices drawn with numpy are the same for a model and its copy."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    model = SpecAugment().double()
    derived = symmetry_spec(model, x, check=False)
    stream = next(n for n, s in derived.spaces.items() if s.size == 6 and any("a.weight" in str(sl) for sl in
                                                                                  derived.slots(n)))
    report = verify_symmetry(model, x, derived, generator=torch.Generator().manual_seed(0), trials=1)
    assert [(r.space, r.mode) for r in report.failures() if r.space != "<all spaces>"] == [(stream, "train")]
    spec = symmetry_spec(model, x)
    assert stream in spec.pinned and "does not read mask_embed" in spec.pinned[stream]
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(e[1] <= 1e-12 for e in compare(model, new, (x,)).values())
    zeros = SpecAugment(embed=False).double()                       # numpy's draws alone break nothing
    assert verify_symmetry(zeros, x, generator=torch.Generator().manual_seed(0)).ok
    assert not symmetry_spec(zeros, x).pinned


def test_verify_judges_errors_against_the_models_rounding_noise():
    """verify_symmetry as the safety check: a true symmetry of an ill-conditioned model (errors over the fixed
    tolerance, within ten times the model's own rounding noise) is no failure, and the report shows the floor;
    in float32 the floor is measured at float32's precision. A wrong element still fails."""
    torch.manual_seed(0)
    model = Cancelling().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    report = verify_symmetry(model, x, generator=torch.Generator().manual_seed(1), modes=("eval",))
    assert report.max_rel > report.rtol and report.ok and report.floor["eval"] > 1e-8
    assert "rounding-noise floor" in str(report)
    from intertwiners.symmetries.compare import noise_floor

    relu = models.mlp(4, (6,), 2)
    f32 = noise_floor(relu, (x.float(),), ("eval",))["eval"]
    assert 1e-9 < f32 < 1e-4                                        # float32 rounding, not float64's
    spec = symmetry_spec(relu, x.float())                           # G_ReLU: positive scalings
    tanh = copy.deepcopy(relu)
    tanh.act1 = torch.nn.Tanh()                                     # the same parameters, no scaling symmetry
    wrong = verify_symmetry(tanh, x.float(), spec, generator=torch.Generator().manual_seed(0), trials=1)
    assert not wrong.ok and wrong.floor and wrong.max_rel > 1e-2 > 10 * max(wrong.floor.values())


def test_safety_check_on_a_few_samples_of_a_large_batch():
    """The safety check runs on the first 8 samples of a larger example batch (same spaces as on the whole
    batch); a model that only runs on its full batch size is checked on the whole batch."""
    from intertwiners.symmetries.safety import _first_samples

    class FixedBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.reshape(32, 4))))

    x = torch.randn(32, 4, dtype=torch.float64)
    mlp = models.mlp(4, (6,), 2).double()
    assert _first_samples(mlp, (x,), 8)[0].shape == (8, 4)
    assert _first_samples(FixedBatch().double(), (x,), 8)[0].shape == (32, 4)
    assert _first_samples(mlp, {"x": x, "y": x[:5]}, 8)["x"].shape == (32, 4)   # no common batch axis
    assert list(symmetry_spec(mlp, x).spaces) == list(symmetry_spec(mlp, x[:8]).spaces)
    spec = symmetry_spec(FixedBatch().double(), x)
    assert spec.spaces and not spec.pinned


def test_safety_check_in_the_models_dtype_when_its_float64_copy_overflows():
    """A float32 model whose float64 copy gives non-finite outputs (TimesFM's do) is checked in float32: the
    copy's NaN said nothing about the spec and pinned every space."""

    class OverflowsInDouble(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if h.dtype == torch.float64:          # stands for a mask constant that overflows in float64 only
                h = h * torch.tensor(float("inf"), dtype=h.dtype) + h
            return self.b(h)

    torch.manual_seed(0)
    model, x = OverflowsInDouble(), torch.randn(5, 4)
    spec = symmetry_spec(model, x)
    assert list(spec.spaces) == [":relu"] and not spec.pinned
    assert verify_symmetry(model, x, spec=spec, trials=2).ok
