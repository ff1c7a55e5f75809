"""GL spaces (two linear maps with nothing between) in alignment: planted recovery by both methods, the
products that hide a GL element, its closed-form least-squares solve against a slow Kronecker solve, and
wrong elements that the residual reports (src/intertwiners/alignment/linear_spaces.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import intertwiners as it
from intertwiners.alignment.linear_spaces import (
    _sides,
    collapse_linear_spaces,
    fit_residual,
    least_squares_element,
    solve_linear_space,
)
from intertwiners.alignment.spaces import space_slots
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec

L = nn.Linear


def _conv():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(3, 5, 1),
                         nn.ReLU(), nn.Flatten(), L(5 * 4 * 4, 2))


class TwoConsumers(nn.Module):
    """One GL space read by two linear maps: relu(W_b h) + relu(W_c h), h = W_a x + b_a."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.o = L(5, 4), L(4, 6), L(4, 6), L(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.o(torch.relu(self.b(h)) + torch.relu(self.c(h)))


FAMILIES = {  # name: (model, input shape)
    "bottleneck": (lambda: nn.Sequential(L(5, 4), L(4, 6), nn.ReLU(), L(6, 3)), (5,)),
    "no-biases": (lambda: nn.Sequential(L(5, 4, bias=False), L(4, 6, bias=False), nn.ReLU(), L(6, 3)), (5,)),
    "inside-a-deeper-mlp": (lambda: nn.Sequential(L(5, 8), nn.ReLU(), L(8, 3), L(3, 7), nn.ReLU(), L(7, 6), nn.ReLU(),
                                                  L(6, 2)), (5,)),
    "wider-than-its-neighbours": (lambda: nn.Sequential(L(3, 5), nn.ReLU(), L(5, 9), L(9, 4), nn.ReLU(), L(4, 2)),
                                  (3,)),
    "narrower-than-its-neighbours": (lambda: nn.Sequential(L(6, 8), nn.ReLU(), L(8, 2), L(2, 7), nn.ReLU(), L(7, 3)),
                                     (6,)),
    "two-gl-spaces-in-a-row": (lambda: nn.Sequential(L(5, 6), nn.ReLU(), L(6, 4), L(4, 3), L(3, 5), nn.ReLU(), L(5, 2)),
                               (5,)),
    "convolutions": (_conv, (2, 4, 4)),
    "convolution-into-flatten-linear": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(),
                                                              L(4 * 4 * 4, 6), nn.ReLU(), L(6, 2)), (2, 4, 4)),
    "two-consumers": (TwoConsumers, (5,)),
}


def relerr(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((v - sb[k]).norm() / v.norm()) for k, v in sa.items())


def _model(family: str, seed: int):
    build, shape = FAMILIES[family]
    torch.manual_seed(seed)
    model = build().double().eval()
    x = torch.randn(48, *shape, dtype=torch.float64)
    return model, x, symmetry_spec(model, x[:4])


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_planted_recovery_on_gl_spaces_is_exact(family, method, seed):
    """g·M aligned back to M (g: random_symmetry, a dense GL element on every GL space): M's parameters to
    1e-6 relative, every GL space reported as solved by least squares with a residual at rounding."""
    model, x, spec = _model(family, seed)
    gl = [n for n, s in spec.spaces.items() if s.group.kind == "general_linear"]
    assert gl and all(not spec.spaces[n].sites for n in gl)
    g = random_symmetry(spec, torch.Generator().manual_seed(seed), monomial=True)
    assert all(g[n].count_nonzero() == spec.spaces[n].size ** 2 for n in gl)  # dense planted elements
    r = it.align(model, apply_symmetry(model, g, spec), x, method=method)
    assert relerr(model, r.model) <= 1e-6
    assert set(r.found_by) == set(spec.spaces)
    for n in gl:
        assert r.found_by[n].startswith("weights (GL: least squares"), r.found_by[n]
        assert r.residual[n] <= 1e-10


def test_the_products_that_hide_a_gl_space_do_not_move_under_it_and_move_with_its_neighbours():
    """collapse_linear_spaces: W2·W1 and W2·b1 are the same for M and for M moved by a GL element alone; moved
    by the neighbouring space's permutation and scaling, the products move as that space's slots on them say."""
    model, x, spec = _model("inside-a-deeper-mlp", 0)
    actions = {n: space_slots(spec, n) for n in spec.spaces}
    gl = next(n for n, a in actions.items() if a.group.kind == "general_linear")
    g = random_symmetry(spec, torch.Generator().manual_seed(1), monomial=True)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def moved(elements):
        return {k: p.detach() for k, p in apply_symmetry(model, elements, spec).named_parameters()}

    pa, pb, acts, done = collapse_linear_spaces(params, moved({gl: g[gl]}), actions)
    assert done == [gl] and gl not in acts
    products = [k for k in pb if " · " in k]
    assert sorted(products) == ["3.weight · 2.bias", "3.weight · 2.weight"]
    assert all(torch.allclose(pa[k], pb[k], rtol=0, atol=1e-12) for k in products)
    assert not torch.allclose(params["2.weight"], moved({gl: g[gl]})["2.weight"])  # the factors themselves move
    # every space moved: the products move by the neighbours' elements
    _, pb, acts, _ = collapse_linear_spaces(params, moved(g), actions)
    after, before = "4", "1"  # the spaces after the GL space (3 -> 7, ReLU) and before it (5 -> 8, ReLU)
    assert gl == "2" and actions[after].group.is_monomial and actions[before].group.is_monomial
    perm_a, scale_a = g[after]
    perm_b, scale_b = g[before]
    w = params["3.weight"] @ params["2.weight"]  # (7, 8): rows in space 4, columns in space 1
    expect = torch.zeros_like(w)
    expect[perm_a[:, None], perm_b[None, :]] = scale_a[:, None] * w / scale_b[None, :]
    assert pb["3.weight · 2.weight"].shape == (7, 1, 1, 8)  # (rows, repeats in W2, repeats in W1, columns)
    assert torch.allclose(pb["3.weight · 2.weight"].reshape(7, 8), expect, atol=1e-12)
    assert {s.tensor for s in acts[after].slots} >= {"3.weight · 2.weight", "3.weight · 2.bias", "3.bias"}
    assert "3.weight" not in {s.tensor for a in acts.values() for s in a.slots}


def _kronecker_solve(ra, rb, ka, kb):
    """The minimum-norm D minimising ||D R_B - (R_A - R_B)||² + ||C_A D - (C_B - C_A)||² (C = Kᵀ) by least
    squares on vec(D) (n² unknowns): the slow, independent formula."""
    n = ra.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    ca, cb = ka.T.contiguous(), kb.T.contiguous()
    # column-major vec: vec(D R) = (Rᵀ ⊗ I) vec(D), vec(C D) = (I ⊗ C) vec(D)
    big = torch.cat([torch.kron(rb.T.contiguous(), eye), torch.kron(eye, ca)])
    rhs = torch.cat([(ra - rb).T.reshape(-1), (cb - ca).T.reshape(-1)])
    d = torch.linalg.pinv(big, rtol=1e-10) @ rhs
    return eye + d.reshape(n, n).T.contiguous()


@pytest.mark.parametrize("family", ["bottleneck", "wider-than-its-neighbours"])
def test_the_closed_form_gl_solve_equals_the_kronecker_least_squares(family):
    """least_squares_element on two unrelated models (no exact solution; the wide space leaves directions
    that neither side determines) equals the minimum-norm least-squares solution on vec(T - I), and counts
    the directions left; solve_linear_space takes it unless the identity fits better, and says which."""
    model_a, _, spec = _model(family, 0)
    model_b, _, _ = _model(family, 1)
    gl = next(n for n, s in spec.spaces.items() if s.group.kind == "general_linear")
    act = space_slots(spec, gl)
    pa = {k: p.detach() for k, p in model_a.named_parameters()}
    pb = {k: p.detach() for k, p in model_b.named_parameters()}
    (ra, ka), (rb, kb) = _sides(pa, act), _sides(pb, act)
    n = act.size
    element, free = least_squares_element(ra, rb, ka, kb, torch.finfo(torch.float64).eps)
    assert torch.allclose(element, _kronecker_solve(ra, rb, ka, kb), atol=1e-9)
    rank_r, rank_c = int(torch.linalg.matrix_rank(rb)), int(torch.linalg.matrix_rank(ka))
    assert free == (n - rank_r) * (n - rank_c)
    assert (free > 0) == (family == "wider-than-its-neighbours")
    fit = solve_linear_space(pa, pb, act)
    if fit.element.equal(torch.eye(n, dtype=torch.float64)):
        assert "identity kept" in fit.how and fit_residual(pa, pb, act, element) > fit.residual
    else:
        assert fit.element.equal(element)
        assert (f"{free} of {n * n} directions not determined" if free else "determined by the weights") in fit.how


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_a_wrong_gl_element_is_reported_by_the_residual(method):
    """Non-invariance: the planted GL element with a small perturbation (or the identity) leaves a residual far
    above rounding, where the solved one leaves rounding; two unrelated models get a residual that is not
    small (the report can fail)."""
    model, x, spec = _model("bottleneck", 3)
    gl = next(n for n, s in spec.spaces.items() if s.group.kind == "general_linear")
    act = space_slots(spec, gl)
    g = random_symmetry(spec, torch.Generator().manual_seed(4), monomial=True)
    moved = apply_symmetry(model, {gl: g[gl]}, spec)
    pa = {k: p.detach() for k, p in model.named_parameters()}
    pb = {k: p.detach() for k, p in moved.named_parameters()}
    right = torch.linalg.inv(g[gl])
    assert fit_residual(pa, pb, act, right) <= 1e-12
    wrong = right + 1e-3 * torch.randn(right.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert fit_residual(pa, pb, act, wrong) > 1e-5
    assert fit_residual(pa, pb, act, torch.eye(act.size, dtype=torch.float64)) > 1e-2
    assert solve_linear_space(pa, pb, act).residual <= 1e-12
    other, _, _ = _model("bottleneck", 7)
    r = it.align(model, other, x, method=method)
    assert r.residual[gl] > 1e-2
    assert "residual" in r.found_by[gl]
