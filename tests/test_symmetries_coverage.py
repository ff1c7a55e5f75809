"""Issue 18's families of operations on hand-written replica blocks: each derived space is checked as derived
(no safety net) against the outputs, and each operation that would break a symmetry pins with its reason."""

import torch
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

X = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class ShapeOps(nn.Module):
    """Token shifts (roll), stack/unbind, repeat along tokens and reshape_as between two linear layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):                                  # (B, T, 4)
        h = torch.roll(torch.relu(self.a(x)), 1, dims=1)   # (B, T, 6), tokens shifted
        u, v = torch.stack([h, 2 * h], dim=1).unbind(1)    # (B, 2, T, 6) -> two (B, T, 6)
        r = (u + v).repeat(1, 2, 1)                        # (B, 2T, 6)
        s = r.reshape_as(torch.stack([u, v], dim=1))       # (B, 2, T, 6)
        return self.b(s)


class ChannelOps(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Linear(4, 6), nn.Linear(6, 3), op

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x))))


def test_roll_stack_unbind_repeat_reshape_as_keep_the_hidden_space():
    torch.manual_seed(0)
    model = ShapeOps().double()
    spec = symmetry_spec(model, X, check=False)
    (space,) = spec.spaces.values()
    assert space.size == 6 and not spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()) if p.shape[0] == 6)


def test_shifting_or_tiling_the_channel_axis_pins_it():
    for op, why in [(lambda h: torch.roll(h, 1, dims=-1), "shifts a channel axis"),
                    (lambda h: h.repeat(1, 1, 2)[..., 3:9], "repeats a channel axis")]:
        torch.manual_seed(0)
        model = ChannelOps(op).double()
        spec = symmetry_spec(model, X, check=False)
        assert not spec.spaces and any(why in r for r in spec.pinned.values()), spec.pinned
        # the pin is needed: permuting a's outputs and b's inputs changes the function
        perm = torch.randperm(6)
        moved = ChannelOps(op).double()
        moved.load_state_dict(model.state_dict())
        with torch.no_grad():
            moved.a.weight.copy_(model.a.weight[perm])
            moved.a.bias.copy_(model.a.bias[perm])
            moved.b.weight.copy_(model.b.weight[:, perm])
        assert (moved(X) - model(X)).abs().max() > 1e-3


class WrittenOutLinear(nn.Module):
    """Linear layers written as products with a parameter: x @ W.T + b (Falcon, XGLM) and x @ W."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(5, 6))
        self.w3 = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        h = torch.relu(x @ self.w1.T + self.b1)
        h = torch.tanh(torch.matmul(h, self.w2.transpose(0, 1)))
        return h @ self.w3


def test_products_with_a_transposed_parameter_are_linear_layers():
    torch.manual_seed(0)
    model = WrittenOutLinear().double()
    spec = symmetry_spec(model, X, check=False)
    assert sorted(s.size for s in spec.spaces.values()) == [5, 6] and not spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()))
