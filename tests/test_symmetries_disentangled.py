"""DeBERTa's disentangled attention on a replica block: content-to-position (``q @ pk^T``) and position-to-content
(``k @ pq^T``) scores gathered by relative distance and added to ``q @ k^T``. Every derived space is checked as
derived (no safety net, float64), and what the rules must not derive changes the outputs."""

import pytest
import torch
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

X = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class Disentangled(nn.Module):
    """transformers' ``DisentangledSelfAttention`` (DeBERTa v1) in miniature: a fused q/k/v projection laid out
    head by head, q and v biases added in the heads' layout, a relative-position table projected to position
    keys ``pk`` and position queries ``pq``, both sets of scores gathered by clamped relative distance (the same
    index for every head). ``per_head_index``: the c2p index differs between heads (no longer a symmetry of
    the heads)."""

    def __init__(self, d=8, heads=2, span=3, per_head_index=False):
        super().__init__()
        self.h, self.span, self.per_head_index = heads, span, per_head_index
        self.inp, self.in_proj = nn.Linear(4, d), nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.rel = nn.Parameter(torch.randn(2 * span + 2, d))    # sliced to the span in use, as DeBERTa does
        self.pos_proj, self.pos_q_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.o, self.out = nn.Linear(d, d), nn.Linear(d, 3)

    def heads(self, t):                                    # (..., L, d) -> (..., H, L, d/H)
        return t.view(*t.shape[:-1], self.h, -1).transpose(-2, -3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, d = h.shape
        q, k, v = self.heads(self.in_proj(h)).chunk(3, dim=-1)
        q = (q + self.heads(self.q_bias[None, None, :])) / 3.0
        v = v + self.heads(self.v_bias[None, None, :])
        scores = q @ k.transpose(-1, -2)
        pos = torch.arange(T)
        rel = pos[:, None] - pos[None, :]
        c2p_idx = torch.clamp(rel + self.span, 0, 2 * self.span - 1)[None, None]
        if self.per_head_index:
            c2p_idx = torch.stack([c2p_idx[0, 0], c2p_idx[0, 0].flip(-1)])[None]
        rel_emb = self.rel[1:1 + 2 * self.span][None]       # (1, 2 span, d)
        pk = self.heads(self.pos_proj(rel_emb))            # (1, H, 2 span, d/H)
        c2p = torch.gather(q @ pk.transpose(-1, -2), -1, c2p_idx.expand(B, self.h, T, T))
        pq = self.heads(self.pos_q_proj(rel_emb)) / 3.0
        p2c_idx = torch.clamp(-rel + self.span, 0, 2 * self.span - 1)[None, None]
        p2c = torch.gather(k @ pq.transpose(-1, -2), -1, p2c_idx.expand(B, self.h, T, T)).transpose(-1, -2)
        p = (scores + c2p + p2c).softmax(-1)
        a = (p @ v).transpose(1, 2).reshape(B, T, d)
        return self.out(h + self.o(a))


def _model(**kw):
    torch.manual_seed(0)
    return Disentangled(**kw).double()


def test_disentangled_attention_moves_position_projections_with_the_heads():
    model = _model()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert group.permute_heads and group.heads == 2 and group.qk == group.vo == "general_linear", group
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    old, moved = dict(model.named_parameters()), dict(new.named_parameters())
    # the relative-position table's columns are a space of their own (undone by pk's and pq's columns); only
    # the output bias stays
    assert [k for k in old if torch.equal(old[k], moved[k])] == ["out.bias"]
    (table,) = [s for s in spec.spaces.values() if s.size == 8 and s.kind == "general_linear"]
    assert any(a.param == "rel" for a in spec.actions(table.name)), spec.actions(table.name)


def test_position_projections_must_follow_the_heads():
    """Swapping the two heads of q, k, v (and o's columns) but not of pk/pq changes the output: the rule that
    carries the heads through the gathered scores is what makes the head permutation a symmetry."""
    model = _model()
    swapped = _model()
    swapped.load_state_dict(model.state_dict())
    heads = torch.tensor([1, 0])
    cols = (heads[:, None] * 4 + torch.arange(4)).reshape(-1)              # channel order after the head swap
    fused = (heads[:, None] * 12 + torch.arange(12)).reshape(-1)           # in_proj rows are laid out per head
    with torch.no_grad():
        swapped.in_proj.weight.copy_(model.in_proj.weight[fused])
        swapped.q_bias.copy_(model.q_bias[cols])
        swapped.v_bias.copy_(model.v_bias[cols])
        swapped.o.weight.copy_(model.o.weight[:, cols])
        assert (swapped(X) - model(X)).abs().max() > 1e-6
        swapped.pos_proj.weight.copy_(model.pos_proj.weight[cols])
        swapped.pos_q_proj.weight.copy_(model.pos_q_proj.weight[cols])
        swapped.pos_q_proj.bias.copy_(model.pos_q_proj.bias[cols])
        assert (swapped(X) - model(X)).abs().max() < 1e-12


def test_an_index_that_differs_between_heads_keeps_them_in_place():
    model = _model(per_head_index=True)
    spec = symmetry_spec(model, X, check=False)
    assert any("differ between channels" in r for r in spec.pinned.values()), spec.pinned
    assert not any(getattr(s.group, "permute_heads", False) for s in spec.spaces.values())
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12


@pytest.mark.parametrize("viewed, order", [((1, 1, 2, 3), (0, 2, 1, 3)), ((1, 3, 1, 2), (0, 3, 2, 1))])
def test_a_parameter_transposed_across_axes_of_size_one_is_a_view(viewed, order):
    """q_bias viewed (1, 1, H, d/H) and permuted (0, 2, 1, 3) keeps its element order: it moves with the
    queries' channels. A transpose of two axes longer than one (same result shape, other element order) is not
    a view: the parameter is untransformed and the channels it is added to are pinned."""

    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
            self.bias = nn.Parameter(torch.randn(6))

        def forward(self, x):                                            # (B, T, 4)
            y = self.a(x).view(*x.shape[:2], 2, 3).permute(0, 2, 1, 3)   # (B, 2, T, 3)
            y = torch.tanh(y + self.bias.view(*viewed).permute(*order))
            return self.b(y.transpose(1, 2).reshape(*x.shape[:2], 6))

    torch.manual_seed(0)
    model = Biased().double()
    spec = symmetry_spec(model, X, check=False)
    if order == (0, 2, 1, 3):
        assert [s.size for s in spec.spaces.values()] == [6] and not spec.pinned, spec
    else:
        assert not spec.spaces and any("varies across channels" in r for r in spec.pinned.values()), spec
    assert verify_symmetry(model, X, spec=spec, trials=2).ok


class FoldedDisentangled(nn.Module):
    """DeBERTa v2's layout of the same block: heads folded into the batch axis (``bmm``), the position keys
    computed once, (heads, 2 span, d/H), from the whole relative-position table (layer-normalised first with
    ``norm_table``, DeBERTa v2's ``norm_rel_ebd="layer_norm"``), and tiled once per sample with ``repeat`` to
    (batch·heads, ...)."""

    def __init__(self, d=8, heads=2, span=3, norm_table=False):
        super().__init__()
        self.h, self.span = heads, span
        self.norm = nn.LayerNorm(d) if norm_table else nn.Identity()
        self.inp, self.qkv = nn.Linear(4, d), nn.Linear(d, 3 * d)
        self.rel = nn.Parameter(torch.randn(2 * span, d))
        self.pos_key_proj, self.o, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def fold(self, t):                                      # (B, L, d) -> (B·H, L, d/H)
        B, L, d = t.shape
        return t.view(B, L, self.h, -1).permute(0, 2, 1, 3).contiguous().view(-1, L, d // self.h)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, d = h.shape
        q, k, v = (self.fold(t) for t in self.qkv(h).chunk(3, dim=-1))
        pk = self.fold(self.pos_key_proj(self.norm(self.rel)[None])).repeat(B, 1, 1)   # (B·H, 2 span, d/H)
        pos = torch.arange(T)
        idx = torch.clamp(pos[:, None] - pos[None, :] + self.span, 0, 2 * self.span - 1)
        c2p = torch.gather(torch.bmm(q, pk.transpose(-1, -2)), -1, idx[None].expand(B * self.h, T, T))
        p = (torch.bmm(q, k.transpose(-1, -2)) + c2p).softmax(-1)
        a = torch.bmm(p, v).view(B, self.h, T, -1).transpose(1, 2).reshape(B, T, d)
        return self.out(h + self.o(a))


@pytest.mark.parametrize("norm_table", [False, True])
def test_position_keys_tiled_over_the_folded_batch_move_with_the_heads(norm_table):
    torch.manual_seed(0)
    model = FoldedDisentangled(norm_table=norm_table).double()
    if norm_table:
        with torch.no_grad():
            model.norm.weight.normal_()
            model.norm.bias.normal_()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert group.permute_heads and group.heads == 2, group
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    old, moved = dict(model.named_parameters()), dict(new.named_parameters())
    # the table read whole is an embedding: its columns move (undone by pos_key_proj's columns)
    assert [k for k in old if torch.equal(old[k], moved[k])] == ["out.bias"]
    table = [s for s in spec.spaces.values() if any(a.param == "rel" for a in spec.actions(s.name))]
    assert len(table) == 1 and table[0].kind == ("permutation" if norm_table else "general_linear"), table


def test_channels_tiled_into_a_linear_layer_move_in_every_copy():
    class Tiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(12, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).repeat(1, 1, 2))   # (B, T, 12): each channel twice

    torch.manual_seed(0)
    model = Tiled().double()
    spec = symmetry_spec(model, X, check=False)
    (space,) = spec.spaces.values()
    assert space.size == 6 and space.kind == "positive_scaled_permutation" and not spec.pinned, spec
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    # the second copy's columns must move too: transforming only the first copy changes the output
    half = Tiled().double()
    half.load_state_dict(model.state_dict())
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    with torch.no_grad():
        half.a.weight.copy_(model.a.weight[perm])
        half.a.bias.copy_(model.a.bias[perm])
        half.b.weight[:, :6].copy_(model.b.weight[:, :6][:, perm])
        assert (half(X) - model(X)).abs().max() > 1e-6
        half.b.weight[:, 6:].copy_(model.b.weight[:, 6:][:, perm])
        assert (half(X) - model(X)).abs().max() < 1e-12


class TwoScoreSets(nn.Module):
    """softmax(q1 k1^T + q2 k2^T) v: two unrelated sets of scores added (not DeBERTa: q2/k2 are not tied to
    q1/k1), so the block's maps on q1/k1 must not be taken to move q2/k2."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.o = nn.Linear(4, 8), nn.Linear(8, 40), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, _ = h.shape
        q1, k1, q2, k2, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in self.qkv(h).chunk(5, -1))
        p = (q1 @ k1.transpose(-1, -2) + q2 @ k2.transpose(-1, -2)).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(B, T, 8))


def test_unrelated_added_scores_keep_their_own_per_head_maps_and_the_heads_in_place():
    torch.manual_seed(0)
    model = TwoScoreSets().double()
    spec = symmetry_spec(model, X, check=False)
    groups = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert len(groups) == 2 and not any(g.permute_heads for g in groups), spec
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
