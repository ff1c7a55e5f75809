"""Alignment through the intertwiner group: planted recovery, canonical forms, interpolation, merging, bad input.

Planted recovery: for a model M and g = random_symmetry(spec), aligning g·M to M must give back M's
parameters (relative error <= 1e-6). The activation method needs every unit to be active somewhere on the
data (a unit that never fires cannot be told apart from another dead unit by its features), which each
test checks first. benchmarks/bench_alignment.py --planted runs 100 trials per model family.
"""

import numpy as np
import pytest
import torch
from torch import nn

import intertwiners as it
from intertwiners import models
from intertwiners.alignment.align import align_activations, align_weights
from intertwiners.alignment.interpolation import barrier, recompute_batchnorm
from intertwiners.alignment.spaces import space_slots
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec


def relerr(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    worst = 0.0
    for k, v in sa.items():
        if v.is_floating_point():
            e = float((v.double() - sb[k].double()).norm() / v.double().norm().clamp_min(1e-300))
            worst = e if not e <= worst else worst  # NaN-propagating
    return worst


def ready(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """float64, eval mode, batch-norm statistics of x (so that units are centred and active)."""
    model = model.double().eval()
    recompute_batchnorm(model, x, len(x)).eval()
    return model


def assert_alive(model, spec, x):
    feats = it.extract_features(model, spec.sites, x)
    for site, f in feats.items():
        ch = torch.movedim(f, 1, 0).reshape(f.shape[1], -1)
        assert (ch.abs().amax(1) > 0).all(), f"a unit at {site} never fires on the test data"


def planted_trials(model, x, method, trials, seed=0, check_alive=True):
    """Number of trials (of ``trials``) in which aligning g·M to M gives back M's parameters."""
    spec = symmetry_spec(model, x[:4])
    if method == "activations":
        if check_alive:
            assert_alive(model, spec, x)
        actions = {n: space_slots(spec, n, "sites") for n in spec.spaces}
    else:
        actions = {n: space_slots(spec, n) for n in spec.spaces}
    gen = torch.Generator().manual_seed(seed)
    ok = 0
    for _ in range(trials):
        g = random_symmetry(spec, gen, monomial=True)
        moved = apply_symmetry(model, g, spec)
        if method == "activations":
            found = align_activations(model, moved, spec, actions, x)
        else:
            found, _ = align_weights(model, moved, spec, actions)
        ok += relerr(model, apply_symmetry(moved, found, spec)) <= 1e-6
    return ok


def positive_biases(model):
    """Small positive biases, so that no ReLU unit of a network without batch norm is dead on N(0, 1) inputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(0.05, 0.2)
    return model


# ----------------------------------------------------------------------------------------------------
# Planted recovery
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_mlp_100_of_100_tiny_widths(method):
    torch.manual_seed(0)
    x = torch.randn(1024, 5, dtype=torch.float64)
    total = 0
    for hidden in [(3,), (3, 4), (5, 3, 4), (8, 6)]:
        total += planted_trials(ready(models.mlp(5, hidden=hidden), x), x, method, 25, seed=len(hidden))
    assert total == 100


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_mlp_wide(method):
    torch.manual_seed(1)
    x = torch.randn(4096, 8, dtype=torch.float64)
    assert planted_trials(ready(models.mlp(8, hidden=(512, 64)), x), x, method, 2) == 2


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_planted_myrtle(method, batch_norm):
    torch.manual_seed(2)
    x = torch.randn(96, 1, 8, 8, dtype=torch.float64)
    model = models.myrtle_cnn(width=3, in_channels=1, input_size=8, batch_norm=batch_norm)
    if not batch_norm:
        positive_biases(model)
    assert planted_trials(ready(model, x), x, method, 20) == 20


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_planted_resnet20(method, shortcut):
    torch.manual_seed(3)
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    model = ready(models.resnet20(shortcut=shortcut, in_channels=1, widths=(4, 8, 16)), x)
    assert planted_trials(model, x, method, 5) == 5


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_tanh_signed_permutations(method):
    torch.manual_seed(4)
    x = torch.randn(96, 1, 8, 8, dtype=torch.float64)
    model = ready(models.myrtle_cnn(width=3, in_channels=1, input_size=8, batch_norm=False, activation="tanh"), x)
    spec = symmetry_spec(model, x[:2])
    assert spec.spaces["relu1"].group.kind == "signed_permutation"
    assert planted_trials(model, x, method, 10) == 10


def test_planted_through_public_align_both_methods():
    torch.manual_seed(5)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    model = ready(models.resnet20(shortcut="A", in_channels=1, widths=(4, 8, 16)), x)
    spec = it.symmetry_spec(model, x[:2])
    g = it.random_symmetry(spec, torch.Generator().manual_seed(0))
    moved = it.apply_symmetry(model, g, spec)
    for method in ("activations", "weights"):
        r = it.align(model, moved, data=x, method=method)
        assert relerr(model, r.model) <= 1e-6
        assert set(r.elements) == set(spec.spaces)
        for name, el in r.elements.items():  # the form random_symmetry returns: (n, n) group elements
            assert el.shape == (spec.spaces[name].size,) * 2 and spec.spaces[name].group.contains(el)
        assert torch.allclose(r.model(x), moved(x), rtol=0, atol=1e-12)  # B's function, unchanged


@pytest.mark.parametrize("build", [lambda: models.mlp(5, hidden=(6, 4)),
                                   lambda: models.resnet20(shortcut="B", in_channels=1, widths=(4, 8, 16))])
def test_weight_matching_scores_kept_up_to_date_equal_scores_from_scratch(build):
    """The descent corrects each space's scores by the cross-products of the slices a permutation moved; after
    any sequence of permutations they equal the scores computed from scratch (the slow reference)."""
    from intertwiners.alignment.weight_matching import _Scores

    torch.manual_seed(16)
    a, b = build().double().eval(), build().double().eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) if isinstance(a, models.ResNet) else torch.randn(4, 5)
    spec = symmetry_spec(b, x.double())
    actions = {n: space_slots(spec, n) for n in spec.spaces}
    pa = {k: p.detach() for k, p in a.named_parameters()}
    pb = {k: p.detach() for k, p in b.named_parameters()}
    perms = {n: torch.arange(act.size) for n, act in actions.items()}
    kept = _Scores(pa, pb, actions, perms)
    for name in actions:
        kept.score(name)
    gen = torch.Generator().manual_seed(0)
    for step in range(3 * len(actions)):
        name = list(actions)[step % len(actions)]
        perm = perms[name].clone()
        idx = torch.randperm(len(perm), generator=gen)[:2]  # a transposition, or a random permutation
        perm[idx] = perm[idx.flip(0)]
        kept.set(name, perm if step % 2 else torch.randperm(len(perm), generator=gen))
    fresh = _Scores(pa, pb, actions, dict(perms))
    for name, act in actions.items():
        assert torch.allclose(kept.score(name), fresh.partial(act.slots), rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("build", [lambda: models.mlp(5, hidden=(8, 8, 8)),
                                   lambda: models.resnet20(shortcut="B", in_channels=1, widths=(4, 8, 16))])
def test_weight_matching_with_scores_freed_takes_the_same_steps(build, monkeypatch):
    """With a memory bound on the kept scores (``keep_bytes``), a score over it is freed once its space is
    solved and recomputed from scratch only when the space must be solved again: the descent makes the same
    assignments on the same decisions (same permutations, sweeps and number of Hungarian solves) as with every
    score kept, and with ``keep_bytes=0`` no score outlives its solve."""
    import intertwiners.alignment.weight_matching as wm

    torch.manual_seed(18)
    a, b = build().double().eval(), build().double().eval()  # unrelated: several sweeps, freed scores recomputed
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) if isinstance(a, models.ResNet) else torch.randn(4, 5)
    spec = symmetry_spec(b, x)
    actions = {n: space_slots(spec, n) for n in spec.spaces}
    pa = {k: p.detach() for k, p in a.named_parameters()}
    pb = {k: p.detach() for k, p in b.named_parameters()}
    solves, kept_after, computed = [], [], []
    real_hungarian, real_solve, real_partial = wm.hungarian_permutation, wm._Scores.solve, wm._Scores.partial

    def counting(score):
        solves.append(score.shape[0])
        return real_hungarian(score)

    def solve(self, name):
        out = real_solve(self, name)
        kept_after.append(sum(t.nbytes for t in self.scores.values()))
        return out

    def partial(self, slots):
        computed.append(len(slots))
        return real_partial(self, slots)

    monkeypatch.setattr(wm, "hungarian_permutation", counting)
    monkeypatch.setattr(wm._Scores, "solve", solve)
    monkeypatch.setattr(wm._Scores, "partial", partial)
    runs = {}
    for keep in (None, 0):
        solves.clear()
        kept_after.clear()
        computed.clear()
        perms, sweeps = wm.match_permutations(pa, pb, actions, keep_bytes=keep)
        runs[keep] = (perms, sweeps, list(solves), max(kept_after), len(computed))
    (p_all, s_all, n_all, most, c_all), (p_freed, s_freed, n_freed, least, c_freed) = runs[None], runs[0]
    assert c_freed > c_all  # premise: some freed score was needed again and recomputed
    assert s_all == s_freed and n_all == n_freed
    assert all(torch.equal(p_all[n], p_freed[n]) for n in actions)
    assert most > 0 and least == 0


def test_unchecked_spec_falls_back_to_the_checked_one(monkeypatch):
    """align traces without the spec's safety check and checks the aligned model instead; when that check
    fails it traces again with the safety check and aligns again (here the first check is forced to fail)."""
    import sys

    import intertwiners.symmetries as symmetries

    align_module = sys.modules["intertwiners.alignment.align"]  # the package's ``align`` is the function

    torch.manual_seed(17)
    x = torch.randn(256, 5, dtype=torch.float64)
    model = ready(models.mlp(5, hidden=(6, 4)), x)
    spec = it.symmetry_spec(model, x[:2])
    moved = it.apply_symmetry(model, it.random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    checks = []
    real_spec, real_same = symmetries.symmetry_spec, align_module.same_function

    def spy_spec(*args, **kwargs):
        checks.append(kwargs.get("check"))
        return real_spec(*args, **kwargs)

    monkeypatch.setattr(symmetries, "symmetry_spec", spy_spec)
    monkeypatch.setattr(align_module, "same_function", lambda *args: len(checks) > 1 and real_same(*args))
    r = it.align(model, moved, x, method="weights")
    assert checks == [False, True]
    assert relerr(model, r.model) <= 1e-6
    assert real_same(moved, r.model, x[:8])
    other = models.mlp(5, hidden=(6, 4)).double().eval()
    assert not real_same(moved, other, x[:8])  # the check is not vacuous


def test_permutations_alone_cannot_undo_scalings():
    """The non-invariance side: with planted positive scalings, the permutation-only alignment leaves a
    large parameter error, and not aligning at all leaves a larger one."""
    torch.manual_seed(6)
    x = torch.randn(1024, 5, dtype=torch.float64)
    model = ready(models.mlp(5, hidden=(6, 4)), x)
    spec = it.symmetry_spec(model, x[:2])
    moved = it.apply_symmetry(model, it.random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert relerr(model, moved) > 1e-2
    for method in ("activations", "weights"):
        assert relerr(model, it.align(model, moved, x, method=method, group="permutation").model) > 1e-2
        assert relerr(model, it.align(model, moved, x, method=method).model) <= 1e-6


def test_activation_statistics_stream_independently_of_batch_size():
    torch.manual_seed(7)
    x = torch.randn(300, 5, dtype=torch.float64)
    a, b = ready(models.mlp(5, hidden=(6,)), x), ready(models.mlp(5, hidden=(6,)), x)
    r1 = it.align(a, b, x, batch_size=300, monomial=True)
    r2 = it.align(a, b, x, batch_size=7, monomial=True)
    for name in r1.elements:
        assert torch.equal(r1.elements[name][0], r2.elements[name][0])
        assert torch.allclose(r1.elements[name][1], r2.elements[name][1], rtol=1e-10)


def test_least_squares_gl_element_for_a_linear_space():
    """LeakyReLU with slope 1 is linear: its space has GL symmetry, and activation matching recovers a dense
    planted GL element exactly by least squares on the features; weight matching by least squares on the
    weights, after matching the next space on the products that hide the GL element."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.LeakyReLU(1.0), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(256, 5, dtype=torch.float64)
    spec = it.symmetry_spec(model, x[:2])
    gl = [n for n, s in spec.spaces.items() if s.group.kind == "general_linear"]
    assert len(gl) == 1 and spec.spaces[gl[0]].sites
    g = it.random_symmetry(spec, torch.Generator().manual_seed(0))
    assert not spec.spaces[gl[0]].group.is_monomial and g[gl[0]].count_nonzero() == 16  # dense
    moved = it.apply_symmetry(model, g, spec)
    r = it.align(model, moved, x)
    assert relerr(model, r.model) <= 1e-6
    r = it.align(model, moved, x, method="weights")
    assert relerr(model, r.model) <= 1e-6
    assert r.found_by[gl[0]].startswith("weights (GL: least squares") and r.residual[gl[0]] <= 1e-12


# ----------------------------------------------------------------------------------------------------
# Canonical form
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: models.mlp(5, hidden=(6, 4)),
    lambda: models.myrtle_cnn(width=3, in_channels=1, input_size=8),
    lambda: models.myrtle_cnn(width=3, in_channels=1, input_size=8, batch_norm=False, activation="tanh"),
    lambda: models.resnet20(shortcut="B", in_channels=1, widths=(4, 8, 16)),
])
def test_canonical_forms_of_an_orbit_differ_by_a_permutation(build):
    torch.manual_seed(9)
    model = build().double().eval()
    x = torch.randn(8, *((5,) if isinstance(model[0] if isinstance(model, nn.Sequential) else None, nn.Flatten)
                         and model[1].in_features == 5 else (1, 8, 8)), dtype=torch.float64)
    recompute_batchnorm(model, x, len(x)).eval()
    spec = it.symmetry_spec(model, x[:2])
    moved = it.apply_symmetry(model, it.random_symmetry(spec, torch.Generator().manual_seed(2)), spec)
    ca, cb = it.canonicalize(model, x), it.canonicalize(moved, x)
    with torch.no_grad():
        assert torch.allclose(ca(x), model(x), rtol=1e-10, atol=1e-12)  # function-preserving
    assert torch.allclose(cb(x), moved(x), rtol=1e-10, atol=1e-12)
    assert relerr(ca, cb) > 1e-3  # still permuted ...
    r = it.align(ca, cb, method="weights", group="permutation", example_input=x)
    assert relerr(ca, r.model) <= 1e-9  # ... but by a permutation alone
    again = it.canonicalize(ca, x)
    assert relerr(ca, again) <= 1e-12  # idempotent


def test_canonical_incoming_norms_are_one():
    torch.manual_seed(10)
    model = models.mlp(5, hidden=(6, 4)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    c = it.canonicalize(model, x)
    for layer in (c.fc1, c.fc2):
        rows = torch.cat([layer.weight, layer.bias[:, None]], 1)
        assert torch.allclose(rows.norm(dim=1), torch.ones(rows.shape[0], dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Interpolation and merging
# ----------------------------------------------------------------------------------------------------

def test_barrier_formula_against_a_slow_reference():
    rng = np.random.default_rng(0)
    a = np.linspace(0, 1, 7)
    v = rng.normal(size=7)
    slow_up = max(v[i] - ((1 - a[i]) * v[0] + a[i] * v[-1]) for i in range(7))
    assert barrier(a, v, True) == pytest.approx(slow_up)
    assert barrier(a, v, False) == pytest.approx(max(((1 - a[i]) * v[0] + a[i] * v[-1]) - v[i] for i in range(7)))
    assert np.isnan(barrier(a, np.array([0, np.nan, 0, 0, 0, 0, 0.0]), True))  # NaN propagates


def test_interpolate_ends_and_a_flat_path():
    torch.manual_seed(11)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    a, b = models.mlp(5, hidden=(6,), num_classes=3), models.mlp(5, hidden=(6,), num_classes=3)
    curve = it.interpolate(a, b, (x, y), alphas=[0, 0.5, 1])
    from intertwiners.alignment.interpolation import evaluate
    assert curve.loss[0] == pytest.approx(evaluate(a, x, y)[0]) and curve.accuracy[-1] == evaluate(b, x, y)[1]
    flat = it.interpolate(a, a, (x, y), alphas=[0, 0.25, 1])
    assert abs(flat.barrier["loss"]) < 1e-6 and abs(flat.barrier["accuracy"]) < 1e-9
    with pytest.raises(ValueError, match="alphas"):
        it.interpolate(a, b, (x, y), alphas=[0.2, 1])
    with pytest.raises(ValueError, match="labels"):
        it.interpolate(a, b, x)


def _bn_chain() -> nn.Sequential:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return model


def test_recomputed_batchnorm_statistics_are_the_eval_mode_statistics_norm_after_norm():
    """Each norm gets the mean and population variance of its input as the eval-mode model computes it, with the
    earlier norm already recomputed (numpy, layer by layer), whatever the batch size of the passes."""
    x = torch.randn(100, 3, dtype=torch.float64)
    model = _bn_chain()
    lin1, bn1, lin2 = (m.state_dict() for m in (model[0], model[1], model[3]))
    xs = x.numpy()
    h1 = xs @ lin1["weight"].numpy().T + lin1["bias"].numpy()
    m1, v1 = h1.mean(0), h1.var(0)
    z1 = np.maximum((h1 - m1) / np.sqrt(v1 + 1e-5) * bn1["weight"].numpy() + bn1["bias"].numpy(), 0)
    h2 = z1 @ lin2["weight"].numpy().T + lin2["bias"].numpy()
    for batch_size in (100, 7):     # one pass with hooks; one streamed pass per norm
        recompute_batchnorm(model, x, batch_size=batch_size)
        assert model.training                          # the mode it had is kept
        np.testing.assert_allclose(model[1].running_mean.numpy(), m1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(model[1].running_var.numpy(), v1, rtol=1e-12)
        np.testing.assert_allclose(model[4].running_mean.numpy(), h2.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(model[4].running_var.numpy(), h2.var(0), rtol=1e-12)
    model.eval()
    with torch.no_grad():
        out = model(x)
    np.testing.assert_allclose(out.mean(0).numpy(), model[4].bias.detach().numpy(), atol=1e-10)


def test_a_batchnorm_run_twice_gets_the_train_mode_reset():
    """A norm called twice in one forward pass has no single input: the reset averages its train-mode batch
    statistics over the calls (the usual reset), rather than keeping one call's."""
    torch.manual_seed(13)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2, self.bn = nn.Linear(3, 4), nn.Linear(3, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.lin1(x)) + self.bn(self.lin2(x))

    model = Twice().double()
    x = torch.randn(50, 3, dtype=torch.float64)
    recompute_batchnorm(model, x, batch_size=50)
    with torch.no_grad():
        h1, h2 = model.lin1(x), model.lin2(x)
    torch.testing.assert_close(model.bn.running_mean, (h1.mean(0) + h2.mean(0)) / 2)
    torch.testing.assert_close(model.bn.running_var, (h1.var(0) + h2.var(0)) / 2)


def test_merge_of_an_orbit_gives_back_the_model():
    torch.manual_seed(13)
    x = torch.randn(1024, 5, dtype=torch.float64)
    model = ready(models.mlp(5, hidden=(6, 4)), x)
    spec = it.symmetry_spec(model, x[:2])
    moved = [it.apply_symmetry(model, it.random_symmetry(spec, torch.Generator().manual_seed(s)), spec)
             for s in range(2)]
    merged = it.merge([model] + moved, x)
    assert relerr(model, merged) <= 1e-6
    with pytest.raises(ValueError, match="at least two"):
        it.merge([model], x)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_value_error():
    # seeded: the last check needs every ReLU unit alive on these 16 samples (a dead unit's space is matched
    # by its weights by design; unseeded, about half the draws had one, and the test failed now and then)
    torch.manual_seed(1)
    x = torch.randn(16, 5)
    a = models.mlp(5, hidden=(6,))
    with pytest.raises(ValueError, match="differ|different"):
        it.align(a, models.mlp(5, hidden=(7,)), x)
    with pytest.raises(ValueError, match="differ|different"):
        it.align(a, models.mlp(5, hidden=(6, 6)), x)
    with pytest.raises(ValueError, match="does not fit"):
        it.align(a, models.mlp(5, hidden=(6,)), torch.randn(16, 4))
    with pytest.raises(ValueError, match="needs data"):
        it.align(a, a, example_input=x)
    with pytest.raises(ValueError, match="method"):
        it.align(a, a, x, method="magic")
    with pytest.raises(ValueError, match="unknown spaces"):
        it.align(a, a, x, spaces=["nope"])
    linear = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = it.symmetry_spec(linear, x[:2])
    siteless = [n for n, s in spec.spaces.items() if not s.sites]
    assert siteless  # the GL space between the two linear maps
    r = it.align(linear, linear, x)  # no refusal: spaces without sites are matched by their weights
    assert all(r.found_by[n].startswith("weights (GL: least squares") for n in siteless)
    assert all(r.found_by[n] == "activations" for n, s in spec.spaces.items() if s.sites)


class TinyTransformerBlock(nn.Module):
    """Embedding, pre-LayerNorm attention (2 heads, written out), pre-LayerNorm GELU MLP, head."""

    def __init__(self, d=8, heads=2, hidden=16):
        super().__init__()
        self.emb = nn.Linear(4, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)
        self.heads = heads

    def forward(self, x):
        x = self.emb(x)
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.head(x)


def test_planted_transformer_block():
    """A small transformer block (LayerNorm residual stream, written-out attention, GELU MLP): a random
    element of its whole group -- head permutation and per-head GL maps on queries/keys and values/outputs
    included -- is recovered exactly by weights; by activations on the spaces with activation sites and the
    attention space (matched by its weights in either method; the stream has no sites)."""
    torch.manual_seed(14)
    model = TinyTransformerBlock().double().eval()
    x = torch.randn(64, 5, 4, dtype=torch.float64)
    spec = it.symmetry_spec(model, x[:2])
    assert not spec.pinned and [s.kind for s in spec.spaces.values()].count("attention_heads") == 1
    readable = [n for n, s in spec.spaces.items() if s.sites or s.kind == "attention_heads"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = it.random_symmetry(spec, gen)
        moved = it.apply_symmetry(model, g, spec)
        assert relerr(model, moved) > 1e-3
        r = it.align(model, moved, x, method="weights")
        assert not r.skipped and relerr(model, r.model) <= 1e-6
        moved = it.apply_symmetry(model, {n: g[n] for n in readable}, spec)
        r = it.align(model, moved, x, spaces=readable)
        assert not r.skipped and relerr(model, r.model) <= 1e-6


def test_head_invariant_similarity_against_explicit_products():
    """The per-head similarity computed from small Gram blocks equals the cosine of the explicit invariants
    X_h^T Y_h (F x F' matrices), and those invariants do not change under per-head maps (A on X, A^-T on Y)."""
    from intertwiners.alignment.attention import _invariant_similarity

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    xa, ya, xb, yb = rand(3, 2, 7), rand(3, 2, 5), rand(4, 2, 7), rand(4, 2, 5)
    got = _invariant_similarity(xa, ya, xb, yb)
    inv_a, inv_b = xa.mT @ ya, xb.mT @ yb
    for i in range(3):
        for j in range(4):
            want = (inv_a[i] * inv_b[j]).sum() / (inv_a[i].norm() * inv_b[j].norm())
            assert torch.allclose(got[i, j], want, atol=1e-12)
    A = rand(3, 2, 2) + 2 * torch.eye(2, dtype=torch.float64)
    moved = _invariant_similarity(A @ xa, torch.linalg.inv(A).mT @ ya, xb, yb)
    assert torch.allclose(moved, got, atol=1e-10)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_planted_recovery_on_transformers(family):
    """GPT-2 (fused Conv1D qkv, tied unembedding) and Llama (RMSNorm stream with signs, gated MLP with
    scalings, grouped-query attention with rotary embeddings): a random element of the whole group is
    undone exactly by weight matching, attention blocks included."""
    pytest.importorskip("transformers")
    import replicas

    model, ids = {"gpt2": replicas.gpt2_tiny, "llama": replicas.llama_tiny}[family](dtype=torch.float64)
    spec = it.symmetry_spec(model, ids)
    for seed in range(2):
        moved = it.apply_symmetry(model, it.random_symmetry(spec, torch.Generator().manual_seed(seed)), spec)
        assert relerr(model, moved) > 0.1
        r = it.align(model, moved, example_input=ids, method="weights")
        assert not r.skipped and relerr(model, r.model) <= 1e-6


class ResidualMLP(nn.Module):
    """h = relu(a(x)); h = h + relu(b(h)): b maps the space of h to itself (W -> P D W D^-1 P^T)."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(h + torch.relu(self.b(h)))


class RecurrentCell(nn.Module):
    """One weight applied three times: h <- tanh(w(h) + i(x))."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.i, self.w, self.o = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.i(x))
        for _ in range(3):
            h = torch.tanh(self.w(h) + self.i(x))
        return self.o(h)


def dead_unit_mlp():
    m = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        m[0].bias[:2] = -100.0  # two units that never fire: the data cannot tell them apart
    return m


@pytest.mark.parametrize("build, rows", [(ResidualMLP, 16), (RecurrentCell, 16), (dead_unit_mlp, 16),
                                         (lambda: nn.Sequential(nn.Linear(3, 24), nn.ReLU(), nn.Linear(24, 2)), 8)],
                         ids=["residual-self-map", "recurrent", "dead-units", "fewer-samples-than-units"])
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_recovery_on_self_maps_dead_units_and_few_samples(build, rows, method):
    """Planted g·M aligned back to M exactly by both methods; where the data cannot identify a space's
    coordinates activation matching says it used the weights: for the dead units only (the live ones keep the
    pairs the data matched), for every unit when there are fewer samples than units."""
    torch.manual_seed(3)
    model = build().double().eval()
    x = torch.randn(rows, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    assert spec.spaces
    for trial in range(2):
        g = random_symmetry(spec, torch.Generator().manual_seed(trial), monomial=True)
        r = it.align(model, apply_symmetry(model, g, spec), x, method=method)
        assert relerr(model, r.model) <= 1e-6
        assert max(r.residual.values()) <= 1e-6
        assert set(r.found_by) == set(spec.spaces)
    if method == "activations" and build is dead_unit_mlp:   # the two dead units are matched by the weights
        assert set(r.found_by.values()) == {"activations on 4 of 6 coordinates, weights on the rest (dead or twin "
                                            "units)"}
    elif method == "activations" and build is not ResidualMLP and build is not RecurrentCell:
        assert set(r.found_by.values()) == {"weights"}  # too few samples for any coordinate: matched by weights


def test_activation_matching_reports_a_bad_fit():
    """Two unrelated models: the residual of the fit is reported and is not small (a checker that can fail)."""
    torch.manual_seed(4)
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    r = it.align(a, b, torch.randn(32, 3, dtype=torch.float64))
    assert min(r.residual.values()) > 1e-2


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_recovery_on_a_tiny_llama_with_grouped_query_attention(method):
    """A Llama-style model (RMSNorm, gated MLP, 4 query heads sharing 2 key/value heads): both methods give
    the planted model back; spaces whose sites cannot be read are matched by their weights (found_by)."""
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, use_cache=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).double().eval()
    ids = torch.arange(16).reshape(2, 8)
    spec = symmetry_spec(model, ids)
    assert any(s.kind == "attention_heads" for s in spec.spaces.values())
    g = random_symmetry(spec, torch.Generator().manual_seed(1), monomial=True)
    r = it.align(model, apply_symmetry(model, g, spec), ids, example_input=ids, method=method)
    assert relerr(model, r.model) <= 1e-5  # RMSNorm computes in float32 inside
    assert set(r.found_by) == set(spec.spaces)


def _distance(a: nn.Module, b: nn.Module) -> float:
    """||A - B|| / ||A|| over all parameters (float64)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    with torch.no_grad():
        num = sum(float((pa[k].double() - pb[k].double()).pow(2).sum()) for k in pa)
        return (num / sum(float(p.double().pow(2).sum()) for p in pa.values())) ** 0.5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_weight_matching_of_unrelated_transformers_keeps_outputs_and_does_not_push_weights_apart(family):
    """Two unrelated random transformers (different seeds): the aligned B computes B's logits to float32
    rounding, and its weights are not farther from A's than B's own (alignment may fail to bring them
    closer, never push them apart: an element worse than the identity is not taken). Before the per-head
    maps were conditioned, the least-squares maps of the attention heads (A_g fitted on the queries, A_g^-T
    applied to the keys unseen) pushed B 5 to 15 times farther from A and moved its outputs."""
    tf = pytest.importorskip("transformers")
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=16, use_cache=False)
        build = tf.GPT2LMHeadModel
    else:
        cfg = tf.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                             use_cache=False)
        build = tf.LlamaForCausalLM
    torch.manual_seed(0)
    a, b = build(cfg).eval(), build(cfg).eval()
    ids = torch.arange(16).reshape(2, 8)
    r = it.align(a, b, example_input=ids, method="weights")
    with torch.no_grad():
        want, got = b(ids).logits, r.model(ids).logits
    assert float((got - want).norm() / want.norm()) <= 1e-5
    before, after = _distance(a, b), _distance(a, r.model)
    assert after <= 1.01 * before, (before, after)
    attention = [n for n, s in r.spec.spaces.items() if s.kind == "attention_heads"]
    assert attention and all(r.found_by[n].startswith("attention weights") for n in attention)


def test_per_head_maps_fit_both_sides_and_keep_the_identity_when_it_is_closer():
    """The per-head map M of an attention side (M on queries/values, M^-T on keys/output columns): for heads
    related by a map it is found exactly; for unrelated heads the map chosen is no farther from A's heads than
    the identity or any other candidate, well conditioned, and its cost is the squared distance computed
    with an explicit inverse. The least-squares map of one side alone (the old choice) is far worse there."""
    from intertwiners.alignment.attention import MAX_CONDITION, _fit_blocks, head_costs

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    h, d, f = 3, 6, 7  # barely more features than rows: one side's least-squares map is ill-conditioned
    xs, ys = rand(h, d, f), rand(h, d, f)
    planted = torch.linalg.qr(rand(h, d, d))[0] * torch.exp(rand(h, 1, d) * 0.3)
    maps, costs, counts = _fit_blocks("general_linear", planted @ xs, xs, torch.linalg.inv(planted).mT @ ys, ys,
                                      ("queries", "keys"))
    assert torch.allclose(maps, planted, atol=1e-10) and float(costs.max()) <= 1e-18
    assert set(counts) <= {"least squares on queries", "least squares on keys"}
    xt, yt = rand(h, d, f), rand(h, d, f)
    maps, costs, counts = _fit_blocks("general_linear", xt, xs, yt, ys, ("queries", "keys"))
    slow = ((maps @ xs - xt).pow(2).sum((1, 2)) + (torch.linalg.inv(maps).mT @ ys - yt).pow(2).sum((1, 2)))
    assert torch.allclose(costs, slow, rtol=1e-10)
    assert bool((torch.linalg.cond(maps) <= MAX_CONDITION).all())
    eye = torch.eye(d, dtype=torch.float64).expand(h, d, d)
    assert bool((costs <= head_costs(eye, xt, xs, yt, ys)).all())
    one_side = torch.linalg.lstsq(xs.mT, xt.mT).solution.mT
    assert bool((head_costs(one_side, xt, xs, yt, ys) > 10 * costs).any())
    assert sum(counts.values()) == h


class TwoBlockResidualMLP(nn.Module):
    """h = relu(a(x)); h = h + relu(b1(h)); h = h + relu(b2(h)): two self-maps of one space."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.c = nn.Linear(3, width), nn.Linear(width, 2)
        self.b1, self.b2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b1(h))
        return self.c(h + torch.relu(self.b2(h)))


def _strong_diagonal(model: nn.Module, value: float) -> nn.Module:
    """Self-maps whose diagonal entries (which the space's own scaling leaves alone) are ``value``."""
    with torch.no_grad():
        for name in ("b1", "b2", "w"):
            if hasattr(model, name):
                getattr(model, name).weight.diagonal().fill_(value)
    return model


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_recovery_through_self_maps_whose_rows_have_no_unit_norm(width, method):
    """Two self-maps with diagonal 0.9: a row norm over the self-maps' rows would be sqrt(d² |a_j|² + 0.81 +
    0.81 + ...) > 1 for every scale d, so no unit norm exists there. Before the canonical form left self-maps
    out of a space's incoming slices, its passes drifted and weight matching returned a wrong scale
    (relative parameter error ~1 at width 1)."""
    torch.manual_seed(0)
    model = _strong_diagonal(TwoBlockResidualMLP(width), 0.9).double().eval()
    x = torch.randn(32, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    assert list(spec.spaces) and all(s.group.is_monomial for s in spec.spaces.values())
    g = random_symmetry(spec, torch.Generator().manual_seed(1), monomial=True)
    moved = apply_symmetry(model, g, spec)
    assert relerr(model, moved) > 0.1
    r = it.align(model, moved, x, method=method)
    assert relerr(model, r.model) <= 1e-6
    assert max(r.residual.values()) <= 1e-6


def test_canonical_form_of_a_recurrent_cell_with_a_dominant_diagonal():
    """tanh recurrent cell (signed permutations) whose self-map has the largest entry of every row on the
    diagonal (a sign flip leaves it alone): the canonical forms of M and g·M differ by a permutation only,
    so weight matching gives M back."""
    torch.manual_seed(2)
    model = _strong_diagonal(RecurrentCell(4), 2.0).double().eval()
    x = torch.randn(16, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    g = random_symmetry(spec, torch.Generator().manual_seed(3), monomial=True)
    assert any(bool((s < 0).any()) for _, s in g.values())
    r = it.align(model, apply_symmetry(model, g, spec), x, method="weights")
    assert relerr(model, r.model) <= 1e-6


@pytest.mark.parametrize("width, rows", [(1, 1), (1, 16), (2, 1), (2, 16), (3, 1)])
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_planted_recovery_at_widths_one_and_two(width, rows, method):
    """Width 1 (the group is the positive scalings, no permutation) and 2 (one swap), with a single sample
    (no correlation to read: before, activation matching raised 'needs at least 2 feature rows' instead of
    handing the space to the weights) and with more samples than units."""
    torch.manual_seed(width + rows)
    model = TwoBlockResidualMLP(width).double().eval()
    x = torch.randn(rows, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    (space,) = spec.spaces.values()
    assert space.size == width
    for seed in range(2):
        g = random_symmetry(spec, torch.Generator().manual_seed(seed), monomial=True)
        r = it.align(model, apply_symmetry(model, g, spec), x, method=method)
        assert relerr(model, r.model) <= 1e-6
        if method == "activations" and rows <= width:
            assert set(r.found_by.values()) == {"weights"}  # the data cannot identify the units: said so


def test_a_unit_dead_at_one_site_of_a_space_is_read_at_its_other_sites():
    """Residual MLP whose block never fires on two units (relu(b(h)) is 0 there) while h itself is alive:
    the space's coordinates are told apart at its other sites, so activation matching keeps the space
    (before, one constant channel at any site handed the whole space to the weights) and is exact."""
    torch.manual_seed(5)
    model = ResidualMLP(6)
    with torch.no_grad():
        model.b.bias[:2] = -100.0
    model = model.double().eval()
    x = torch.randn(64, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    (name,) = spec.spaces
    g = random_symmetry(spec, torch.Generator().manual_seed(0), monomial=True)
    r = it.align(model, apply_symmetry(model, g, spec), x, method="activations")
    assert r.found_by == {name: "activations"}
    assert relerr(model, r.model) <= 1e-6


def test_canonical_form_is_invariant_on_a_width_one_residual_space():
    """Width 1 (no permutation): M and g·M for a positive scaling g have the SAME canonical form, with two
    self-maps of diagonal 0.9 whose rows no scale can bring to unit norm, and the form keeps the function."""
    torch.manual_seed(1)
    model = _strong_diagonal(TwoBlockResidualMLP(1), 0.9).double().eval()
    x = torch.randn(8, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    (name,) = spec.spaces
    moved = apply_symmetry(model, {name: (torch.zeros(1, dtype=torch.long), torch.tensor([7.0], dtype=torch.float64))},
                           spec)
    assert relerr(model, moved) > 0.1
    ca, cb = it.canonicalize(model, x[:4]), it.canonicalize(moved, x[:4])
    assert relerr(ca, cb) <= 1e-12
    with torch.no_grad():
        assert torch.allclose(ca(x), model(x), rtol=1e-10, atol=1e-12)
    incoming = [ca.a.weight, ca.a.bias, ca.b1.bias, ca.b2.bias]  # scaled by d; the self-maps' weights are not
    assert float(sum(t.detach().norm() ** 2 for t in incoming)) == pytest.approx(1.0)


def test_independent_models_are_matched_by_their_activations():
    """Two independently initialised MLPs are not copies of each other: every matched pair is not each row's best
    correlation, yet each model's own units differ, so the data identifies the space and activation matching
    is used (before, such pairs went wholesale to the weights: trained digits pairs were matched by weights
    under method="activations")."""
    torch.manual_seed(21)
    a = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    b = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    x = torch.randn(256, 3, dtype=torch.float64)
    r = it.align(a, b, x, method="activations")
    assert set(r.found_by.values()) == {"activations"}


def test_twin_units_are_matched_by_their_weights():
    """Two units of one model computing the same feature (one a scaled copy of the other) cannot be told apart by
    the data: the weights match those two (the other four keep the pairs the data matched), and the planted
    element comes back exactly."""
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[0].weight[1] = 2.0 * model[0].weight[0]
        model[0].bias[1] = 2.0 * model[0].bias[0]
    x = torch.randn(64, 3, dtype=torch.float64)
    spec = symmetry_spec(model, x[:4])
    g = random_symmetry(spec, torch.Generator().manual_seed(0), monomial=True)
    r = it.align(model, apply_symmetry(model, g, spec), x, method="activations")
    assert set(r.found_by.values()) == {"activations on 4 of 6 coordinates, weights on the rest (dead or twin units)"}
    assert relerr(model, r.model) <= 1e-6


def test_assignment_with_pinned_pairs_is_the_best_permutation_that_keeps_them():
    """weight_matching.assign with pins against every permutation of 6 that keeps the pinned pairs."""
    import itertools

    from intertwiners.alignment.weight_matching import assign

    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        score = torch.randn(6, 6, generator=gen, dtype=torch.float64)
        k = trial % 4
        rows = torch.randperm(6, generator=gen)[:k]
        cols = torch.randperm(6, generator=gen)[:k]
        perm = assign(score, (rows, cols))
        assert torch.equal(perm[rows], cols) and sorted(perm.tolist()) == list(range(6))
        best = max(sum(float(score[j, p[j]]) for j in range(6)) for p in itertools.permutations(range(6))
                   if all(p[int(r)] == int(c) for r, c in zip(rows, cols)))
        assert sum(float(score[j, perm[j]]) for j in range(6)) == pytest.approx(best, rel=1e-12)
