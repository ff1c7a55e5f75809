"""Capture and the engine's fast paths give the spec the slow references give: the ``make_fx`` trace against
``torch.export`` (model by model, slot by slot), vectorised union-find resolution against ``find``, and the
one-pass finiteness check against ``isfinite``."""

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


def test_a_failed_trace_falls_back_to_torch_export(monkeypatch):
    model, x = DataDependent().double(), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="data-dependent"):
        capture_module._capture_traced(model, (x,))
    calls = []
    real = capture_module.capture_exported
    monkeypatch.setattr(capture_module, "capture_exported", lambda m, a: calls.append(1) or real(m, a))
    with pytest.raises(ValueError, match="torch.export could not capture DataDependent"):
        symmetry_spec(model, x, check=False)
    assert calls == [1]


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
