"""Capture leaves the model as it found it: a forward that stores tensors on its modules while it is traced
(timm's LeViT caches its attention biases, gathered from a parameter, in a dict in eval mode) must not keep
the trace's fake tensors there."""

import copy
import math

import pytest
import torch
from symmetry_checks import one_exact_space
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

X = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class CachedBias(nn.Module):
    """A per-token hidden bias gathered from a table by an index buffer, cached in a dict in eval mode and cleared by
    ``train()`` (LeViT's ``attention_bias_cache``), plus an attribute the forward sets on itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.table = nn.Parameter(torch.randn(3, 6))
        self.register_buffer("idx", torch.tensor([2, 0, 1, 0]))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode=True):
        super().train(mode)
        self.cache = {}
        return self

    def hidden_bias(self, device):
        if self.training:
            return self.table[self.idx]
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.table[self.idx]
        return self.cache[key]

    def forward(self, x):                                 # (B, 4 tokens, 4)
        h = torch.relu(self.a(x) + self.hidden_bias(x.device))
        self.last_hidden = h
        return self.b(h)


def test_capture_leaves_no_fake_tensor_cached_on_the_model():
    torch.manual_seed(0)
    model = CachedBias().double().eval()
    with torch.no_grad():
        before = model(X)
    model.cache.clear()
    del model.last_hidden
    spec = symmetry_spec(model, X)
    assert model.cache == {} and not hasattr(model, "last_hidden")
    with torch.no_grad():
        assert torch.equal(model(X), before)   # a fake tensor left in the cache raises here
    copy.deepcopy(model)                       # and here (the cache is copied with the model)
    (space,) = spec.spaces.values()
    assert space.size == 6 and not spec.pinned
    report = verify_symmetry(model, X, spec=symmetry_spec(model, X, check=False), trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec).eval()
    assert not torch.equal(new.table, model.table)
    torch.testing.assert_close(new(X), before, rtol=1e-12, atol=1e-12)


def test_a_cache_filled_before_the_capture_is_kept():
    model = CachedBias().double().eval()
    with torch.no_grad():
        model(X)
    cached = model.cache["cpu"]
    symmetry_spec(model, X, check=False)
    assert model.cache == {"cpu": cached} and model.cache["cpu"] is cached


class NormedQueriesKeys(nn.Module):
    """timm LeViT's AttentionDownsample: queries and keys from separate linear layers each followed by a batch
    norm (so they keep signed permutations, not the per-head maps of attention), keys and values split per head
    from one projection, and the attention output read by an activation (so the values are pinned)."""

    def __init__(self, heads=2, dk=3, dv=2):
        super().__init__()
        self.h, self.dk, self.dv = heads, dk, dv
        self.q, self.kv = nn.Linear(4, heads * dk, bias=False), nn.Linear(4, heads * (dk + dv), bias=False)
        self.qn, self.kvn = nn.BatchNorm1d(heads * dk), nn.BatchNorm1d(heads * (dk + dv))
        self.proj = nn.Linear(heads * dv, 3)

    def forward(self, x):                                              # (B, N, 4)
        B, N, _ = x.shape
        kv = self.kvn(self.kv(x).flatten(0, 1)).view(B, N, self.h, -1)
        k, v = kv.split([self.dk, self.dv], dim=3)
        q = self.qn(self.q(x).flatten(0, 1)).view(B, N, self.h, self.dk).permute(0, 2, 1, 3)
        attn = (q @ k.permute(0, 2, 3, 1)).softmax(dim=-1)             # (B, H, N, N)
        out = (attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(B, N, -1)
        return self.proj(nn.functional.hardswish(out))


def test_queries_keys_that_keep_a_smaller_group_move_by_signed_permutations_within_their_heads():
    """The batch norms let signed permutations through, the activation on the output permutations: one attention
    space whose heads permute, each head's queries/keys by a signed permutation within the head and its
    values by a permutation; exact as derived. A rotation within one head's queries/keys (an element of
    plain attention's group) has no weights to realise it through the batch norms: refused."""
    torch.manual_seed(0)
    model = NormedQueriesKeys().double()
    with torch.no_grad():
        for bn in (model.qn, model.kvn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    (name, space), = [(n, s) for n, s in spec.spaces.items() if s.kind == "attention_heads"]
    group = space.group
    assert (group.heads, group.dk, group.dv, group.qk, group.vo, group.permute_heads) == \
        (2, 3, 2, "signed_permutation", "permutation", True)
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.q.weight, model.q.weight) and not torch.equal(new.kv.weight, model.kv.weight)
    c, s = math.cos(0.7), math.sin(0.7)
    rotation = torch.eye(3, dtype=torch.float64)
    rotation[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    qk = torch.stack([rotation, torch.eye(3, dtype=torch.float64)])
    eye = torch.eye(2, dtype=torch.float64).expand(2, 2, 2).contiguous()
    with pytest.raises(ValueError, match="only monomial elements"):
        apply_symmetry(model, {name: group.block_matrix(torch.arange(2), qk, eye).dense()}, spec, check=False)


class FusedAffine(nn.Module):
    """timm ResMLP's ``Affine``: ``torch.addcmul(beta, alpha, x)`` (= beta + alpha * x), before and after the
    activation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.alpha, self.beta = nn.Parameter(torch.randn(1, 1, 6)), nn.Parameter(torch.randn(1, 1, 6))
        self.gamma, self.delta = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.relu(torch.addcmul(self.beta, self.alpha, self.a(x), value=0.5))
        return self.b(torch.addcmul(self.delta, h, self.gamma, value=2.0))


def test_addcmul_is_read_as_the_product_and_sum_it_fuses():
    torch.manual_seed(0)
    model = FusedAffine().double()
    _, new = one_exact_space(model, X, 6, trials=3)
    assert not torch.equal(new.alpha, model.alpha) and not torch.equal(new.gamma, model.gamma)


class ChannelShuffle(nn.Module):
    """torchvision ShuffleNet-V2: two branches concatenated, channels shuffled (view, transpose(1, 2), view),
    then split in halves with ``chunk`` (one half passes on, the other feeds the next branch)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.c, self.d = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):                                               # (B, T, 4)
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=-1)
        B, T, C = h.shape
        h = h.view(B, T, 2, C // 2).transpose(2, 3).reshape(B, T, C)    # shuffled
        u, v = h.chunk(2, dim=-1)
        return self.c(u) + self.d(torch.relu(v))


def test_chunk_after_a_channel_shuffle_follows_the_shuffled_channels():
    torch.manual_seed(0)
    model = ChannelShuffle().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned and sum(s.size for s in spec.spaces.values()) == 8
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.a.weight, model.a.weight) and not torch.equal(new.b.weight, model.b.weight)


def test_a_model_run_before_is_read_through_its_cache_and_copied():
    """A forward with autograd on leaves a non-leaf tensor in the cache (which ``copy.deepcopy`` refuses) and a
    trace that met it would read the cached values as a constant: the spec reads the table behind the cache,
    ``apply_symmetry`` copies the model, the copy computes the same function and the original keeps its cache."""
    model = CachedBias().double().eval()
    before = model(X).detach()
    cached = model.cache["cpu"]
    assert cached.grad_fn is not None
    spec = symmetry_spec(model, X)
    (space,) = spec.spaces.values()
    assert space.size == 6 and not spec.pinned
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert model.cache == {"cpu": cached} and model.cache["cpu"] is cached
    assert not torch.equal(new.table, model.table) and new.cache == {}
    with torch.no_grad():
        torch.testing.assert_close(new(X), before, rtol=1e-12, atol=1e-12)
    one_exact_space(model, X, 6)            # as derived, verified


def test_an_inplace_transform_drops_what_the_model_cached_from_the_old_parameters():
    model = CachedBias().double().eval()
    spec = symmetry_spec(model, X)
    element = random_symmetry(spec, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(X)                   # fills the cache from the table as it is now
    stale = model.cache["cpu"]
    apply_symmetry(model, element, spec, inplace=True)
    assert model.cache == {} and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=1e-12, atol=1e-12)
        model.cache["cpu"] = stale          # had the cache stayed, the output would change
        assert (model(X) - before).abs().max() > 1e-3


class TransposedHidden(nn.Module):
    """A linear layer written on the transposed hidden features, with ``.T`` and ``.mT``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):                                 # (B, 4)
        h = torch.relu(self.a(x)).T                       # (6, B)
        return (self.b.weight @ h).mT + self.b.bias


def test_transposes_written_as_T_and_mT_follow_the_channels():
    torch.manual_seed(0)
    model = TransposedHidden().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    _, new = one_exact_space(model, x, 6)
    assert not torch.equal(new.a.weight, model.a.weight)
    torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)


class TensorSplitGate(nn.Module):
    """Mamba's mixer splits its projection into the hidden and gate halves (and a state projection into its
    parts) with ``torch.tensor_split`` at index lists; ``sections`` splits the same way."""

    def __init__(self, indices=True):
        super().__init__()
        self.up, self.down = nn.Linear(4, 12), nn.Linear(6, 3)
        self.indices = indices

    def forward(self, x):                                 # (B, 4)
        z = self.up(x)
        h, g = torch.tensor_split(z, [6] if self.indices else 2, dim=-1)
        return self.down(torch.relu(h) * torch.sigmoid(g))


def test_tensor_split_at_indices_and_in_sections_follows_the_channels():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    for indices in (True, False):
        model = TensorSplitGate(indices).double()
        spec = symmetry_spec(model, x, check=False)
        assert not spec.pinned and spec.spaces, spec.pinned
        report = verify_symmetry(model, x, spec=spec, trials=2)
        assert report.ok and report.max_rel <= 1e-12
        new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
        assert not torch.equal(new.up.weight, model.up.weight)
        torch.testing.assert_close(new(x), model(x), rtol=1e-12, atol=1e-12)


class SequenceSplit(nn.Module):
    """Mamba's chunked scan splits the sequence axis with ``tensor_split`` (the parts keep every channel)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):                                 # (B, T, 4)
        first, rest = torch.tensor_split(torch.relu(self.up(x)), [2], dim=1)
        return self.down(torch.cat([rest, 2 * first], dim=1))


def test_tensor_split_along_the_sequence_keeps_the_channels():
    torch.manual_seed(0)
    one_exact_space(SequenceSplit().double(), torch.randn(2, 5, 4, dtype=torch.float64), 6)
