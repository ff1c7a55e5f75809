"""Attention whose queries are max-pooled over tokens (Hiera's and SAM 2's mask-unit attention): a maximum commutes
with positive scalings and permutations only, so each head's queries/keys take a permutation within the head times
positive factors (keys the inverse factors), and the heads still permute. Written as transformers' Hiera writes
it -- (batch, heads, windows, tokens, width), the heads before a windows axis -- and as timm's SAM 2 writes it --
``scaled_dot_product_attention`` on (batch, heads, tokens, width) after a 2-D max pooling of the queries."""

import copy

import pytest
import torch
import torch.nn.functional as F
from symmetry_checks import randomised
from torch import nn

from intertwiners import align
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

HEADS, WIDTH, DIM = 2, 3, 6


class MaskUnitAttention(nn.Module):
    """transformers' HieraMaskUnitAttention in miniature: one fused projection split into queries, keys and values
    on (batch, heads, windows, tokens, width), the queries max-pooled over a stride axis, attention written out,
    its output projection averaged over the tokens."""

    def __init__(self, windows=2, stride=2):
        super().__init__()
        self.windows, self.stride = windows, stride
        self.inp, self.qkv, self.proj = nn.Linear(4, DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 2)

    def forward(self, x):                                                   # (B, T, 4), T = windows·stride·n
        B, T, _ = x.shape
        h = torch.relu(self.inp(x))
        qkv = self.qkv(h).reshape(B, -1, self.windows, 3, HEADS, WIDTH).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)                                             # (B, heads, windows, T/windows, w)
        q = q.view(B, HEADS, self.windows, self.stride, -1, WIDTH).max(dim=3).values
        a = (q * WIDTH ** -0.5) @ k.transpose(-1, -2)
        out = (a.softmax(dim=-1) @ v).transpose(1, 3).reshape(B, -1, DIM)  # (B, T/stride, DIM)
        return self.proj(out).mean(1)


class PooledQueries(nn.Module):
    """timm's SAM 2 (HieraDet) MultiScaleAttention in miniature: queries 2-D max-pooled on their (H, W) grid,
    ``scaled_dot_product_attention`` on (batch, heads, tokens, width)."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.proj = nn.Linear(4, DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 2)

    def forward(self, x):                                                   # (B, H, W, 4)
        B, H, W, _ = x.shape
        h = torch.relu(self.inp(x))
        q, k, v = self.qkv(h).reshape(B, H * W, 3, HEADS, WIDTH).unbind(2)
        q = F.max_pool2d(q.reshape(B, H, W, DIM).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        q = q.reshape(B, -1, HEADS, WIDTH)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(B, -1, DIM)).mean(1)


def _model_and_input(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "hiera":
        return randomised(MaskUnitAttention()), torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    return randomised(PooledQueries()), torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["hiera", "sam2"])
def test_max_pooled_queries_keep_positive_monomials_within_heads_and_head_permutations(kind):
    model, x = _model_and_input(kind)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert (group.heads, group.dk, group.dv, group.qk, group.vo, group.permute_heads) == \
        (HEADS, WIDTH, WIDTH, "positive_monomial", "general_linear", True)
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.qkv.weight, model.qkv.weight)


@pytest.mark.parametrize("kind", ["hiera", "sam2"])
def test_a_negative_factor_on_a_pooled_query_changes_the_outputs(kind):
    """What the group leaves out: -1 on one query coordinate (and on its key) commutes with the scores but not
    with the maximum."""
    model, x = _model_and_input(kind)
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for part in (0, DIM):   # query coordinate 0 and key coordinate 0 of head 0
            flipped.qkv.weight[part].neg_()
            flipped.qkv.bias[part].neg_()
        assert (flipped(x) - model(x)).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["hiera", "sam2"])
def test_weight_matching_undoes_a_planted_element_of_pooled_attention(kind):
    """A random element (heads permuted, each head's queries/keys permuted and positively scaled within it,
    values mapped) planted in a copy is undone by weight matching."""
    model, x = _model_and_input(kind)
    spec = symmetry_spec(model, x)
    for seed in range(2):
        moved = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(seed)), spec)
        back = align(model, moved, example_input=x, method="weights").model
        assert max(float((p - q).abs().max()) for p, q in zip(model.parameters(), back.parameters())) < 1e-9
