"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; timm's Sequencer): each layer and direction's hidden units
are a space of their own, moved by one permutation through every gate's rows of both weights and biases and the
recurrent weight's columns; nothing finer (a sign through a sigmoid gate changes the outputs), nothing across
directions, and nothing when the layer's states are read or given from outside."""

import pytest
import torch
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

X = torch.randn(2, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class Recurrent(nn.Module):
    """Linear -> ReLU -> recurrent layer (batch first or not) -> linear on every step's output; ``states``: the
    head also reads the final hidden state; ``h0``: an initial state the model passes in."""

    def __init__(self, kind="LSTM", bidirectional=False, layers=1, batch_first=True, states=False, h0=False):
        super().__init__()
        self.kind, self.batch_first, self.states, self.h0 = kind, batch_first, states, h0
        self.a = nn.Linear(4, 5)
        self.rnn = getattr(nn, kind)(5, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.b = nn.Linear(6 * (2 if bidirectional else 1), 3)
        self.register_buffer("init", torch.randn(layers * (2 if bidirectional else 1), 1, 6))

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h if self.batch_first else h.transpose(0, 1)
        if self.h0:
            init = self.init.expand(-1, h.shape[0 if self.batch_first else 1], -1).contiguous()
            y, last = self.rnn(h, (init, torch.zeros_like(init)) if self.kind == "LSTM" else init)
        else:
            y, last = self.rnn(h)
        y = self.b(y if self.batch_first else y.transpose(0, 1))
        if self.states:
            final = last[0] if self.kind == "LSTM" else last
            y = y + final[-1][:, None, :3]
        return y


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional, layers, batch_first", [(False, 1, True), (True, 2, False)])
def test_hidden_units_of_each_layer_and_direction_permute(kind, bidirectional, layers, batch_first):
    torch.manual_seed(0)
    model = Recurrent(kind, bidirectional, layers, batch_first).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    dirs = 2 if bidirectional else 1
    assert sorted(s.size for s in spec.spaces.values()) == [5] + [6] * (layers * dirs)
    assert all(s.kind == "permutation" for s in spec.spaces.values() if s.size == 6)
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12, report
    moved = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    for (name, p), q in zip(model.rnn.named_parameters(), moved.rnn.parameters()):
        assert not torch.equal(p, q), name


def _first_hidden(spec):
    return next(name for name, s in spec.spaces.items() if s.size == 6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_what_the_hidden_units_exclude_changes_the_outputs(kind):
    """A sign on one unit (a signed permutation, outside the group: the gates are sigmoids) changes the outputs;
    so does a permutation that trades units between the two directions of a bidirectional layer."""
    torch.manual_seed(0)
    model = Recurrent(kind).double()
    spec = symmetry_spec(model, X, check=False)
    sign = torch.eye(6, dtype=torch.float64)
    sign[0, 0] = -1
    moved = apply_symmetry(model, {_first_hidden(spec): sign}, spec, check=False)
    with torch.no_grad():
        assert float((moved(X) - model(X)).abs().max()) > 1e-3
    both = Recurrent(kind, bidirectional=True).double()
    with torch.no_grad():   # forward unit 0 <-> backward unit 0, in every weight of the layer
        swapped = Recurrent(kind, bidirectional=True).double()
        swapped.load_state_dict(both.state_dict())
        g = 4 if kind == "LSTM" else 3
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            f, r = getattr(swapped.rnn, name), getattr(swapped.rnn, name + "_reverse")
            rows = torch.arange(g) * 6
            f[rows], r[rows] = getattr(both.rnn, name + "_reverse")[rows], getattr(both.rnn, name)[rows]
            if name == "weight_hh_l0":   # and the unit's column, which feeds its own direction's gates
                f[:, 0], r[:, 0] = r[:, 0].clone(), f[:, 0].clone()
        swapped.b.weight[:, [0, 6]] = both.b.weight[:, [6, 0]]
        assert float((swapped(X) - both(X)).abs().max()) > 1e-3


@pytest.mark.parametrize("states, h0", [(True, False), (False, True)])
def test_states_read_or_given_from_outside_pin_the_units(states, h0):
    torch.manual_seed(0)
    model = Recurrent("LSTM", states=states, h0=h0).double()
    spec = symmetry_spec(model, X, check=False)
    assert any("initial or final states are read outside the layer" in r for r in spec.pinned.values()), spec.pinned
    assert verify_symmetry(model, X, spec=spec, trials=2).ok


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_alignment_undoes_a_planted_element_of_a_stacked_bidirectional_lstm(method):
    from intertwiners import align

    torch.manual_seed(0)
    model = Recurrent("LSTM", bidirectional=True, layers=2).double()
    spec = symmetry_spec(model, X, check=False)
    moved = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(5)), spec)
    data = {"data": torch.randn(64, 7, 4, dtype=torch.float64)} if method == "activations" else {}
    back = align(model, moved, example_input=X, method=method, **data).model
    assert max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), back.parameters())) < 1e-12
