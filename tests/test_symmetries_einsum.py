"""Products written with ``torch.einsum`` (XLNet's relative attention) and the similarities of two towers'
embeddings (CLIP), on replica modules. Every derived space is checked as derived (no safety net, float64),
and what the rules must not derive changes the outputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry
from intertwiners.symmetries import layout as L

X = torch.randn(5, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))   # (tokens, batch, in)


class RelativeAttention(nn.Module):
    """transformers' ``XLNetRelativeAttention`` in miniature, tokens first: q/k/v/o/r are (d, heads, width)
    parameters applied with ``einsum``; content scores ``(q + r_w_bias) k^T``, position scores
    ``(q + r_r_bias) k_r^T`` against sinusoidal positions projected by r and shifted to relative distance with
    XLNet's reshape/slice/reshape/index_select, weights times values and the output projection with
    ``einsum``, then a residual connection and a layer norm."""

    def __init__(self, d=8, heads=2, width=4):
        super().__init__()
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 3)
        self.q, self.k, self.v, self.o, self.r = (nn.Parameter(torch.randn(d, heads, width) / math.sqrt(d))
                                                  for _ in range(5))
        self.r_w_bias, self.r_r_bias = nn.Parameter(torch.randn(heads, width)), nn.Parameter(torch.randn(heads, width))
        self.norm = nn.LayerNorm(d)

    @staticmethod
    def rel_shift(x, klen):                                   # XLNet's rel_shift_bnij
        b, n, i, j = x.shape
        x = x.reshape(b, n, j, i)[:, :, 1:, :].reshape(b, n, i, j - 1)
        return torch.index_select(x, 3, torch.arange(klen))

    def positions(self, T, B):
        freq = 1.0 / 10000 ** (torch.arange(0, self.inp.out_features, 2.0) / self.inp.out_features)
        angles = torch.arange(T, -T, -1.0)[:, None] * freq
        return torch.cat([angles.sin(), angles.cos()], -1)[:, None].expand(-1, B, -1).to(self.q.dtype)

    def forward(self, x):                                     # (T, B, 4)
        h = torch.tanh(self.inp(x))
        T, B, _ = h.shape
        q, k, v = (torch.einsum("ibh,hnd->ibnd", h, w) for w in (self.q, self.k, self.v))
        kr = torch.einsum("ibh,hnd->ibnd", self.positions(T, B), self.r)
        ac = torch.einsum("ibnd,jbnd->bnij", q + self.r_w_bias, k)
        bd = self.rel_shift(torch.einsum("ibnd,jbnd->bnij", q + self.r_r_bias, kr), T)
        p = ((ac + bd) * 0.5).softmax(3)
        a = torch.einsum("ibnd,hnd->ibh", torch.einsum("bnij,jbnd->ibnd", p, v), self.o)
        return self.out(self.norm(a + h))


def _model():
    torch.manual_seed(0)
    model = RelativeAttention().double()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    return model


def test_relative_attention_written_with_einsum_moves_every_projection_with_the_heads():
    model = _model()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert group.permute_heads and group.heads == 2 and group.qk == group.vo == "general_linear", group
    report = verify_symmetry(model, X, spec=spec, trials=2, modes=("eval",))
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    old, moved = dict(model.named_parameters()), dict(new.named_parameters())
    assert [k for k in old if torch.equal(old[k], moved[k])] == ["out.bias"]


def test_position_keys_must_follow_the_heads():
    """Swapping the two heads of q, k, v, o and the content bias, but not of r and the position bias, changes
    the output; swapping those too does not (what the einsum rule derives)."""
    model = _model()
    swapped = _model()
    heads = torch.tensor([1, 0])
    with torch.no_grad():
        for name in ("q", "k", "v", "o"):
            getattr(swapped, name).copy_(getattr(model, name)[:, heads])
        swapped.r_w_bias.copy_(model.r_w_bias[heads])
        assert (swapped(X) - model(X)).abs().max() > 1e-6
        swapped.r.copy_(model.r[:, heads])
        swapped.r_r_bias.copy_(model.r_r_bias[heads])
        assert (swapped(X) - model(X)).abs().max() < 1e-12


def test_a_per_head_map_in_the_queries_must_be_undone_in_both_sets_of_keys():
    """A map A on head 0's queries, undone by A^-T on its content keys only (not its position keys), changes the
    output: the position keys are tied to the queries as the content keys are."""
    model = _model()
    changed = _model()
    A = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 3 * torch.eye(4)
    with torch.no_grad():
        changed.q[:, 0] = model.q[:, 0] @ A.T
        changed.r_w_bias[0] = A @ model.r_w_bias[0]
        changed.r_r_bias[0] = A @ model.r_r_bias[0]
        changed.k[:, 0] = model.k[:, 0] @ torch.linalg.inv(A)
        assert (changed(X) - model(X)).abs().max() > 1e-6
        changed.r[:, 0] = model.r[:, 0] @ torch.linalg.inv(A)
        assert (changed(X) - model(X)).abs().max() < 1e-12


class EinsumLayers(nn.Module):
    """Linear layers written with einsum: ``"tbi,oi->tbo"`` (W (out, in)), ``"tbo,oj->tbj"`` (W (in, out)),
    a transpose ``"tbj->btj"`` and a dot product with a vector ``"btj,j->bt"``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 5))
        self.c = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = torch.relu(torch.einsum("tbi,oi->tbo", x, self.a))
        g = torch.tanh(torch.einsum("tbo,oj->tbj", h, self.b))
        return torch.einsum("btj,j->bt", torch.einsum("tbj->btj", g), self.c)


def test_einsum_linear_layers():
    torch.manual_seed(0)
    model = EinsumLayers().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    assert sorted((s.size, s.kind) for s in spec.spaces.values()) == [(5, "signed_permutation"),
                                                                       (6, "positive_scaled_permutation")]
    report = verify_symmetry(model, X, spec=spec, trials=2, modes=("eval",))
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()))
    with torch.no_grad():   # the rows of a moved without the columns of b: not a symmetry
        perm = torch.tensor([1, 0, 2, 3, 4, 5])
        new.a.copy_(model.a[perm])
        new.b.copy_(model.b)
        new.c.copy_(model.c)
        assert (new(X) - model(X)).abs().max() > 1e-6


def test_einsum_the_rules_do_not_follow_pins():
    """A parameter with one slice per head kept in the output (``"ibnd,snd->ibns"``, XLNet's segment
    embeddings) is not one linear map: the channels it reads are pinned, and the spec is still a symmetry."""

    class PerHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.seg = nn.Linear(4, 6), nn.Parameter(torch.randn(3, 2, 3))

        def forward(self, x):
            h = torch.tanh(self.a(x)).view(*x.shape[:2], 2, 3)
            return torch.einsum("ibnd,snd->ibns", h, self.seg)

    torch.manual_seed(0)
    model = PerHead().double()
    spec = symmetry_spec(model, X, check=False)
    assert any("einsum" in r for r in spec.pinned.values()), spec.pinned
    assert verify_symmetry(model, X, spec=spec, trials=2, modes=("eval",)).ok


class TwoTowers(nn.Module):
    """CLIP in miniature: two towers project to a shared embedding width, the embeddings are L2-normalised
    (``normalise``: with ``norm``, or with ``pow``/``sum`` as CLIP does, or not at all) and compared by
    ``image @ text.T`` times a learnt scale (the only output)."""

    def __init__(self, normalise="norm"):
        super().__init__()
        self.normalise = normalise
        self.image, self.text = nn.Linear(4, 6), nn.Linear(3, 6)
        self.image_projection, self.text_projection = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, images, texts):
        a = self.image_projection(torch.tanh(self.image(images)))
        b = self.text_projection(torch.tanh(self.text(texts)))
        if self.normalise == "norm":
            a, b = a / a.norm(p=2, dim=-1, keepdim=True), b / b.norm(p=2, dim=-1, keepdim=True)
        elif self.normalise == "pow":   # as transformers' CLIPModel writes it
            a, b = a / a.pow(2).sum(-1, keepdim=True).pow(0.5), b / b.pow(2).sum(-1, keepdim=True).pow(0.5)
        return (a @ b.t()) * self.logit_scale.exp()


PAIRS = (torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)),
         torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("normalise, kind", [("norm", "signed_permutation"), ("pow", "signed_permutation"),
                                             (None, "general_linear")])
def test_the_two_towers_projections_share_one_space(normalise, kind):
    torch.manual_seed(0)
    model = TwoTowers(normalise).double()
    spec = symmetry_spec(model, PAIRS, check=False)
    assert not spec.pinned, spec.pinned
    (shared,) = [s for s in spec.spaces.values() if s.size == 5]
    assert shared.kind == kind
    assert {a.param for a in spec.actions(shared.name)} == {"image_projection.weight", "text_projection.weight"}
    report = verify_symmetry(model, PAIRS, spec=spec, trials=2, modes=("eval",))
    assert report.ok and report.max_rel <= 1e-12
    with torch.no_grad():   # one tower's projection permuted alone: not a symmetry
        new = TwoTowers(normalise).double()
        new.load_state_dict(model.state_dict())
        new.image_projection.weight.copy_(model.image_projection.weight[[1, 0, 2, 3, 4]])
        assert (new(*PAIRS) - model(*PAIRS)).abs().max() > 1e-6
        new.text_projection.weight.copy_(model.text_projection.weight[[1, 0, 2, 3, 4]])
        assert (new(*PAIRS) - model(*PAIRS)).abs().max() < 1e-12


@pytest.mark.parametrize("up, down", [("tbi,ind->tbnd", "tbnd,ndo->tbo"),    # P (in, heads, width)
                                      ("tbi,nid->bntd", "bntd,odn->bto"),    # other letter orders
                                      ("tbi,dni->tbdn", "tbdn,dno->tbo")])
def test_einsum_letter_orders(up, down):
    """A head-by-head projection and its inverse written with the parameters' axes and the outputs' letters in
    several orders: the rows/columns recorded on the flattened parameter follow the letters, so the space as
    derived is a symmetry and moves both parameters; swapping two of its channels in the first parameter
    alone is not."""

    def letters_shape(eq, i):
        sizes = {"t": 5, "b": 2, "i": 4, "n": 2, "d": 3, "o": 3}
        return tuple(sizes[c] for c in eq.split("->")[0].split(",")[i])

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(letters_shape(up, 1)))
            self.q = nn.Parameter(torch.randn(letters_shape(down, 1)))

        def forward(self, x):
            return torch.einsum(down, torch.tanh(torch.einsum(up, x, self.p)), self.q)

    torch.manual_seed(0)
    model = Heads().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned and [s.size for s in spec.spaces.values()] == [6], spec
    assert verify_symmetry(model, X, spec=spec, trials=2, modes=("eval",)).ok
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.p, model.p) and not torch.equal(new.q, model.q)
    with torch.no_grad():
        ni = up.split(",")[1].index("n")
        new.p.copy_(model.p.index_select(ni, torch.tensor([1, 0])))
        new.q.copy_(model.q)
        assert (new(X) - model(X)).abs().max() > 1e-6


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=2), st.integers(2, 4),
       st.lists(st.integers(1, 4), min_size=2, max_size=2), st.booleans())
def test_reshape_regroups_positions_without_channels(before, heads, after, across):
    """A reshape of a value with channels on one axis, checked against numpy: the channel at every position of
    the reshaped layout is the channel the reshaped tensor holds there. Regrouping the positions on each side of
    the channel axis (XLNet's relative shift) is followed; a reshape that moves positions across the channel
    axis (``across``) may only be refused, never read wrongly."""
    shape = (*before, heads, *after)
    lay = L.simple(np.arange(heads), np.zeros(heads, np.int64), shape, 2)
    where = L.feature_index(lay, list(range(lay.ndim)))
    new_shape = (before[1], before[0], heads, after[1], after[0])
    if across:
        new_shape = (before[0] * before[1] * heads, after[0] * after[1])
    got = L.reshape(lay, new_shape)
    if not across:
        assert got is not None
    if got is not None:
        assert got.shape == new_shape
        np.testing.assert_array_equal(lay.atoms[L.feature_index(got, list(range(got.ndim)))],
                                      lay.atoms[where.reshape(new_shape)])


def test_a_parameter_read_by_two_einsums_moves_once_for_both():
    """One head-by-head projection applied to two inputs (XLNet's two streams share q): its rows (on the
    flattened parameter) and its columns (along its first axis) are tied across the two uses, so the inputs'
    channels and the two outputs' channels each form one space, and the spec as derived is a symmetry."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4)
            self.p, self.q = nn.Parameter(torch.randn(4, 2, 3)), nn.Parameter(torch.randn(2, 3, 3))

        def forward(self, x):
            a, b = (torch.tanh(torch.einsum("tbh,hnd->tbnd", torch.tanh(lin(x)), self.p)) for lin in (self.l1, self.l2))
            return torch.einsum("tbnd,ndo->tbo", a + b, self.q)

    torch.manual_seed(0)
    model = Shared().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned and sorted(s.size for s in spec.spaces.values()) == [4, 6], spec
    assert verify_symmetry(model, X, spec=spec, trials=2, modes=("eval",)).ok
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()))
