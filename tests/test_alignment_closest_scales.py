"""The scales of full-group weight matching: the element that puts B's weights closest to A's, once the
permutations are chosen (intertwiners.alignment.closest_scales)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from test_alignment import ResidualMLP  # h = relu(a(x)); h + relu(b(h)): a self-coupled space
from torch import nn

import intertwiners as it
from intertwiners import models
from intertwiners.alignment.closest_scales import best_factors, coordinate_cost, fit_closest_scales, scalable
from intertwiners.alignment.spaces import space_slots


def reference_factor(terms: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(d, cost) minimising sum_e bb d^(2e) - 2 ab d^e over d > 0 for terms (e, bb, ab): a dense grid of log d,
    then a bounded scalar minimisation (scipy) around its best point -- the slow, independent way."""
    def cost(t):
        return sum(bb * np.exp(2 * e * t) - 2 * ab * np.exp(e * t) for e, bb, ab in terms)

    grid = np.linspace(-12, 12, 24001)
    values = cost(grid)
    k = int(values.argmin())
    res = minimize_scalar(cost, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]), method="bounded",
                          options={"xatol": 1e-12})
    best = min((res.fun, res.x), (cost(0.0), 0.0))
    return float(np.exp(best[1])), float(best[0])


positive = st.floats(1e-3, 1e3)
inner = st.floats(-1e2, 1e2)


@given(st.lists(st.tuples(st.sampled_from([1.0, -1.0, 2.0, -0.5]), positive, inner), min_size=1, max_size=4))
def test_best_factor_matches_a_slow_scalar_minimiser(terms):
    """Each coordinate's factor reaches the cost of a dense grid + scipy's bounded minimiser (to rounding)."""
    sums: dict = {}
    for e, bb, ab in terms:
        old = sums.get(e, (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)))
        sums[e] = (old[0] + bb, old[1] + ab)
    d = best_factors(sums)
    ours = float(coordinate_cost(torch.log(d), sums)[0])
    _, ref = reference_factor([(e, float(b[0]), float(a[0])) for e, (b, a) in sums.items()])
    size = sum(bb + abs(ab) for _, bb, ab in terms)
    assert ours <= ref + 1e-9 * size, (ours, ref, d)
    assert ours <= float(coordinate_cost(torch.zeros(1, dtype=torch.float64), sums)[0]) + 1e-12 * size


def test_factors_stay_exactly_one_where_b_already_equals_a():
    """bb == ab for every power (B's slices equal A's): the identity is the minimum and is kept bit for bit."""
    g = torch.Generator().manual_seed(0)
    bb1, bb2 = torch.rand(50, generator=g, dtype=torch.float64) + 0.1, torch.rand(50, generator=g, dtype=torch.float64)
    assert torch.equal(best_factors({1.0: (bb1, bb1.clone()), -1.0: (bb2, bb2.clone())}),
                       torch.ones(50, dtype=torch.float64))


def test_factors_are_one_where_a_coordinate_reaches_nothing():
    """A dead coordinate (all of B's slices zero) has a constant cost: its factor stays 1, never NaN."""
    z = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(best_factors({1.0: (z, z), -1.0: (z, z)}), torch.ones(3, dtype=torch.float64))


def mlp_params(model: nn.Module) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def test_one_hidden_layer_each_unit_gets_its_own_minimiser():
    """MLP 6-5-3: the units' scales are independent; each one's factor minimises
    ||W1a[j] - d W1b[j]||² + (b1a[j] - d b1b[j])² + ||W2a[:, j] - W2b[:, j] / d||², computed by scipy unit by
    unit; the weight distance goes down."""
    torch.manual_seed(1)
    a, b = models.mlp(6, hidden=(5,), num_classes=3).double(), models.mlp(6, hidden=(5,), num_classes=3).double()
    spec = it.symmetry_spec(b, torch.randn(2, 6, dtype=torch.float64))
    (name,) = spec.spaces
    actions = {name: space_slots(spec, name)}
    pa, pb = mlp_params(a), mlp_params(b)
    before = sum(float((pa[k] - pb[k]).pow(2).sum()) for k in pa)
    c = fit_closest_scales(pa, pb, actions)[name]
    after = sum(float((pa[k] - pb[k]).pow(2).sum()) for k in pa)
    assert after < before
    la, lb = [m for m in a.modules() if isinstance(m, nn.Linear)], [m for m in b.modules() if isinstance(m, nn.Linear)]
    for j in range(5):
        w1a = torch.cat([la[0].weight[j], la[0].bias[j:j + 1]]).detach().numpy()
        w1b = torch.cat([lb[0].weight[j], lb[0].bias[j:j + 1]]).detach().numpy()
        w2a, w2b = la[1].weight[:, j].detach().numpy(), lb[1].weight[:, j].detach().numpy()
        d, _ = reference_factor([(1.0, float(w1b @ w1b), float(w1a @ w1b)), (-1.0, float(w2b @ w2b), float(w2a @ w2b))])
        assert float(c[j]) == pytest.approx(d, rel=1e-6)


@pytest.mark.parametrize("build, shape", [
    (lambda: models.myrtle_cnn(width=4, in_channels=1, input_size=8, batch_norm=False), (1, 8, 8)),
    (ResidualMLP, (3,)),
], ids=["myrtle-no-norm", "residual-self-map"])
def test_descent_never_raises_the_distance(build, shape):
    """Spaces that share tensors (a convolution's rows and the next one's columns) and a residual self-map
    (W -> D W D^-1, coupling a space's own coordinates): the distance goes down, and the result is a fixed
    point (a second fit changes nothing)."""
    torch.manual_seed(2)
    a, b = build().double(), build().double()
    spec = it.symmetry_spec(b, torch.randn(2, *shape, dtype=torch.float64))
    actions = {n: space_slots(spec, n) for n in spec.spaces}
    assert all(scalable(act) for act in actions.values())
    pa, pb = mlp_params(a), mlp_params(b)
    keys = {s.tensor for act in actions.values() for s in act.slots}
    before = sum(float((pa[k] - pb[k]).pow(2).sum()) for k in keys)
    fit_closest_scales(pa, pb, actions)
    after = sum(float((pa[k] - pb[k]).pow(2).sum()) for k in keys)
    assert after < before
    again = fit_closest_scales(pa, pb, actions, max_sweeps=1)
    assert all(float((c - 1).abs().max()) < 1e-6 for c in again.values())


def test_spaces_whose_scale_a_norm_carries_keep_the_canonical_scales():
    """Batch norm after a convolution carries the unit's scale in its gain: those spaces are not fitted (they
    keep the canonical scales), their batch-norm-free twins are."""
    x = torch.randn(2, 1, 8, 8)
    for bn in (True, False):
        m = models.myrtle_cnn(width=4, in_channels=1, input_size=8, batch_norm=bn)
        spec = it.symmetry_spec(m, x)
        assert all(scalable(space_slots(spec, n)) is not bn for n in spec.spaces), bn


def test_full_group_weight_matching_does_not_push_a_unit_with_tiny_weights_away():
    """A has a unit whose incoming weights are tiny (as trained networks have): the full group's weight
    matching keeps B's function and puts B's weights no farther from A's than they were, nor than permutations
    alone put them (giving B's partner unit A's tiny incoming norm, with outgoing weights blown up to match,
    did: 52 times farther on a trained digits MLP)."""
    torch.manual_seed(3)
    a, b = models.mlp(8, hidden=(6, 6)).double(), models.mlp(8, hidden=(6, 6)).double()
    with torch.no_grad():
        a.fc1.weight[2].mul_(1e-3)
        a.fc1.bias[2].mul_(1e-3)
    x = torch.randn(64, 8, dtype=torch.float64)
    r = it.align(a, b, x, method="weights", group="full")
    torch.testing.assert_close(r.model(x), b(x), rtol=1e-9, atol=1e-9)
    dist = {k: float((p - q).detach().pow(2).sum()) for (k, p), q in zip(a.named_parameters(), r.model.parameters())}
    plain = sum(float((p - q).detach().pow(2).sum()) for p, q in zip(a.parameters(), b.parameters()))
    perm = it.align(a, b, x, method="weights", group="permutation").model
    perm_dist = sum(float((p - q).detach().pow(2).sum()) for p, q in zip(a.parameters(), perm.parameters()))
    assert sum(dist.values()) <= min(plain, perm_dist), (dist, plain, perm_dist)


def test_a_scale_without_a_minimiser_moves_at_most_max_change():
    """A unit whose outgoing slices are zero and whose incoming ones point away from A's: its distance keeps
    falling as the scale goes to 0, so no scale is best; the factor stops at 1/MAX_CHANGE, positive and finite
    (an element of the group that float arithmetic holds), and the descent keeps it there."""
    from intertwiners.alignment.closest_scales import MAX_CHANGE

    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    sums = {1.0: (one, -one), -1.0: (zero, zero)}
    room = torch.full((1,), float(np.log(MAX_CHANGE)), dtype=torch.float64)
    d = best_factors(sums, -room, room)
    assert float(d[0]) == pytest.approx(1 / MAX_CHANGE, rel=1e-6)
    a, b = models.mlp(3, hidden=(2,), num_classes=2).double(), models.mlp(3, hidden=(2,), num_classes=2).double()
    with torch.no_grad():
        b.head.weight[:, 0] = 0.0
        b.fc1.weight[0], b.fc1.bias[0] = -a.fc1.weight[0], -a.fc1.bias[0]
    spec = it.symmetry_spec(b, torch.randn(2, 3, dtype=torch.float64))
    (name,) = spec.spaces
    c = fit_closest_scales(mlp_params(a), mlp_params(b), {name: space_slots(spec, name)})[name]
    assert float(c[0]) == pytest.approx(1 / MAX_CHANGE, rel=1e-6) and bool(torch.isfinite(c).all())
