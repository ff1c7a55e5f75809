"""The engine's fast paths give what their slow references give: the ``make_fx`` trace against ``torch.export``
(model by model, slot by slot), vectorised union-find resolution against ``find``, the grouping of classes
into spaces and each space's pin reasons against dictionary-based versions, and the one-pass finiteness
check against ``isfinite``."""

from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from replicas import gpt2_tiny, llama_tiny, regnet_x
from torch import nn

from intertwiners.symmetries import capture as capture_module
from intertwiners.symmetries import symmetry_spec
from intertwiners.symmetries.analysis import analyse
from intertwiners.symmetries.context import Atoms
from intertwiners.symmetries.inputs import all_finite, prepare_inputs
from intertwiners.symmetries.resolve import _group_in_order, _space_reasons
from intertwiners.symmetries.spec import build_spec


def fingerprint(spec) -> list:
    """Everything a spec says, as plain values: spaces (group, sites, producers, consumers, ties), pins with
    their reasons, sites, and every slot (tensor, axis, length, coordinates, positions, reach)."""
    out = [sorted(spec.pinned.items()), sorted(spec.pinned_sizes.items()), spec.sites, spec.lowest_cast]
    for s in spec.spaces.values():
        out.append((s.name, s.size, type(s.group).__name__, getattr(s.group, "name", None), s.kind, s.sites,
                    s.producers, s.consumers, s.ties))
    for slot in spec.all_slots:
        out.append((slot.space, slot.tensor, slot.kind, slot.axis, slot.length, slot.coords.tolist(),
                    slot.positions.tolist(), repr(slot.reach)))
    return out


def spec_from(cap, model):
    return build_spec(analyse(cap, model), type(model).__name__, cap.buffers)


@pytest.mark.parametrize("build", [regnet_x, gpt2_tiny, llama_tiny],
                         ids=["regnet_x", "gpt2", "llama"])
def test_traced_graph_gives_the_exported_spec(build):
    """Grouped convolutions, batch norms and residuals, transformers' GPT-2 (tied unembedding, masks)
    and Llama (rotary embeddings under no_grad/autocast, grouped-query attention): the same spec, slot by slot."""
    model, x = build()
    args = prepare_inputs(model, x)
    traced = spec_from(capture_module._capture_traced(model, args), model)
    exported = spec_from(capture_module.capture_exported(model, args), model)
    assert traced.spaces and fingerprint(traced) == fingerprint(exported)


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: no trace on fake tensors can follow it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) if bool(h.sum() > -1) else self.fc2(-h)


def test_a_failed_trace_falls_back_to_torch_export(monkeypatch, capfd):
    model, x = DataDependent().double(), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="data-dependent"):
        capture_module._capture_traced(model, (x,))
    calls = []
    real = capture_module.capture_exported
    monkeypatch.setattr(capture_module, "capture_exported", lambda m, a: calls.append(1) or real(m, a))
    capfd.readouterr()
    with pytest.raises(ValueError, match="torch.export could not capture DataDependent"):
        symmetry_spec(model, x, check=False)
    assert calls == [1]
    assert "def forward" not in capfd.readouterr().err   # the exporter's partial graph is not printed


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), st.integers(0, 1)), max_size=40))))
def test_resolved_roots_and_parities_agree_with_find(case):
    n, unions = case
    atoms = Atoms()
    atoms.new(n)
    for a, b, dual in unions:
        atoms.union(a, b, dual)
    roots, parity = atoms.resolved()
    expected = [atoms.find(a) for a in range(n)]
    assert roots.tolist() == [r for r, _ in expected]
    assert parity.tolist() == [p for _, p in expected]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@given(n=st.integers(1, 3000), where=st.floats(0, 1), bad=st.sampled_from([float("nan"), float("inf"),
                                                                          -float("inf")]))
@settings(max_examples=25, deadline=None)
def test_all_finite_finds_every_nan_and_inf(dtype, n, where, bad):
    t = torch.randn(n).to(dtype)
    assert all_finite(t) == bool(torch.isfinite(t).all())
    t[min(int(where * n), n - 1)] = bad
    assert not all_finite(t) and not all_finite(t.reshape(1, n, 1))


def test_all_finite_on_empty_and_extreme_tensors():
    assert all_finite(torch.zeros(0, 3))
    big = torch.tensor([3e38, 3e38])   # finite, though its sum overflows to inf
    assert all_finite(big) and not torch.isfinite(big.sum())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=30))
def test_grouping_in_order_agrees_with_a_dictionary(rows):
    keys = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    group, index = _group_in_order(keys)
    expected: dict[tuple, list[int]] = {}
    for i, row in enumerate(map(tuple, keys.tolist())):
        expected.setdefault(row, []).append(i)
    want_group, want_index = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    for g, members in enumerate(expected.values()):
        want_group[members], want_index[members] = g, np.arange(len(members))
    assert group.tolist() == want_group.tolist() and index.tolist() == want_index.tolist()


def _reasons_by_dictionaries(events, root, space_of, index_of, n_spaces):
    """The reference: atom -> reasons in the order found, gathered per class, then per space in coordinate
    order, duplicates dropped."""
    by_atom = defaultdict(list)
    for atoms, reason in events:
        for a in np.unique(atoms).tolist():
            by_atom[a].append(reason)
    by_class = defaultdict(list)
    for atom, reasons in by_atom.items():
        by_class[int(root[atom])].extend(reasons)
    out = []
    for s in range(n_spaces):
        members = sorted((int(index_of[c]), c) for c in range(len(root)) if space_of[c] == s)
        out.append(list(dict.fromkeys(r for _, c in members for r in by_class.get(c, []))))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, n - 1), min_size=n, max_size=n),                      # each atom's class
    st.lists(st.integers(-1, 2), min_size=n, max_size=n),                         # each class's space
    st.lists(st.tuples(st.lists(st.integers(0, n - 1), min_size=1, max_size=4),  # pin events
                       st.sampled_from("abcd")), max_size=8))))
def test_space_reasons_agree_with_dictionaries(case):
    classes, spaces, events = case
    n = len(classes)
    root = np.array(classes, dtype=np.int64)
    space_of = np.array(spaces + [-1], dtype=np.int64)
    index_of = np.full(n + 1, -1, dtype=np.int64)
    for s in set(spaces) - {-1}:
        members = [c for c in range(n) if spaces[c] == s]
        index_of[members] = np.random.default_rng(len(members)).permutation(len(members))
    atoms = Atoms()
    atoms.new(n)
    for subset, reason in events:
        atoms.pin(np.array(subset, dtype=np.int64), reason)
    got = _space_reasons(atoms.pins(), root, space_of, index_of, 3)
    assert got == _reasons_by_dictionaries(events, root, space_of, index_of, 3)
