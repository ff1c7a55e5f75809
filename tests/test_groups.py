"""Intertwiner groups (paper §3.1): group axioms, sigma(Ax) = phi(A) sigma(x), Lemma 3.1, Table 1."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from intertwiners.activations import make_activation
from intertwiners.groups import (
    KINDS,
    as_monomial,
    derive_group,
    intersection,
    intertwiner_group,
    kind_group,
    kind_leq,
    meet_kind,
    monomial_compose,
    monomial_inverse,
    monomial_matrix,
)

NAMES = ["identity", "relu", "leaky_relu", "leaky_relu:0.2", "leaky_relu:-1", "leaky_relu:1", "leaky_relu:-0.5",
         "sigmoid", "tanh", "gelu", "silu", "elu", "softplus", "gaussian", "power:2", "power:3", "power:4",
         "power:1", "abs"]

# User callables and what the derivation must find: (callable, kind, phi of a test matrix as a function)
CALLABLES = {
    "cube": (lambda x: x**3, "scaled_permutation"),
    "scaled_relu": (lambda x: 2.5 * torch.relu(x), "positive_scaled_permutation"),
    "shifted_affine": (lambda x: 3.0 * x + 1.0, "unit_row_sum"),
    "linear": (lambda x: -2.0 * x, "general_linear"),
    "square_plus_one": (lambda x: x**2 + 1.0, "signed_permutation"),
    "sin": (torch.sin, "signed_permutation"),
    "step": (lambda x: (x > 0).to(x.dtype), "positive_scaled_permutation"),
    "relu_pow_1.5": (lambda x: torch.relu(x) ** 1.5, "positive_scaled_permutation"),
    "odd_square": (lambda x: x * x.abs(), "scaled_permutation"),
    "shifted_sigmoid": (lambda x: torch.sigmoid(x) + 0.25, "permutation"),
    "hardtanh": (nn.Hardtanh(), "signed_permutation"),
    "relu6": (nn.ReLU6(), "permutation"),
    "prelu": (nn.PReLU(init=0.3).double(), "positive_scaled_permutation"),
    "elu_alpha2": (nn.ELU(alpha=2.0), "permutation"),
    "leaky_module": (nn.LeakyReLU(0.3), "positive_scaled_permutation"),
    "leaky_module_1": (nn.LeakyReLU(1.0), "general_linear"),
}


def group_of(key):
    if key in CALLABLES:
        return intertwiner_group(CALLABLES[key][0])
    return intertwiner_group(key)


def sigma_of(key):
    if key in CALLABLES:
        return CALLABLES[key][0]
    return make_activation(key)


def lemma_phi(sigma, A):
    """Lemma 3.1, computed independently: phi(A) = sigma(A) sigma(I)^-1 (entrywise sigma)."""
    with torch.no_grad():
        S_A = sigma(A)
        S_I = sigma(torch.eye(A.shape[0], dtype=A.dtype))
    return torch.linalg.solve(S_I.T, S_A.T).T


# --------------------------------------------------------------------------------------------------
# Table 1 and the derivation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind,rule", [
    ("identity", "general_linear", "A"),
    ("sigmoid", "permutation", "A"),
    ("relu", "positive_scaled_permutation", "A"),
    ("leaky_relu:0.3", "positive_scaled_permutation", "A"),
    ("gaussian", "signed_permutation", "abs(A)"),
    ("power:2", "scaled_permutation", "A⊙A"),
    ("power:3", "scaled_permutation", "A⊙A⊙A"),
    ("power:5", "scaled_permutation", "A^⊙5"),
    ("tanh", "signed_permutation", "A"),
    ("abs", "scaled_permutation", "abs(A)"),
    ("leaky_relu:1", "general_linear", "A"),
])
def test_table1_rows(name, kind, rule):
    G = intertwiner_group(name)
    assert G.kind == kind
    assert G.phi_rule == rule
    assert G.description and isinstance(G.description, str)


def test_table1_phi_values():
    A = torch.tensor([[0.0, -2.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(intertwiner_group("power:3").phi(A), A**3)
    assert torch.allclose(intertwiner_group("power:2").phi(A), A * A)
    assert torch.allclose(intertwiner_group("abs").phi(A), A.abs())
    S = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(intertwiner_group("gaussian").phi(S), S.abs())
    assert torch.equal(intertwiner_group("tanh").phi(S), S)


@pytest.mark.parametrize("name", NAMES)
def test_named_fast_path_agrees_with_derivation(name):
    fast = intertwiner_group(name)
    derived = derive_group(make_activation(name), name)
    assert (fast.kind, fast.degree, fast.odd) == (derived.kind, derived.degree, derived.odd)
    assert fast.phi_rule == derived.phi_rule


@pytest.mark.parametrize("key", list(CALLABLES))
def test_user_callables_classified(key):
    sigma, kind = CALLABLES[key]
    assert intertwiner_group(sigma).kind == kind


def test_modules_and_names_agree():
    assert intertwiner_group(nn.LeakyReLU(0.2)).kind == "positive_scaled_permutation"
    assert intertwiner_group(nn.LeakyReLU(1.0)).kind == "general_linear"
    assert intertwiner_group(nn.ReLU()).kind == intertwiner_group("relu").kind
    assert intertwiner_group(nn.Tanh()).kind == "signed_permutation"
    assert intertwiner_group(nn.GELU()).kind == "permutation"
    assert intertwiner_group(nn.Softplus(beta=2.0)).kind == "permutation"


def test_float32_module_is_evaluated_in_float64():
    prelu = nn.PReLU(init=0.3)
    assert intertwiner_group(prelu).kind == "positive_scaled_permutation"
    assert prelu.weight.dtype == torch.float32  # the user's module is untouched
    assert intertwiner_group(nn.PReLU(init=-1.0)).kind == "scaled_permutation"


def test_derived_degrees():
    assert intertwiner_group(lambda x: torch.relu(x) ** 1.5).degree == 1.5
    assert intertwiner_group(lambda x: (x > 0).double()).degree == 0.0
    G = intertwiner_group(lambda x: x * x.abs())
    assert (G.degree, G.odd, G.phi_rule) == (2.0, True, "sign(A)⊙abs(A)⊙abs(A)")


# --------------------------------------------------------------------------------------------------
# sigma(A x) = phi(A) sigma(x), and Lemma 3.1
# --------------------------------------------------------------------------------------------------

ALL_KEYS = NAMES + list(CALLABLES)


@pytest.mark.parametrize("key", ALL_KEYS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_intertwining(key, seed, n):
    G, sigma = group_of(key), sigma_of(key)
    g = torch.Generator().manual_seed(seed)
    try:
        G.check_size(n)
    except ValueError:
        return  # sigma(I_n) singular for this n (checked separately)
    A = G.sample(n, generator=g)
    assert G.contains(A)
    x = torch.randn(n, 7, generator=g, dtype=torch.float64) * 2
    with torch.no_grad():
        lhs = sigma(A @ x)
        rhs = G.phi(A) @ sigma(x)
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("key", ALL_KEYS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_phi_equals_lemma_3_1(key, seed, n):
    G, sigma = group_of(key), sigma_of(key)
    try:
        G.check_size(n)
    except ValueError:
        return
    A = G.sample(n, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(G.phi(A), lemma_phi(sigma, A), rtol=1e-8, atol=1e-8)


def test_lemma_matters_when_sigma0_nonzero():
    # sigmoid: sigma(0) = 1/2, so sigma(P) itself is not P, but sigma(P) sigma(I)^-1 is.
    G = intertwiner_group("sigmoid")
    P = G.sample(4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(torch.sigmoid(P), P)
    assert torch.allclose(lemma_phi(torch.sigmoid, P), P, atol=1e-12)
    # Gaussian: phi = abs(A), which is neither sigma(A) nor A
    G = intertwiner_group("gaussian")
    A = monomial_matrix(torch.tensor([2, 0, 1]), torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))
    gauss = make_activation("gaussian")
    assert torch.allclose(lemma_phi(gauss, A), A.abs(), atol=1e-12)
    assert torch.allclose(G.phi(A), A.abs())


# --------------------------------------------------------------------------------------------------
# Group axioms and phi a homomorphism, for every kind
# --------------------------------------------------------------------------------------------------

AXIOM_GROUPS = ["identity", "relu", "tanh", "gaussian", "power:3", "power:2", "abs", "sigmoid",
                "shifted_affine", "step", "relu_pow_1.5", "odd_square"]


def test_every_kind_covered():
    assert {group_of(k).kind for k in AXIOM_GROUPS} == set(KINDS)


@pytest.mark.parametrize("key", AXIOM_GROUPS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_group_axioms_and_homomorphism(key, seed, n):
    G = group_of(key)
    g = torch.Generator().manual_seed(seed)
    A, B = G.sample(n, generator=g), G.sample(n, generator=g)
    eye = torch.eye(n, dtype=torch.float64)
    assert G.contains(eye) and torch.allclose(G.phi(eye), eye)
    assert G.contains(A @ B, atol=1e-8)
    A_inv = torch.linalg.inv(A)
    assert G.contains(A_inv, atol=1e-8)
    assert torch.allclose(G.phi(A @ B, atol=1e-8), G.phi(A) @ G.phi(B), rtol=1e-8, atol=1e-8)
    assert torch.allclose(G.phi(A_inv, atol=1e-8), torch.linalg.inv(G.phi(A)), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6))
def test_kind_groups_axioms(kind, seed, n):
    G = kind_group(kind)
    g = torch.Generator().manual_seed(seed)
    A, B = G.sample(n, generator=g), G.sample(n, generator=g)
    assert G.contains(A) and G.contains(A @ B, atol=1e-8) and G.contains(torch.linalg.inv(A), atol=1e-8)
    assert torch.allclose(G.phi(A), A)
    # inclusions: an element of a kind is an element of every larger kind
    for other in KINDS:
        if kind_leq(kind, other):
            assert kind_group(other).contains(A, atol=1e-8)


def test_samples_are_well_conditioned_and_seeded():
    G = intertwiner_group("identity")
    A = G.sample(20, generator=torch.Generator().manual_seed(0))
    assert torch.linalg.cond(A) < math.e + 1e-9
    assert torch.equal(A, G.sample(20, generator=torch.Generator().manual_seed(0)))
    U = intertwiner_group(lambda x: x + 1.0).sample(8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(U.sum(1), torch.ones(8, dtype=torch.float64))
    assert intertwiner_group("relu").sample(5, dtype=torch.float32).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Non-members rejected
# --------------------------------------------------------------------------------------------------

def test_non_members_rejected():
    relu, tanh = intertwiner_group("relu"), intertwiner_group("tanh")
    theta = 0.3
    R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]],
                     dtype=torch.float64)
    assert not relu.contains(R)
    with pytest.raises(ValueError, match="not in G"):
        relu.phi(R)
    neg = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert not relu.contains(neg) and tanh.contains(neg)
    with pytest.raises(ValueError):
        relu.phi(neg)
    assert torch.equal(tanh.phi(neg), neg)
    scaled = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert relu.contains(scaled) and not tanh.contains(scaled) and not intertwiner_group("sigmoid").contains(scaled)
    # no B at all intertwines the rotation: relu(x) = 0 but relu(R x) != 0, so B relu(x) = 0 != relu(R x)
    x = torch.tensor([0.0, -1.0], dtype=torch.float64)
    assert torch.all(torch.relu(x) == 0) and torch.relu(R @ x).abs().sum() > 0.1
    # GL and unit row sums
    assert not intertwiner_group("identity").contains(torch.ones(3, 3, dtype=torch.float64))
    affine = intertwiner_group(lambda x: 2 * x + 1)
    assert not affine.contains(2 * torch.eye(3, dtype=torch.float64))
    assert affine.contains(torch.eye(3, dtype=torch.float64)[[2, 0, 1]])
    # shapes and values
    assert not relu.contains(torch.ones(2, 3))
    assert not relu.contains(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        relu.phi(torch.ones(2, 3))


@pytest.mark.parametrize("sigma", [lambda x: torch.zeros_like(x) + 3.0, lambda x: x**2 - x,
                                   lambda x: (x != 0).double() * 0 + torch.sigmoid(x * 0)])
def test_singular_sigma_of_identity_raises(sigma):
    with pytest.raises(ValueError, match="singular"):
        intertwiner_group(sigma)


def test_singular_for_one_size_only():
    # sigma(x) = x - 1/2: sigma(I_n) = I - J/2 has eigenvalue 1 - n/2, singular exactly for n = 2
    G = intertwiner_group(lambda x: x - 0.5)
    assert G.kind == "unit_row_sum"
    with pytest.raises(ValueError, match="singular"):
        G.check_size(2)
    with pytest.raises(ValueError, match="singular"):
        G.sample(2)
    with pytest.raises(ValueError, match="singular"):
        intertwiner_group(lambda x: x - 0.5, n=2)
    assert torch.linalg.matrix_rank(torch.eye(2) - 0.5) == 1
    assert G.dimension(3) == 6
    # sigma(1) = 0 with sigma(0) != 0 is singular only for n = 1
    G1 = intertwiner_group(lambda x: torch.cos(math.pi / 2 * x) + 0.0 * x)
    with pytest.raises(ValueError):
        G1.check_size(1)
    G1.check_size(3)


def test_non_elementwise_rejected():
    with pytest.raises(ValueError, match="elementwise"):
        intertwiner_group(lambda x: torch.softmax(x, dim=0))
    with pytest.raises(ValueError, match="elementwise"):
        intertwiner_group(lambda x: x.sum() * torch.ones_like(x))
    with pytest.raises(ValueError):
        intertwiner_group(42)
    with pytest.raises(ValueError):
        intertwiner_group("not_an_activation")


# --------------------------------------------------------------------------------------------------
# Dimensions, monomial convention, restrictions and intersections
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dims", [("identity", [1, 4, 9]), ("relu", [1, 2, 3]), ("abs", [1, 2, 3]),
                                       ("tanh", [0, 0, 0]), ("sigmoid", [0, 0, 0]), ("gaussian", [0, 0, 0])])
def test_dimension(name, dims):
    assert [intertwiner_group(name).dimension(n) for n in (1, 2, 3)] == dims


def test_dimension_unit_row_sum():
    assert [intertwiner_group(lambda x: x + 1).dimension(n) for n in (1, 2, 5)] == [0, 2, 20]


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8))
def test_monomial_convention(seed, n):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    scale = torch.randn(n, generator=g, dtype=torch.float64) + 3.0
    A = monomial_matrix(perm, scale)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    # slow reference: (A x)[perm[j]] = scale[j] x[j]
    expected = torch.zeros(n, dtype=torch.float64)
    for j in range(n):
        assert A[perm[j], j] == scale[j]
        expected[perm[j]] = scale[j] * x[j]
    assert torch.allclose(A @ x, expected)
    p2, s2 = as_monomial(A)
    assert torch.equal(p2, perm) and torch.equal(s2, scale)
    perm_b = torch.randperm(n, generator=g)
    scale_b = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    B = monomial_matrix(perm_b, scale_b)
    assert torch.allclose(monomial_matrix(*monomial_compose((perm, scale), (perm_b, scale_b))), A @ B)
    assert torch.allclose(monomial_matrix(*monomial_inverse(perm, scale)), torch.linalg.inv(A))
    G = intertwiner_group("power:3")
    assert torch.allclose(monomial_matrix(perm, G.scale_map(scale)), G.phi(A))
    pm, sm = G.sample_monomial(n, generator=g)
    assert G.allows_scale(sm) and G.contains(monomial_matrix(pm, sm))


def test_as_monomial_rejects():
    with pytest.raises(ValueError, match="monomial"):
        as_monomial(torch.ones(2, 2))
    with pytest.raises(ValueError, match="monomial"):
        as_monomial(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError):
        monomial_matrix(torch.tensor([0, 0]), torch.ones(2))


def test_as_monomial_exact_and_tolerant_paths_agree():
    """A sampled element (exactly n non-zeros) and the same element with noise below atol read alike;
    NaN/inf entries and scales at or below atol are rejected on either path."""
    g = torch.Generator().manual_seed(3)
    perm, scale = torch.randperm(7, generator=g), torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    A = monomial_matrix(perm, scale)
    noisy = A + 1e-9 * (A == 0)
    for M in (A, noisy):
        p2, s2 = as_monomial(M)
        assert torch.equal(p2, perm) and torch.allclose(s2, scale, atol=1e-8)
    for bad in (float("nan"), float("inf"), 1e-8):
        B = A.clone()
        B[perm[2], 2] = bad
        with pytest.raises(ValueError):
            as_monomial(B)


def test_scale_maps():
    s = torch.tensor([2.0, -0.5], dtype=torch.float64)
    assert torch.allclose(intertwiner_group("power:3").scale_map(s), s**3)
    assert torch.allclose(intertwiner_group("abs").scale_map(s), s.abs())
    assert torch.equal(intertwiner_group("gaussian").scale_map(torch.tensor([1.0, -1.0])), torch.ones(2))
    assert not intertwiner_group("relu").allows_scale(s)
    with pytest.raises(ValueError):
        intertwiner_group("relu").scale_map(s)
    assert intertwiner_group("relu").is_monomial and not intertwiner_group("identity").is_monomial


def test_meet_and_restrict():
    assert meet_kind("signed_permutation", "positive_scaled_permutation") == "permutation"
    assert meet_kind("unit_row_sum", "scaled_permutation") == "permutation"
    assert meet_kind("general_linear", "positive_scaled_permutation") == "positive_scaled_permutation"
    assert meet_kind("scaled_permutation", "signed_permutation") == "signed_permutation"
    for a in KINDS:
        for b in KINDS:
            m = meet_kind(a, b)
            assert kind_leq(m, a) and kind_leq(m, b)
            assert all(not (kind_leq(k, a) and kind_leq(k, b)) or kind_leq(k, m) for k in KINDS)
    relu_perm = intertwiner_group("relu").restrict("permutation")
    assert relu_perm.kind == "permutation"
    assert not relu_perm.contains(torch.diag(torch.tensor([2.0, 1.0])))
    gl_pos = intertwiner_group("identity").restrict("positive_scaled_permutation")
    A = torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert gl_pos.kind == "positive_scaled_permutation" and torch.equal(gl_pos.phi(A), A)
    cube_signed = intertwiner_group("power:3").restrict("signed_permutation")
    S = torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.equal(cube_signed.phi(S), S)
    gauss_pos = intertwiner_group("gaussian").restrict("positive_scaled_permutation")
    assert gauss_pos.kind == "permutation"
    with pytest.raises(ValueError):
        meet_kind("bogus")


def test_intersection_keeps_first_phi():
    cube, pool, ln = intertwiner_group("power:3"), kind_group("positive_scaled_permutation", "max_pool"), \
        kind_group("permutation", "layer_norm")
    G = intersection(cube, pool)
    A = torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert G.kind == "positive_scaled_permutation" and torch.allclose(G.phi(A), A**3)
    assert not G.contains(-A)
    assert intersection(cube, pool, ln).kind == "permutation"
    assert intersection(intertwiner_group("tanh"), pool).kind == "permutation"
    shifted = intertwiner_group(lambda x: x - 0.5)
    with pytest.raises(ValueError, match="singular"):
        intersection(kind_group("general_linear"), shifted).check_size(2)


def test_str_mentions_kind_and_phi():
    text = str(intertwiner_group("gaussian"))
    assert "signed_permutation" in text and "abs(A)" in text


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def test_cli_group(capsys):
    from intertwiners.cli import main

    assert main(["group", "gaussian", "--n", "3", "--samples", "5"]) == 0
    out = capsys.readouterr().out
    assert "signed_permutation" in out and "abs(A)" in out and "PASS" in out and "dimension    0" in out
    assert main(["group", "relu", "--n", "3", "--samples", "5", "--json", "--derive"]) == 0
    import json
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "positive_scaled_permutation" and info["dimension"] == 3 and info["passed"]
    assert main(["group", "no_such_activation"]) == 2
