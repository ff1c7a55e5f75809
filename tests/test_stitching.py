"""Stitching (paper §4): Theorem 4.2 on twins, frozen models, the layers' constraints, eq. 4.3."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from intertwiners import data, models
from intertwiners._util import resolve_device
from intertwiners.stitching import layers as L
from intertwiners.stitching import matching as M
from intertwiners.stitching import stitch, stitchable_sites, stitching_penalty
from intertwiners.stitching.stitch import split_model
from intertwiners.training import accuracy as _accuracy
from intertwiners.training import train_one

SITES = ["relu1", "relu2", "relu3", "relu4"]
WIDTH = 8                          # the pair's width (myrtle8_digits): relu4 has 8 * WIDTH channels
DEVICE = resolve_device("auto")   # the device stitch(device="auto") uses


def accuracy(model, ds):
    """A model's test accuracy computed where stitch computes it (the caller's model is not moved)."""
    return _accuracy(copy.deepcopy(model).to(DEVICE), ds, DEVICE)


@pytest.fixture(scope="session")
def digits_data():
    return data.load("digits")


@pytest.fixture(scope="session")
def small_train(digits_data):
    """(first 400 training images, the whole test set): for the tests of a layer's structure, not its accuracy."""
    train, test = digits_data
    return train.subset(torch.arange(400)), test


@pytest.fixture(scope="session")
def pair(myrtle8_digits):
    """Two width-8 Myrtle CNNs trained on digits with different seeds (3 epochs; trained once per test run)."""
    return myrtle8_digits(0)[0], myrtle8_digits(1)[0]


def myrtle_twin(model, seed=0):
    """``model`` acted on by a random element of G_ReLU at every activation, by hand.

    At relu{i}: twin channel c is old channel sigma(c) scaled by s[c] > 0 (conv{i} rows and bn{i} parameters
    and running statistics permuted, bn{i} weight and bias scaled by s), and the next conv (or fc) takes
    column sigma(c) divided by s[c]. Returns the twin and {site: A} with h_twin = A h (A[c, sigma(c)] = s[c]).
    """
    g = torch.Generator().manual_seed(seed)
    twin = copy.deepcopy(model)
    elements = {}
    with torch.no_grad():
        for i in range(1, 5):
            conv, bn = getattr(twin, f"conv{i}"), getattr(twin, f"bn{i}")
            n = conv.out_channels
            sigma = torch.randperm(n, generator=g)
            s = torch.exp(0.5 * torch.randn(n, generator=g))
            conv.weight.copy_(conv.weight[sigma])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(bn, name)[sigma])
            bn.weight.mul_(s)
            bn.bias.mul_(s)
            nxt = getattr(twin, f"conv{i + 1}") if i < 4 else twin.fc
            nxt.weight.copy_(nxt.weight[:, sigma] / (s[:, None, None] if i < 4 else s))
            a = torch.zeros(n, n)
            a[torch.arange(n), sigma] = s
            elements[f"relu{i}"] = a
    return twin, elements


def live_channels(model, site, x):
    front, _ = split_model(copy.deepcopy(model).eval(), site)
    with torch.no_grad():
        h = front(x)
    return M.channel_columns(h).abs().amax(0) > 0


# --------------------------------------------------------------------------------------------------
# Theorem 4.2 on a twin
# --------------------------------------------------------------------------------------------------

def test_hand_made_twin_computes_the_same_function(pair, digits_data):
    model = pair[0]
    twin, elements = myrtle_twin(model)
    x = digits_data[1].x
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    # and the hidden features really differ by A at every site: h_twin = A h
    for site, a in elements.items():
        hf = split_model(copy.deepcopy(model).eval(), site)[0](x[:50]).detach()
        ht = split_model(copy.deepcopy(twin).eval(), site)[0](x[:50]).detach()
        torch.testing.assert_close(ht, L.apply_channel_map(hf, a), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ht, hf, atol=1e-3)


@pytest.mark.parametrize("site", SITES)
def test_theorem_4_2_grelu_recovers_a_twin(pair, digits_data, site):
    model = pair[0]
    twin, elements = myrtle_twin(model, seed=3)
    train, test = digits_data
    r = stitch(model, twin, site, "grelu", train, test, epochs=1, seed=0)
    assert r.penalty <= 0.5
    assert r.front_accuracy == accuracy(model, test)
    assert abs(r.back_accuracy - r.front_accuracy) <= 100.0 / len(test)   # the twin: equal up to rounding
    # the recovered layer is the twin's group element on every live channel
    live = live_channels(model, site, train.x)
    a = elements[site]
    assert torch.equal(r.matrix[:, live] != 0, a[:, live] != 0)
    torch.testing.assert_close(r.matrix[:, live], a[:, live], rtol=0.05, atol=1e-6)


def test_theorem_4_2_with_apply_symmetry_on_a_leaky_resnet(digits_data):
    sym = pytest.importorskip("intertwiners.symmetries")
    train, test = digits_data
    torch.manual_seed(0)
    model, _ = train_one("resnet20", "digits", 0, epochs=1, progress=False, data=digits_data,
                         activation="leaky_relu:0.3", widths=(4, 8, 8))
    model.eval()
    spec = sym.symmetry_spec(model, train.x[:2])
    twin = sym.apply_symmetry(model, sym.random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(test.x), model(test.x), rtol=1e-4, atol=1e-4)
    for site in ["relu", "layer2.0.relu2", "layer3.2.relu2"]:
        r = stitch(model, twin, site, "grelu", train, test, epochs=0)
        assert r.penalty <= 0.5, site
        assert L.is_permutation_times_positive_diagonal(r.matrix)


# --------------------------------------------------------------------------------------------------
# Frozen models, identity, eq. 4.3, model selection
# --------------------------------------------------------------------------------------------------

def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["full", "grelu"])
def test_front_and_back_stay_frozen_bit_identical(pair, small_train, kind):
    a, b = pair
    a.train()  # a caller's model in train mode: batch norm would update its statistics if it ran in train mode
    before_a, before_b = _snapshot(a), _snapshot(b)
    flags = [p.requires_grad for p in a.parameters()]
    r = stitch(a, b, "relu2", kind, *small_train, epochs=1)
    for snap, m in ((before_a, a), (before_b, b)):
        after = m.state_dict()
        assert all(torch.equal(snap[k], after[k]) for k in snap)
    assert a.training and [p.requires_grad for p in a.parameters()] == flags
    a.eval()
    # the stitched network's own copies did not drift either (batch-norm statistics included)
    for part, snap in ((r.model.front.inner, before_a), (r.model.back, before_b)):
        for k, v in part.state_dict().items():
            assert torch.equal(v, snap[k]), k
        assert not any(p.requires_grad for p in part.parameters())


def test_identity_stitch_of_a_model_with_itself_has_penalty_exactly_zero(pair, digits_data):
    for site in ("relu1", "relu3"):
        r = stitch(pair[0], pair[0], site, "identity", *digits_data)
        assert r.penalty == 0.0
        assert r.accuracy == r.front_accuracy == accuracy(pair[0], digits_data[1])
        assert torch.equal(r.matrix, torch.eye(r.matrix.shape[0]))
        assert r.bias is None


def test_penalty_follows_eq_4_3_against_a_manual_stitched_network(pair, digits_data):
    a, b = pair
    train, test = digits_data
    r = stitch(a, b, "relu3", "full", train, test, epochs=1)
    # independent slow implementation: walk the Sequential children by hand
    names = [n for n, _ in a.named_children()]
    cut = names.index("relu3") + 1
    correct = 0
    with torch.no_grad():
        for x, y in zip(test.x.split(64), test.y.split(64)):
            h = x
            for n in names[:cut]:
                h = getattr(a.eval(), n)(h)
            h = torch.einsum("ck,nkhw->nchw", r.matrix, h) + r.bias[None, :, None, None]
            for n in names[cut:]:
                h = getattr(b.eval(), n)(h)
            correct += (h.argmax(1) == y).sum().item()
    manual = 100.0 * correct / len(test)
    assert abs(manual - r.accuracy) <= 100.0 / len(test) + 1e-9   # at most one borderline sample
    fa, fb = accuracy(a, test), accuracy(b, test)
    assert (r.front_accuracy, r.back_accuracy) == (fa, fb)
    assert r.penalty == pytest.approx((fa + fb) / 2 - r.accuracy, abs=1e-12)
    assert stitching_penalty(90.0, 80.0, 70.0) == 15.0
    with pytest.raises(ValueError):
        stitching_penalty(90.0, 180.0, 70.0)


def test_model_selection_never_looks_at_the_test_labels(pair, digits_data):
    a, b = pair
    train, test = digits_data
    shuffled = data.ArrayDataset(test.x, test.y[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))],
                                 10, "digits-test")
    r1 = stitch(a, b, "relu4", "grelu", train, test, epochs=2, seed=5)
    r2 = stitch(a, b, "relu4", "grelu", train, shuffled, epochs=2, seed=5)
    assert torch.equal(r1.matrix, r2.matrix) and r1.best_epoch == r2.best_epoch   # also: deterministic
    assert r1.accuracy != r2.accuracy
    assert r1.history[0]["epoch"] == 0 and len(r1.history) == 3


# --------------------------------------------------------------------------------------------------
# The layers' constraints
# --------------------------------------------------------------------------------------------------

@given(st.sampled_from([(7,), (7, 3), (7, 3, 2), (7, 2, 3, 2)]), st.integers(1, 5), st.integers(0, 10**6))
def test_apply_channel_map_is_the_channel_contraction(spatial_shape, c_out, seed):
    g = torch.Generator().manual_seed(seed)
    n, *spatial = spatial_shape
    h = torch.randn(n, 4, *spatial, generator=g, dtype=torch.float64)
    m = torch.randn(c_out, 4, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    expected = torch.einsum("ck,nk...->nc...", m, h) + b.reshape(c_out, *([1] * len(spatial)))
    torch.testing.assert_close(L.apply_channel_map(h, m, b), expected)
    with pytest.raises(ValueError):
        L.apply_channel_map(h, torch.randn(3, 5, dtype=torch.float64))


def _assert_permutation_times_positive_diagonal(m):
    a = m.numpy()
    nz = a != 0
    assert (nz.sum(0) == 1).all() and (nz.sum(1) == 1).all()
    assert (a[nz] > 0).all()


@pytest.mark.parametrize("settings", ["default", "authors"])
def test_grelu_at_evaluation_is_exactly_a_permutation_times_a_positive_diagonal(pair, small_train, settings):
    r = stitch(*pair, "relu3", "grelu", *small_train, epochs=2, settings=settings)
    _assert_permutation_times_positive_diagonal(r.matrix)
    assert r.bias is None
    h = torch.rand(5, r.matrix.shape[1], 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(r.layer.eval()(h), torch.einsum("ck,nkhw->nchw", r.matrix, h))
    # the relaxed P used in training is doubly stochastic
    p = r.layer.p.detach()
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(len(p)), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(len(p)), atol=1e-3, rtol=0)


def test_authors_schedule_trains_the_permutation_first_then_the_scalings(pair, small_train):
    r = stitch(*pair, "relu4", "grelu", *small_train, epochs=2, settings="authors")
    assert r.settings["relaxation"] == "soft" and r.settings["optimizer"] == "sgd"
    assert r.history[1]["scale_change"] == 0.0 < r.history[2]["scale_change"]
    joint = stitch(*pair, "relu4", "grelu", *small_train, epochs=2)
    assert joint.history[1]["scale_change"] > 0.0


@pytest.mark.parametrize("relaxation", ["straight_through", "soft"])
def test_relaxations_forward_and_gradient(relaxation):
    layer = L.make_layer("grelu", 5, relaxation=relaxation)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.p.copy_(torch.rand(5, 5, generator=g) + torch.eye(5)[torch.randperm(5, generator=g)] * 3)
        layer.log_scale.copy_(torch.randn(5, generator=g))
    layer.project_()
    h = torch.rand(3, 5, 2, 2, generator=g)
    p_used = layer.hard_permutation() if relaxation == "straight_through" else layer.p.detach()
    expected = torch.einsum("ck,nkhw->nchw", p_used * layer.log_scale.exp().detach(), h)
    out = layer.train()(h)
    torch.testing.assert_close(out.detach(), expected)
    out.square().sum().backward()
    assert layer.p.grad is not None and layer.p.grad.abs().sum() > 0   # the relaxed P learns in both cases
    torch.testing.assert_close(layer.eval()(h).detach(), torch.einsum(
        "ck,nkhw->nchw", layer.hard_permutation() * layer.log_scale.exp().detach(), h))


@given(st.integers(2, 9), st.integers(0, 10**6))
def test_sinkhorn_projects_onto_the_birkhoff_polytope_and_rounding_is_a_permutation(n, seed):
    g = torch.Generator().manual_seed(seed)
    # an optimiser step can leave negative entries, even whole negative columns: still projected
    rough = torch.randn(n, n, generator=g).double()
    L.sinkhorn_(rough, iterations=2000, tol=1e-9)
    assert (rough >= 0).all()
    torch.testing.assert_close(rough.sum(0), torch.ones(n, dtype=rough.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(rough.sum(1), torch.ones(n, dtype=rough.dtype), atol=1e-6, rtol=0)
    p = torch.rand(n, n, generator=g).double() + 0.05
    L.sinkhorn_(p, iterations=2000, tol=1e-9)
    torch.testing.assert_close(p.sum(0), torch.ones(n, dtype=p.dtype), atol=1e-8, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(n, dtype=p.dtype), atol=1e-8, rtol=0)
    hard = L.hungarian_round(p)
    assert torch.equal(hard.sum(0), torch.ones(n, dtype=p.dtype)) and torch.equal(hard.sum(1), hard.sum(0))
    # no permutation scores higher against p (brute force for small n)
    if n <= 6:
        import itertools
        best = max(sum(float(p[i, s[i]]) for i in range(n)) for s in itertools.permutations(range(n)))
        assert float((hard * p).sum()) == pytest.approx(best, abs=1e-9)


@given(st.integers(2, 9), st.integers(0, 10**6), st.floats(0.0, 0.3))
def test_rounding_to_the_birkhoff_polytope_is_exact_and_moves_at_most_twice_the_marginal_error(n, seed, noise):
    """Altschuler, Weed & Rigollet (2017), Lemma 7: the rounded matrix is doubly stochastic, non-negative, and
    within 2 (|r(F) - 1|_1 + |c(F) - 1|_1) of F in L1."""
    g = torch.Generator().manual_seed(seed)
    f = (torch.rand(n, n, generator=g, dtype=torch.float64) + 0.01)
    f = f / f.sum(1, keepdim=True) * (1 + noise * (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5))
    bound = 2 * float((f.sum(1) - 1).abs().sum() + (f.sum(0) - 1).abs().sum())
    rounded = L.round_to_birkhoff_(f.clone())
    assert (rounded >= 0).all()
    torch.testing.assert_close(rounded.sum(0), torch.ones(n, dtype=f.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(rounded.sum(1), torch.ones(n, dtype=f.dtype), atol=1e-12, rtol=0)
    assert float((rounded - f).abs().sum()) <= bound + 1e-12


def test_sinkhorn_near_a_vertex_is_doubly_stochastic_after_its_last_sweep():
    """Two rows competing for one column leave another column with only the floor: Sinkhorn's sweeps converge
    slowly (far from the tolerance after 100), the rounding makes the result doubly stochastic anyway."""
    p = torch.eye(6)
    p[0, 1], p[1, 1], p[1, 0] = 1.0, 1.0, 0.0   # column 0 holds only row 0's 1, column 1 rows 0 and 1
    slow = p.clone().clamp_(min=1e-6)
    for _ in range(100):
        slow.div_(slow.sum(1, keepdim=True)).div_(slow.sum(0, keepdim=True))
    assert float((slow.sum(1) - 1).abs().max()) > 1e-3   # plain Sinkhorn is still far off
    L.sinkhorn_(p, iterations=100)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(6), atol=1e-6, rtol=0)


def test_orthogonal_stays_orthogonal(pair, small_train):
    r = stitch(*pair, "relu3", "orthogonal", *small_train, epochs=1, lr=1e-2)
    q = r.matrix.double()
    torch.testing.assert_close(q.T @ q, torch.eye(len(q), dtype=q.dtype), atol=1e-5, rtol=0)
    assert r.bias is None and r.best_epoch >= 0


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_has_the_rank(pair, small_train, rank):
    r = stitch(*pair, "relu4", f"low_rank:{rank}", *small_train, epochs=1)
    sv = torch.linalg.svdvals(r.matrix.double())
    assert sv[rank - 1] > 1e-3 * sv[0] and (sv[rank:] <= 1e-5 * sv[0]).all()   # rank r up to float32 rounding
    torch.testing.assert_close(r.matrix, r.layer.u.detach() @ r.layer.v.detach().T)
    assert r.bias is not None and r.kind == f"low_rank:{rank}" and r.rank == rank
    h = torch.randn(4, r.matrix.shape[1], 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(r.layer(h), torch.einsum("ck,nkhw->nchw", r.matrix, h)
                                   + r.bias[None, :, None, None], rtol=1e-4, atol=1e-5)


def test_full_stitch_is_nearly_lossless_and_grelu_is_a_valid_group_element(pair, digits_data):
    r = stitch(*pair, "relu4", "full", *digits_data, epochs=3)   # (2 epochs: 3.3 points on some CPUs, 0.6 at 3)
    assert r.penalty <= 3.0
    assert r.bias is not None and r.matrix.shape == (8 * WIDTH, 8 * WIDTH)


def test_bad_arguments_raise_value_errors(pair, digits_data):
    a, b = pair
    with pytest.raises(ValueError, match="unknown stitching kind"):
        stitch(a, b, "relu1", "affine", *digits_data)
    with pytest.raises(ValueError, match="rank"):
        stitch(a, b, "relu1", "low_rank", *digits_data)
    with pytest.raises(ValueError, match="rank"):
        stitch(a, b, "relu1", "grelu", *digits_data, rank=2)
    with pytest.raises(ValueError, match="unknown activation site"):
        stitch(a, b, "relu9", "grelu", *digits_data)
    with pytest.raises(ValueError, match="barycenter"):
        stitch(a, b, "relu4", "full", *digits_data, init="barycenter")
    with pytest.raises(ValueError, match="exceeds"):
        L.make_layer("low_rank:40", 16)


# --------------------------------------------------------------------------------------------------
# ResNet sites
# --------------------------------------------------------------------------------------------------

def test_resnet_sites_inside_blocks_are_refused_and_residual_outputs_work(digits_data):
    torch.manual_seed(0)
    model = models.resnet20(in_channels=1, widths=(4, 8, 8), activation="leaky_relu:0.2").eval()
    sites = stitchable_sites(model)
    assert sites == ["relu"] + [f"layer{s}.{b}.relu2" for s in (1, 2, 3) for b in range(3)]
    with pytest.raises(ValueError, match="residual connection bypasses"):
        stitch(model, model, "layer1.0.relu1", "grelu", *digits_data)
    r = stitch(model, model, "layer2.1.relu2", "identity", *digits_data)
    assert r.penalty == 0.0


# --------------------------------------------------------------------------------------------------
# Closed-form matches against independent computations
# --------------------------------------------------------------------------------------------------

def _stats(x, y, chunks=3):
    s = M.ChannelStats()
    for xb, yb in zip(x.chunk(chunks), y.chunk(chunks)):
        s.update(xb, yb)
    return s


def test_channel_stats_stream_like_numpy_corrcoef():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 5, 3, 3, generator=g)
    y = torch.rand(40, 4, 3, 3, generator=g) + x[:, :4]
    s = _stats(x, y, chunks=4)
    cols_x = x.permute(0, 2, 3, 1).reshape(-1, 5).double().numpy()
    cols_y = y.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    expected = np.corrcoef(cols_x.T, cols_y.T)[:5, 5:]
    np.testing.assert_allclose(s.correlation().numpy(), expected, atol=1e-10)


def test_matches_recover_exact_relations():
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(200, 6, 2, 2, generator=g))
    # G_ReLU: y = A x with A = P D
    sigma = torch.randperm(6, generator=g)
    a = torch.zeros(6, 6, dtype=torch.float64)
    a[torch.arange(6), sigma] = torch.rand(6, generator=g).double() + 0.5
    y = L.apply_channel_map(x.double(), a)
    torch.testing.assert_close(M.match_grelu(_stats(x, y)), a)
    torch.testing.assert_close(M.match_grelu(_stats(x, y), "lstsq"), a)
    torch.testing.assert_close(M.match_permutation(_stats(x, y)), (a != 0).double())
    # affine: y = W x + b
    w = torch.randn(4, 6, generator=g).double()
    b = torch.randn(4, generator=g).double()
    y = L.apply_channel_map(x.double(), w, b)
    m, c = M.match_full(_stats(x, y), ridge=0)
    torch.testing.assert_close(m, w)
    torch.testing.assert_close(c, b)
    # rank 2: exact when W has rank 2; the rank-r fit is the truncation of the exact one otherwise
    w2 = torch.randn(4, 2, generator=g).double() @ torch.randn(2, 6, generator=g).double()
    y = L.apply_channel_map(x.double(), w2, b)
    m, c = M.match_low_rank(_stats(x, y), 2, ridge=0)
    torch.testing.assert_close(m, w2)
    assert torch.linalg.matrix_rank(M.match_low_rank(_stats(x, y), 1)[0]) == 1
    # orthogonal: y = Q x
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g).double())
    y = L.apply_channel_map(x.double(), q)
    torch.testing.assert_close(M.match_orthogonal(_stats(x, y)), q)


def test_low_rank_match_is_the_best_rank_r_fit():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 5, generator=g).double()
    y = torch.randn(300, 4, generator=g).double() + x[:, :4]
    m, c = M.match_low_rank(_stats(x, y), 2, ridge=0)
    err = ((x @ m.T + c - y) ** 2).sum()
    # no random rank-2 perturbation of the fit does better
    for k in range(20):
        gk = torch.Generator().manual_seed(k)
        u, v = torch.randn(4, 2, generator=gk).double(), torch.randn(5, 2, generator=gk).double()
        mm = m + 0.05 * (u @ v.T)
        uu, ss, vv = torch.linalg.svd(mm)
        mm = (uu[:, :2] * ss[:2]) @ vv[:2]
        cc = y.mean(0) - mm @ x.mean(0)
        assert ((x @ mm.T + cc - y) ** 2).sum() >= err - 1e-9


def test_draw_pairs_never_repeats_and_is_seeded():
    from intertwiners.stitching import draw_pairs

    for n_models, n_pairs in [(2, 1), (5, 10), (8, 7)]:
        pairs = draw_pairs(n_models, n_pairs, seed=3)
        assert len(pairs) == n_pairs
        assert len({frozenset(p) for p in pairs}) == n_pairs
        assert all(i != j and 0 <= i < n_models and 0 <= j < n_models for i, j in pairs)
        assert pairs == draw_pairs(n_models, n_pairs, seed=3)
    assert draw_pairs(8, 7, seed=3) != draw_pairs(8, 7, seed=4)
    with pytest.raises(ValueError):
        draw_pairs(3, 4)
    with pytest.raises(ValueError):
        draw_pairs(1, 1)


def test_summary_confidence_interval_is_the_student_t_one():
    from scipy import stats as sps

    from intertwiners.stitching import summarize

    vals = [1.0, 2.0, 4.0, 7.0]
    rows = [{"kind": "grelu", "site": "relu1", "penalty": v} for v in vals] + \
           [{"kind": "full", "site": "relu1", "penalty": 3.0}]
    out = {s["kind"]: s for s in summarize(rows)}
    lo, hi = sps.t.interval(0.95, 3, loc=np.mean(vals), scale=sps.sem(vals))
    assert out["grelu"]["ci_low"] == pytest.approx(lo) and out["grelu"]["ci_high"] == pytest.approx(hi)
    # one pair: the interval is undefined (NaN), never a zero-width interval
    assert out["full"]["n"] == 1 and out["full"]["mean"] == 3.0
    assert math.isnan(out["full"]["ci_low"]) and math.isnan(out["full"]["ci_high"])
    assert not math.isnan(out["grelu"]["std"])


# --------------------------------------------------------------------------------------------------
# Sweep, plot and CLI over a zoo folder
# --------------------------------------------------------------------------------------------------

def _write_zoo(root, models_):
    import json

    zoo = root / "myrtle_cnn-digits"
    for k, m in enumerate(models_):
        folder = models.save(m, zoo / f"seed{k}")
        (folder / "metrics.json").write_text(json.dumps({"dataset": "digits", "seed": k}))
    return zoo


def test_sweep_rows_plot_and_cli(pair, small_train, tmp_path):
    import csv

    from intertwiners import cli
    from intertwiners.stitching import model_folders, plot_penalties, stitch_sweep

    zoo = _write_zoo(tmp_path, [pair[0], pair[1], pair[0]])
    models.save(pair[0], zoo / "seed7.partial")   # an interrupted training run is never picked up
    (zoo / "seed7.partial" / "metrics.json").write_text("{}")
    folders = model_folders(tmp_path)
    assert [f.name for f in folders] == ["seed0", "seed1", "seed2"]
    seen = []
    rows = stitch_sweep(folders, ["relu4"], ["identity", "grelu"], *small_train, n_pairs=2, pair_seed=0,
                        epochs=1, on_row=seen.append)
    assert rows == seen and len(rows) == 4
    for r in rows:
        assert all(isinstance(v, int | float | str | type(None)) for v in r.values())
        assert r["penalty"] == pytest.approx((r["front_accuracy"] + r["back_accuracy"]) / 2 - r["accuracy"])
        assert r["activation"] == "relu" and r["dataset"] == "digits" and r["site_index"] == 3
    skipped = stitch_sweep(folders, ["relu4"], ["identity"], *small_train, n_pairs=2, skip=lambda key: True)
    assert skipped == []
    fig = plot_penalties(rows, tmp_path / "fig1.png")
    assert (tmp_path / "fig1.png").stat().st_size > 1000 and len(fig.axes[0].lines) >= 2

    out = tmp_path / "out"
    code = cli.main(["stitch", str(zoo), "--pairs", "1", "--sites", "relu4", "--kinds", "identity,low_rank:2",
                     "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    with (out / "stitch.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert [r["kind"] for r in got] == ["identity", "low_rank:2"] and (out / "stitch.png").is_file()
    assert cli.main(["stitch", str(zoo), "--kinds", "nonsense", "--out", str(out)]) == 2


def test_mlp_features_are_stitched_with_a_linear_map(digits_data):
    torch.manual_seed(0)
    train, test = digits_data
    model = models.mlp(256, hidden=(12, 12)).eval()
    assert stitchable_sites(model) == ["act1", "act2"]
    assert stitch(model, model, "act2", "identity", train, test).penalty == 0.0
    twin = copy.deepcopy(model)
    sigma, s = torch.randperm(12), torch.rand(12) + 0.5
    with torch.no_grad():   # G_ReLU at act1 by hand: rows of fc1 permuted and scaled, columns of fc2 undone
        twin.fc1.weight.copy_(model.fc1.weight[sigma] * s[:, None])
        twin.fc1.bias.copy_(model.fc1.bias[sigma] * s)
        twin.fc2.weight.copy_(model.fc2.weight[:, sigma] / s)
    r = stitch(model, twin, "act1", "grelu", train, test, epochs=0)
    assert r.penalty <= 0.5 and r.matrix.shape == (12, 12)
    _assert_permutation_times_positive_diagonal(r.matrix)
