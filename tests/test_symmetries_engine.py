"""The engine's structure and its one description of a model: an acyclic package, chains as powers, typed
constraints that can test an element, and slots that agree with an independent reading (alignment's probe,
which finds where a space acts by applying elements and comparing tensors)."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from probe_reference import probe_parameters, probe_sites
from torch import nn

import intertwiners as it
from intertwiners import groups as G
from intertwiners import models
from intertwiners.symmetries import Columns, Features, Gain, HeadBlocks, Permuted, Rows, symmetry_spec
from intertwiners.symmetries.chains import DUAL, ONE, carried_scale, linear_power, power_of
from intertwiners.symmetries.constraints import Activation, Equal, PositiveScales, Signed, Unit
from intertwiners.symmetries.registry import register_rule, unregister_rule

PACKAGE = Path(it.__file__).parent / "symmetries"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules of the package that ``path`` imports at module level, relative imports inside functions)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top, nested = set(), []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            targets = [".".join(base)] if node.module else [".".join(base + [a.name]) for a in node.names]
            top.update(t for t in targets if t.split(".")[0] == PACKAGE.name)
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            nested += [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.level]
    return top, nested


def test_the_package_import_graph_is_acyclic_without_local_imports():
    graph, nested = {}, {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name], local = _imports(path)
        if local:
            nested[name] = local
    assert not nested, f"function-local imports inside the package: {nested}"
    if PACKAGE.name == "symmetries" and (PACKAGE / "ops").is_dir():   # the graph was read (not empty)
        assert "symmetries.ops.linear" in graph["symmetries.ops"]
        assert "symmetries.context" in graph["symmetries.ops.norm"]
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if dep == node or dep not in graph:
                continue
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_a_cycle_is_detected_by_the_import_check(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other are reported."""
    (tmp_path / "symmetries").mkdir()
    (tmp_path / "symmetries" / "a.py").write_text("from .b import x\n")
    (tmp_path / "symmetries" / "b.py").write_text("from .a import y\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "symmetries")
    with pytest.raises(AssertionError, match="import cycle"):
        test_the_package_import_graph_is_acyclic_without_local_imports()


# --------------------------------------------------------------------------------------------------
# Chains are powers; constraints test elements
# --------------------------------------------------------------------------------------------------

_GROUPS = {"relu": G.intertwiner_group("relu"), "cube": G.intertwiner_group("power:3"),
           "abs": G.intertwiner_group("abs"), "tanh": G.intertwiner_group("tanh"),
           "gaussian": G.intertwiner_group("gaussian"), "sigmoid": G.intertwiner_group("sigmoid")}


@given(st.lists(st.sampled_from([ONE, DUAL, "relu", "cube", "abs", "tanh", "gaussian"]), max_size=4),
       st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3), st.lists(st.booleans(), min_size=3, max_size=3))
def test_a_chain_is_one_power(chain, magnitudes, signs):
    """power_of(chain)(s) equals applying the scale maps one by one (where the groups allow s)."""
    chain = tuple(chain)
    s = torch.tensor(magnitudes, dtype=torch.float64) * torch.tensor([-1.0 if b else 1.0 for b in signs],
                                                                     dtype=torch.float64)
    if "relu" in chain:
        s = s.abs()
    try:
        want = carried_scale(chain, s, _GROUPS)
    except ValueError:
        return  # an activation of the chain does not allow these scales (a negative scale before relu)
    assert torch.allclose(power_of(chain, _GROUPS)(s), want, rtol=1e-12)
    linear = torch.ones_like(s) if ONE in chain else s ** (-1) ** chain.count(DUAL)
    assert torch.allclose(linear_power(chain)(s), linear, rtol=1e-12)


def test_constraints_say_whether_an_element_satisfies_them():
    s = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    assert not Signed(()).satisfied_by(s, _GROUPS) and Signed(()).satisfied_by(torch.tensor([1.0, -1.0]), _GROUPS)
    assert Signed((ONE,)).satisfied_by(s, _GROUPS)               # a conv feeding a batch norm is only permuted
    assert not PositiveScales(()).satisfied_by(s, _GROUPS) and PositiveScales(("abs",)).satisfied_by(s, _GROUPS)
    assert not Unit(()).satisfied_by(s, _GROUPS) and Unit(("sigmoid",)).satisfied_by(torch.ones(3), _GROUPS)
    assert Activation((), "cube").satisfied_by(s, _GROUPS) and not Activation((), "relu").satisfied_by(s, _GROUPS)
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    assert Equal(("abs",), ("gaussian",)).satisfied_by(signs, _GROUPS) and not Equal((), ("abs",)).satisfied_by(
        signs, _GROUPS)
    assert not Equal((), ("abs",)).satisfied_by(s, _GROUPS) and Equal((), ("abs",)).satisfied_by(s.abs(), _GROUPS)


# --------------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------------

def test_slots_name_every_tensor_axis_and_how_it_moves():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4, 2)).double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x)
    (name,) = spec.spaces
    slots = {(s.tensor, s.axis): s for s in spec.slots(name)}
    assert {k: (type(s.reach), s.kind) for k, s in slots.items()} == {
        ("0.weight", 0): (Rows, "parameter"), ("0.bias", 0): (Rows, "parameter"),
        ("1.weight", 0): (Gain, "parameter"), ("1.bias", 0): (Rows, "parameter"),
        ("1.running_mean", 0): (Rows, "buffer"), ("1.running_var", 0): (Permuted, "buffer"),
        ("4.weight", 1): (Columns, "parameter"), ("2", 1): (Features, "site")}
    # the conv feeding the batch norm is only permuted (0, even); gamma carries the scaling (1, odd);
    # the flatten repeats each channel over its 2x2 pixels in the linear layer's columns
    assert (slots[("0.weight", 0)].exponent, slots[("0.weight", 0)].odd) == (0.0, False)
    assert (slots[("1.weight", 0)].exponent, slots[("1.weight", 0)].odd) == (1.0, True)
    assert slots[("4.weight", 1)].exponent == -1.0   # after ReLU: scales are positive, so parity is moot
    assert slots[("4.weight", 1)].positions.tolist() == [[4 * c + p for p in range(4)] for c in range(4)]
    s = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert torch.allclose(slots[("4.weight", 1)].factor(s), 1 / s)
    with pytest.raises(ValueError, match="unknown space"):
        spec.slots("nope")


def _agree_with_probe(model, x) -> int:
    spec = symmetry_spec(model, x, check=False)
    names = [n for n, s in spec.spaces.items() if s.group.is_monomial]
    probed = [probe_parameters(model, spec, names), probe_sites(model, spec, x, [n for n in names
                                                                                 if spec.spaces[n].sites])]
    checked = 0
    for name in names:
        mine = {(s.tensor, s.axis): s for s in spec.slots(name)}
        for found in probed:
            for ps in found[name].slots if name in found else []:
                s = mine[(ps.key, ps.axis)]
                assert np.array_equal(s.coords, np.arange(spec.spaces[name].size))
                assert np.array_equal(np.sort(s.positions, 1), np.sort(ps.positions, 1)), (name, ps.key)
                power = s.reach.after.power if s.kind == "site" else s.reach.power   # features are read after
                if ps.exponent is not None:
                    assert power.exponent == ps.exponent, (name, ps.key, power, ps.exponent)
                if ps.odd is not None:
                    assert power.odd == ps.odd, (name, ps.key, power, ps.odd)
                checked += 1
    return checked


@pytest.mark.parametrize("activation", ["power:3", "gaussian"])
def test_slots_agree_with_the_probe(activation):
    """Positions, exponents and parities of the slots equal what the probe measures by applying elements."""
    torch.manual_seed(0)
    model = models.myrtle_cnn(4, activation=activation, input_size=8).double()
    assert _agree_with_probe(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)) >= 16


def test_slots_agree_with_the_probe_through_padding_and_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5),
                          nn.Tanh(), nn.Linear(5, 2)).double()
    assert _agree_with_probe(model, torch.randn(3, 3, 8, 8, dtype=torch.float64)) >= 8
    model = models.resnet20(shortcut="A", widths=(4, 8, 16)).double()
    assert _agree_with_probe(model, torch.randn(2, 3, 8, 8, dtype=torch.float64)) >= 100


def test_attention_slots_are_head_blocks():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(3, 8), mha, nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    spec = symmetry_spec(Net().double(), torch.randn(2, 5, 3, dtype=torch.float64))
    (name,) = [n for n, s in spec.spaces.items() if s.kind == "attention_heads"]
    parts = {(s.tensor, s.reach.part) for s in spec.slots(name)}
    assert {("attn.in_proj_weight", p) for p in "qkv"} <= parts and ("attn.out_proj.weight", "o") in parts
    assert all(isinstance(s.reach, HeadBlocks) for s in spec.slots(name))
    assert {(a.param, a.role) for a in spec.actions(name)} >= {("attn.in_proj_weight", "out"),
                                                             ("attn.out_proj.weight", "in")}


def test_register_rule_checks_its_arguments():
    with pytest.raises(ValueError, match="operator"):
        register_rule("relu", lambda ctx, node: None)
    with pytest.raises(ValueError, match="callable"):
        register_rule(torch.ops.aten.roll, 3)
    unregister_rule(torch.ops.aten.roll)   # nothing registered: no error
