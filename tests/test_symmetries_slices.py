"""A parameter read in parts: ``nn.MultiheadAttention`` slices its packed ``in_proj_weight`` into the query and
key/value projections whenever the query is not the key (cross-attention, ``nn.TransformerDecoderLayer``), and
users write ``F.linear(x, w[:h])``. Each part moves with the space of what it reads and makes, and only inside
its own rows: the query part's input columns with the decoder's stream, the key/value part's with the memory.
Parts that overlap cannot be moved apart and pin their channels."""

import pytest
import torch
import torch.nn.functional as F
from symmetry_checks import randomised
from torch import nn

from intertwiners import align
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry
from intertwiners.symmetries.verify import compare


def moved_share(model, new) -> float:
    a, b = dict(model.named_parameters()), dict(new.named_parameters())
    return sum(int((a[k] != b[k]).sum()) for k in a) / sum(p.numel() for p in a.values())


def exact(model, x, trials=2):
    """The spec as derived (no safety check) verifies to float64 rounding; returns it and a moved copy."""
    spec = symmetry_spec(model, x, check=False)
    report = verify_symmetry(model, x, spec=spec, trials=trials)
    assert report.ok and report.max_rel <= 1e-12, report
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(err <= 1e-12 for _, err in compare(model, new, x).values())
    return spec, new


class CrossAttention(nn.Module):
    """A query stream attending to a memory with its own stream (ReLU: scaled permutations), through
    ``nn.MultiheadAttention`` called as ``attn(q, k, v)``; ``values`` "key": v is k (the split into [E, 2E]),
    "own": v differs from k too (three chunks)."""

    def __init__(self, values="key", bias=True, batch_first=True, d=16):
        super().__init__()
        self.values, self.batch_first = values, batch_first
        self.q_in, self.k_in, self.v_in = nn.Linear(5, d), nn.Linear(5, d), nn.Linear(5, d)
        self.attn = nn.MultiheadAttention(d, 4, bias=bias, batch_first=batch_first)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        q, k = self.q_in(x), torch.relu(self.k_in(x.flip(1)))
        v = k if self.values == "key" else torch.tanh(self.v_in(x.roll(1, 1)))
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        h = self.attn(q, k, v, need_weights=False)[0]
        return self.out(h if self.batch_first else h.transpose(0, 1))


@pytest.mark.parametrize("values,bias,batch_first", [("key", True, True), ("own", True, True),
                                                     ("key", False, False), ("own", False, True)])
def test_cross_attention_moves_each_part_of_the_packed_projection_with_its_own_input(values, bias, batch_first):
    torch.manual_seed(0)
    model = randomised(CrossAttention(values, bias, batch_first)).eval()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    spec, new = exact(model, x)
    assert not spec.pinned, spec.pinned
    assert {"attn.attention", ":relu"} <= set(spec.spaces)
    assert moved_share(model, new) > 0.9   # all but v_in, unused when v is k
    # the memory's space moves only the key/value rows' columns, the query stream's only the query rows'
    mem = apply_symmetry(model, {":relu": random_symmetry(spec, torch.Generator().manual_seed(2))[":relu"]}, spec)
    w0, w1 = model.attn.in_proj_weight, mem.attn.in_proj_weight
    assert torch.equal(w0[:16], w1[:16]) and not torch.equal(w0[16:32], w1[16:32])
    rows = {r for s in spec.slots(":relu") if s.tensor == "attn.in_proj_weight" for r in range(*s.block[1:])}
    assert rows == set(range(16, 48 if values == "key" else 32))


def test_cross_attention_memory_is_not_invariant_under_a_rotation():
    """The memory passes a ReLU: a rotation of its space (outside G_ReLU) applied everywhere it acts changes
    the output, and so does the right element applied to every row of the packed projection (one move too many)."""
    torch.manual_seed(0)
    model = randomised(CrossAttention()).eval()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    Q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    bad = apply_symmetry(model, {":relu": Q}, spec, check=False)
    assert compare(model, bad, x, ("eval",))["eval"][1] > 1e-3
    good = apply_symmetry(model, {":relu": random_symmetry(spec, torch.Generator().manual_seed(3))[":relu"]}, spec)
    too_far = {k: v.clone() for k, v in good.state_dict().items()}
    perm_scale = random_symmetry(spec, torch.Generator().manual_seed(3))[":relu"]
    too_far["attn.in_proj_weight"][:16] = model.attn.in_proj_weight[:16].detach() @ torch.linalg.inv(perm_scale)
    good.load_state_dict(too_far)
    assert compare(model, good, x, ("eval",))["eval"][1] > 1e-3


class Decoder(nn.Module):
    """``nn.TransformerDecoderLayer`` (self-attention on the targets, cross-attention on the memory)."""

    def __init__(self, norm_first=False, memory=None, d=16):
        super().__init__()
        self.memory = memory or (lambda m: m)
        self.tgt, self.mem = nn.Linear(5, d), nn.Linear(5, d)
        self.layer = nn.TransformerDecoderLayer(d, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.layer(self.tgt(x), self.memory(self.mem(x.flip(1)))))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_layer_moves_its_cross_attention(norm_first):
    torch.manual_seed(0)
    model = randomised(Decoder(norm_first)).eval()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    spec, new = exact(model, x)
    assert {"layer.self_attn.attention", "layer.multihead_attn.attention", "mem"} <= set(spec.spaces)
    assert not spec.pinned and moved_share(model, new) > 0.95


def test_full_nn_transformer_is_exact():
    torch.manual_seed(0)
    net = nn.Transformer(16, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                         batch_first=True)
    model = randomised(nn.ModuleDict({"src": nn.Linear(5, 16), "net": net}))
    model.forward = lambda x: net(model["src"](x), model["src"](x.flip(1)))
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    spec, new = exact(model.eval(), x)
    assert sum(s.kind == "attention_heads" for s in spec.spaces.values()) == 3
    assert moved_share(model, new) > 0.9


def test_weight_matching_undoes_a_planted_element_through_the_cross_attention():
    torch.manual_seed(0)
    model = randomised(Decoder(memory=torch.relu)).eval()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    planted = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(4)), spec)
    got = align(model, planted, example_input=x, method="weights")
    assert max(float((p - q).abs().max()) for p, q in zip(model.parameters(), got.model.parameters())) < 1e-9


class Parts(nn.Module):
    """One weight read in two row ranges by two linear layers: ``split`` ([0, 6) and [6, 10)) or ``overlap``
    ([0, 6) and [4, 10)); ``whole``: the first range and the whole weight."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w, self.b = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(10))
        self.head = nn.Linear(10 if how == "whole" else 6, 2)
        self.lo = 4 if how == "overlap" else 6
        self.tail = nn.Linear(10 - self.lo, 2)

    def forward(self, x):
        a = torch.relu(F.linear(x, self.w[:6], self.b[:6]))
        if self.how == "whole":
            return self.head(torch.relu(F.linear(x, self.w, self.b))) + a.sum(-1, keepdim=True)
        return self.head(a) + self.tail(torch.relu(F.linear(x, self.w[self.lo:], self.b[self.lo:])))


def test_disjoint_parts_of_one_weight_are_separate_spaces():
    torch.manual_seed(0)
    model = randomised(Parts("split")).eval()
    x = torch.randn(7, 4, dtype=torch.float64)
    spec, new = exact(model, x)
    assert sorted(s.size for s in spec.spaces.values()) == [4, 6]
    assert moved_share(model, new) > 0.9


@pytest.mark.parametrize("how", ["overlap", "whole"])
def test_overlapping_parts_pin_their_channels(how):
    torch.manual_seed(0)
    model = randomised(Parts(how)).eval()
    x = torch.randn(7, 4, dtype=torch.float64)
    spec, new = exact(model, x)
    assert any("overlap" in reason for reason in spec.pinned.values()), spec.pinned
    assert torch.equal(new.w, model.w) and torch.equal(new.b, model.b)


class ColumnParts(nn.Module):
    """One weight read in two column ranges: by two layers of their own (``summed=False``: two row spaces, each
    confined to its columns) or as one layer over two inputs whose products are added (the rows of both parts
    then carry one transform)."""

    def __init__(self, summed):
        super().__init__()
        self.summed = summed
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 5)
        self.w = nn.Parameter(torch.randn(6, 9))
        self.h1, self.h2 = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        u, v = torch.relu(self.a(x)), torch.tanh(self.b(x))
        if self.summed:
            return self.h1(torch.relu(F.linear(u, self.w[:, :4]) + F.linear(v, self.w[:, 4:])))
        return self.h1(torch.relu(F.linear(u, self.w[:, :4]))) + self.h2(torch.sigmoid(F.linear(v, self.w[:, 4:])))


@pytest.mark.parametrize("summed", [False, True])
def test_column_parts_move_their_rows_inside_their_columns(summed):
    torch.manual_seed(0)
    model = randomised(ColumnParts(summed)).eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    spec, new = exact(model, x, trials=3)
    rows = [s for s in spec.slots() if s.tensor == "w" and s.axis == 0]
    assert sorted(s.block for s in rows) == [(1, 0, 4), (1, 4, 9)]
    assert (rows[0].space == rows[1].space) == summed
    assert not spec.pinned and moved_share(model, new) > 0.8   # h2 unread when summed


class SlicedBuffer(nn.Module):
    """A buffer sliced and read as data (a rotary-style cache ``cos[:tokens]``), not as a layer's weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("cos", torch.rand(16, 8))

    def forward(self, x):
        return self.b(self.a(x) * self.cos[: x.shape[1]])


def test_a_parameter_sliced_as_data_stays_an_untransformed_tensor():
    """Only a slice read as a layer's weight or bias is a part of the parameter: a cache sliced and multiplied
    is an untransformed factor that varies along the channels, which then share one scalar."""
    model = randomised(SlicedBuffer()).eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    spec, _ = exact(model, x)
    assert not spec.pinned and [(s.size, s.kind) for s in spec.spaces.values()] == [(1, "general_linear")]
