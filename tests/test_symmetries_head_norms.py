"""Queries and keys normalised per head (Qwen3, Gemma 3, OLMo 2, Llama 4, timm's ``qk_norm``): a norm over each
head's width with a gain shared by every head commutes with a permutation of whole heads and, when it is odd
(RMS norm, layer norm without bias), with a sign per head; nothing finer that the attention group can hold (a
scale changes the norm's input relative to eps and is undone by it; a sign under a bias is not). Each row
reduced together (``q.pow(2).mean(-1)``) becomes one coordinate per head, so the attention space keeps its head
permutation with a one-dimensional query/key block per head."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from intertwiners import align
from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry

NORMS = ("rms", "gemma", "rms_module", "layer_norm_no_bias", "layer_norm", "whole")
QK_KIND = {"rms": "sign", "gemma": "sign", "rms_module": "sign", "layer_norm_no_bias": "sign",
           "layer_norm": "identity", "whole": "sign"}


class HeadNorm(nn.Module):
    """A norm over the last axis (each head's width ``d``) with a gain shared by the heads, written as the model
    families write it: ``rms`` (Qwen3's RMSNorm: ``w * x * rsqrt(mean(x²) + eps)``), ``gemma`` (gain ``1 + w``),
    ``rms_module`` (``nn.RMSNorm``), ``layer_norm`` (timm's ``nn.LayerNorm``, with its bias) and
    ``layer_norm_no_bias``."""

    def __init__(self, kind, d):
        super().__init__()
        self.kind = kind
        if kind in ("rms", "gemma"):
            self.weight = nn.Parameter(1 + 0.3 * torch.randn(d))
        elif kind == "rms_module":
            self.norm = nn.RMSNorm(d, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(d, bias=kind == "layer_norm")
            with torch.no_grad():
                self.norm.weight.copy_(1 + 0.3 * torch.randn(d))
                if self.norm.bias is not None:
                    self.norm.bias.copy_(0.3 * torch.randn(d))

    def forward(self, x):
        if self.kind in ("rms", "gemma"):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return y * (self.weight if self.kind == "rms" else 1.0 + self.weight)
        return self.norm(x)


def rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class HeadNormAttention(nn.Module):
    """``o(attention(norm(q(h)), norm(k(h)), v(h)))`` with h = tanh(inp(x)) and the norm per head on (B, N, heads,
    width) (before rotary embeddings, as Qwen3 writes it), ``kv`` key/value heads (grouped-query attention),
    optionally rotary embeddings and attention written out instead of ``scaled_dot_product_attention``;
    ``norm="whole"``: an RMS norm over the whole projection before it is split into heads, with a gain per
    channel (OLMo 2); ``norm=None``: no norm."""

    def __init__(self, norm="rms", heads=4, kv=2, width=4, rotary=True, eager=False, v_norm=None):
        super().__init__()
        self.heads, self.kv, self.width, self.rotary, self.eager = heads, kv, width, rotary, eager
        # values normalised per head too (Gemma 4: an RMS norm without a gain, ``"plain"``)
        self.v_norm = nn.RMSNorm(width, elementwise_affine=False) if v_norm == "plain" else \
            HeadNorm(v_norm, width) if v_norm else nn.Identity()
        self.inp = nn.Linear(4, 8)
        self.q, self.k = nn.Linear(8, heads * width), nn.Linear(8, kv * width)
        self.v, self.o = nn.Linear(8, kv * width), nn.Linear(heads * width, 3)
        self.whole = norm == "whole"
        kind = "rms" if self.whole else norm
        self.q_norm = HeadNorm(kind, heads * width if self.whole else width) if norm else nn.Identity()
        self.k_norm = HeadNorm(kind, kv * width if self.whole else width) if norm else nn.Identity()

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, N, _ = h.shape
        if self.whole:
            q = self.q_norm(self.q(h)).view(B, N, self.heads, self.width).transpose(1, 2)
            k = self.k_norm(self.k(h)).view(B, N, self.kv, self.width).transpose(1, 2)
        else:
            q = self.q_norm(self.q(h).view(B, N, self.heads, self.width)).transpose(1, 2)
            k = self.k_norm(self.k(h).view(B, N, self.kv, self.width)).transpose(1, 2)
        v = self.v_norm(self.v(h).view(B, N, self.kv, self.width)).transpose(1, 2)
        if self.rotary:
            angles = torch.arange(N, dtype=h.dtype)[:, None] / 10.0 ** torch.arange(self.width // 2, dtype=h.dtype)
            cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
            q, k = (t * cos + rotate_half(t) * sin for t in (q, k))
        rep = self.heads // self.kv   # transformers' repeat_kv
        k, v = (t[:, :, None].expand(B, self.kv, rep, N, self.width).reshape(B, self.heads, N, self.width)
                for t in (k, v))
        if self.eager:
            out = torch.softmax(q @ k.transpose(-1, -2) / self.width ** 0.5, -1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(B, N, -1))


X = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def attention_space(spec):
    (name,) = [n for n, s in spec.spaces.items() if s.group.kind == "attention_heads"]
    return name, spec.spaces[name].group


def relerr(a, b, x=X) -> float:
    with torch.no_grad():
        ya = a(x)
        return float((b(x) - ya).abs().max() / ya.abs().max())


def heads_moved(model, spec, space, generator, perm, signs):
    """The model with ``space``'s element of head permutation ``perm`` and query/key signs ``signs`` (values
    and outputs: identity), or with sign blocks forced onto a group that allows none (``check=False``)."""
    group = spec.spaces[space].group
    eye = torch.eye(group.dv, dtype=torch.float64).expand(group.heads, -1, -1)
    M = group.block_matrix(perm, signs.to(torch.float64)[:, None, None], eye.contiguous()).dense()
    return apply_symmetry(model, {space: M}, spec, check=False)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(NORMS), heads=st.sampled_from([(4, 2), (4, 4), (3, 1)]), width=st.sampled_from([2, 4, 6]),
       rotary=st.booleans(), eager=st.booleans(), seed=st.integers(0, 2**16))
def test_heads_normalised_per_head_still_permute(norm, heads, width, rotary, eager, seed):
    """Every such block is one attention space with head permutations and a one-dimensional query/key block
    per head (a sign for an odd norm, nothing under a bias); nothing is pinned and every sampled element
    leaves the outputs unchanged to rounding, as derived (no safety net). A norm over the whole projection
    before the heads split (OLMo 2's) allows signed permutations of all its channels; the rotary embeddings
    then tie each head's channels, without them each head's queries/keys take a signed permutation within
    the head, and the heads still permute."""
    torch.manual_seed(seed)
    model = HeadNormAttention(norm, *heads, width=width, rotary=rotary, eager=eager).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    _, group = attention_space(spec)
    assert group.heads == heads[1] and group.dv == width and group.vo == "general_linear"
    if norm == "whole" and not rotary:
        assert group.permute_heads and group.qk == "signed_permutation" and group.dk == width, group
    elif norm == "layer_norm_no_bias" and heads[1] == 1:   # one key head: a layer norm over all key channels,
        assert group.qk == "identity" and group.dk == 1, group   # which lets permutations through only
    else:
        assert group.permute_heads and group.dk == 1 and group.qk == QK_KIND[norm], group
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12, report


@pytest.mark.parametrize("norm", ["rms", "layer_norm"])
def test_a_head_permutation_moves_every_projection_and_keeps_the_outputs(norm):
    torch.manual_seed(1)
    model = HeadNormAttention(norm).double()
    spec = symmetry_spec(model, X, check=False)
    space, group = attention_space(spec)
    signs = torch.tensor([-1.0, 1.0]) if group.qk == "sign" else torch.ones(2)
    moved = heads_moved(model, spec, space, None, torch.tensor([1, 0]), signs)
    assert relerr(model, moved) <= 1e-13
    for name in ("q", "k", "v", "o"):
        assert not torch.equal(getattr(model, name).weight, getattr(moved, name).weight), name
    # the norms' gains are shared by the heads: they do not move
    assert all(torch.equal(p, q) for (n, p), (_, q) in zip(model.named_parameters(), moved.named_parameters())
               if "norm" in n)


def test_what_a_norm_per_head_excludes_changes_the_outputs():
    """The reasons for the group: without the norm, a scale c on a head's queries and 1/c on its keys is a
    symmetry; with it, the norm undoes the scale on each side but for its eps, which a small scale makes felt
    (the output changes). A sign per head is a
    symmetry of an RMS norm and not of a layer norm with a bias. Queries/keys moved to other heads without
    their values and outputs change the outputs."""
    torch.manual_seed(2)
    scale = torch.ones(16, dtype=torch.float64)
    scale[:4] = 1e-3
    for norm, changes in ((None, False), ("rms", True)):
        torch.manual_seed(2)
        model = HeadNormAttention(norm, kv=4).double()
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for layer, f in ((scaled.q, scale), (scaled.k, 1 / scale)):
                layer.weight.mul_(f[:, None])
                layer.bias.mul_(f)
        assert (relerr(model, scaled) > 1e-3) == changes, norm
    torch.manual_seed(2)
    for norm, changes in (("rms", False), ("layer_norm_no_bias", False), ("layer_norm", True)):
        model = HeadNormAttention(norm, kv=4).double()
        flipped = copy.deepcopy(model)
        with torch.no_grad():
            for layer in (flipped.q, flipped.k):
                layer.weight[:4].neg_()
                layer.bias[:4].neg_()
        assert (relerr(model, flipped) > 1e-3) == changes, norm
    model = HeadNormAttention("rms", kv=4).double()
    swapped = copy.deepcopy(model)
    order = torch.cat([torch.arange(4, 8), torch.arange(0, 4), torch.arange(8, 16)])
    with torch.no_grad():
        for layer in (swapped.q, swapped.k):
            layer.weight.copy_(layer.weight[order])
            layer.bias.copy_(layer.bias[order])
    assert relerr(model, swapped) > 1e-3


def test_the_group_holds_no_scale_where_the_norm_forbids_it():
    """An element with a scale 1e-3 on one head's queries (1e3 on its keys) is not a member of the sign group and
    changes the outputs; the same element on the model without the norm, whose group allows it, does not."""
    torch.manual_seed(3)
    model = HeadNormAttention("rms", kv=4).double()
    spec = symmetry_spec(model, X, check=False)
    space, group = attention_space(spec)
    scales = torch.tensor([1e-3, 1.0, 1.0, 1.0])
    eye = torch.eye(group.dv, dtype=torch.float64).expand(4, -1, -1).contiguous()
    M = group.block_matrix(torch.arange(4), scales[:, None, None].double(), eye).dense()
    assert not group.contains(M)
    assert relerr(model, apply_symmetry(model, {space: M}, spec, check=False)) > 1e-3
    plain = HeadNormAttention(None, kv=4).double()
    spec_plain = symmetry_spec(plain, X, check=False)
    space_plain, group_plain = attention_space(spec_plain)
    assert group_plain.qk == "general_linear" and group_plain.dk == 1   # rotary: one scalar per head
    assert relerr(plain, apply_symmetry(plain, {space_plain: M}, spec_plain, check=False)) <= 1e-13


def test_sign_and_positive_attention_groups():
    """Membership: ±1 blocks in a sign group (a scale 2 is not), positive scalars in a positive group (-1 is
    not); sampled elements are members; their dimensions (0 and 1 per head on the query/key side)."""
    from intertwiners.symmetries.structured import AttentionGroup

    g = torch.Generator().manual_seed(0)
    sign, positive = AttentionGroup(3, 2, 2, qk="sign"), AttentionGroup(3, 2, 2, qk="positive")
    for G in (sign, positive):
        for _ in range(3):
            assert G.contains(G.sample(generator=g))
    eye = torch.eye(2, dtype=torch.float64).expand(3, 2, 2).contiguous()
    perm = torch.tensor([2, 0, 1])
    for c, in_sign, in_positive in ((-1.0, True, False), (2.0, False, True), (1.0, True, True)):
        M = sign.block_matrix(perm, torch.tensor([c, 1.0, 1.0], dtype=torch.float64)[:, None, None] * eye,
                              eye).dense()
        assert sign.contains(M) == in_sign and positive.contains(M) == in_positive, c
    assert sign.dimension(12) == 3 * 4 and positive.dimension(12) == 3 * (1 + 4)


@pytest.mark.parametrize("norm", ["rms", "layer_norm"])
def test_weight_matching_undoes_a_planted_element(norm):
    """A random element (head permutation, signs, value maps) planted in a copy is undone by weight matching."""
    torch.manual_seed(4)
    model = HeadNormAttention(norm).double()
    spec = symmetry_spec(model, X)
    for seed in range(2):
        moved = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(seed)), spec)
        back = align(model, moved, example_input=X, method="weights").model
        assert max(float((p - q).abs().max()) for p, q in zip(model.parameters(), back.parameters())) < 1e-9


class WrittenGroupNorm(nn.Module):
    """Group norm written out on (B, groups, C/groups, H, W): mean and variance over all but the group axis, a
    per-channel gain and bias after, between two convolutions."""

    def __init__(self, groups=3, per=2):
        super().__init__()
        self.groups = groups
        self.a, self.b = nn.Conv2d(2, groups * per, 3, padding=1), nn.Conv2d(groups * per, 2, 1)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(groups * per))
        self.bias = nn.Parameter(torch.randn(groups * per))

    def forward(self, x):
        h = self.a(x)
        B, C, H, W = h.shape
        g = h.view(B, self.groups, C // self.groups, H, W)
        g = (g - g.mean((2, 3, 4), keepdim=True)) / torch.sqrt(g.var((2, 3, 4), keepdim=True) + 1e-5)
        h = g.view(B, C, H, W) * self.gain[:, None, None] + self.bias[:, None, None]
        return self.b(torch.relu(h))


def test_a_reduction_over_part_of_the_channel_axes_keeps_whole_rows_together():
    """A group norm written out reduces over each group's channels: the groups become one coordinate each and
    permute as wholes (with the gain and bias); its statistics allow no scale. Moving one channel to another
    group changes the outputs."""
    torch.manual_seed(5)
    model = WrittenGroupNorm().double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned, spec.pinned
    sizes = sorted((s.size, s.kind) for s in spec.spaces.values())
    assert (3, "permutation") in sizes, sizes
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    swapped = copy.deepcopy(model)
    order = torch.tensor([0, 2, 1, 3, 4, 5])   # channel 1 (group 0) and channel 2 (group 1) exchanged
    with torch.no_grad():
        swapped.a.weight.copy_(model.a.weight[order])
        swapped.a.bias.copy_(model.a.bias[order])
        swapped.gain.copy_(model.gain[order])
        swapped.bias.copy_(model.bias[order])
        swapped.b.weight.copy_(model.b.weight[:, order])
    assert relerr(model, swapped, x) > 1e-3


def test_a_function_undefined_on_part_of_the_line_keeps_permutations():
    """``log`` of a positive hidden value (a softmax over tokens): no group can be derived from its values on the
    whole line, but a function of each element alone commutes with permutations (the engine's fallback; the
    public ``intertwiner_group(torch.log)`` still refuses). A scale of the channels changes the outputs."""
    from intertwiners import intertwiner_group

    class LogSoftmaxTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.log(torch.softmax(self.a(x), dim=1)))

    with pytest.raises(ValueError, match="not finite"):
        intertwiner_group(torch.log)
    torch.manual_seed(6)
    model = LogSoftmaxTokens().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned and [s.kind for s in spec.spaces.values()] == ["permutation"], spec
    assert verify_symmetry(model, X, spec=spec, trials=3).ok
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.a.weight.mul_(2.0)
        scaled.a.bias.mul_(2.0)
        scaled.b.weight.div_(2.0)
    assert relerr(model, scaled) > 1e-3


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "olmo2"])
def test_transformers_queries_and_keys_normalised_per_head(family):
    """Qwen3 and Gemma 3 (RMS norm per head, gain w or 1 + w) and OLMo 2 (RMS norm over the whole projection,
    then heads): every attention block permutes its heads with a sign per head on the queries/keys, nothing is
    pinned, outputs unchanged (their norms run in float32 inside)."""
    import replicas

    model, ids = replicas.hf_family(family, dtype=torch.float64)
    spec = symmetry_spec(model, (ids,), check=family == "qwen3")   # the safety check once: it pins nothing
    assert not spec.pinned, spec.pinned
    groups = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert len(groups) == 2 and all(g.permute_heads and g.qk == "sign" and g.dk == 1 for g in groups), groups
    report = verify_symmetry(model, (ids,), spec=spec, trials=1)
    assert report.ok and report.max_rel <= 1e-5, report
    moved = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(0)), spec)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, moved.model.layers[0].self_attn.q_proj.weight)
    if family == "qwen3":
        back = align(model, moved, example_input=ids, method="weights").model
        assert max(float((p - r).detach().abs().max()) for p, r in zip(model.parameters(), back.parameters())) < 1e-6


@pytest.mark.parametrize("norm, kv", [("whole", 2), ("rms", 1)])
def test_a_gain_over_every_key_channel_moves_with_the_heads_and_not_with_their_signs(norm, kv):
    """A norm's gain that spans all query/key channels (over the whole projection, OLMo 2; over the width of a
    single key head) is a per-channel gain: the head permutation moves it, a head's sign does not (the norm is
    odd). Applied as derived, with every head's sign flipped: the outputs are unchanged."""
    torch.manual_seed(7)
    model = HeadNormAttention(norm, kv=kv).double()
    spec = symmetry_spec(model, X, check=False)
    space, group = attention_space(spec)
    assert group.qk == "sign" and group.dk == 1 and group.permute_heads
    perm = torch.arange(kv).flip(0)
    moved = heads_moved(model, spec, space, None, perm, -torch.ones(kv))
    assert relerr(model, moved) <= 1e-13
    assert torch.equal(model.q.weight, -moved.q.weight) == (kv == 1)
    for name in ("q_norm", "k_norm"):
        w, w2 = getattr(model, name).weight, getattr(moved, name).weight
        if norm == "whole":   # blocks of the gain exchanged with their heads, no sign
            assert torch.equal(w2, w.view(kv if name == "k_norm" else 4, -1).flip(0).view(-1)) or name == "q_norm"
            assert not torch.equal(w2, w) and bool((w2 > 0).all())
        else:
            assert torch.equal(w2, w)


class RelativeBiasAttention(nn.Module):
    """Attention with a learned relative position bias per head (Swin, BEiT): a table (positions, heads) read by a
    fixed index buffer, (heads, N, N) added to the scores (written out) or passed as the mask of
    ``scaled_dot_product_attention``; ``shared``: two blocks read one table (T5)."""

    def __init__(self, heads=3, width=2, tokens=5, eager=False, shared=False):
        super().__init__()
        self.heads, self.width, self.eager, self.shared = heads, width, eager, shared
        dim = heads * width
        self.inp, self.out = nn.Linear(4, dim), nn.Linear(dim, 3)
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(2)])
        self.proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(2 * tokens - 1, heads)) for _ in range(2)])
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).reshape(-1))

    def block(self, h, i):
        B, N, C = h.shape
        q, k, v = self.qkv[i](h).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        table = self.tables[0 if self.shared else i]
        bias = table[self.index].view(N, N, self.heads).permute(2, 0, 1)        # (heads, N, N)
        if self.eager:
            out = torch.softmax(q @ k.transpose(-1, -2) / self.width ** 0.5 + bias, -1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        return h + self.proj[i](out.transpose(1, 2).reshape(B, N, C))

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.block(self.block(h, 0), 1))


@pytest.mark.parametrize("eager", [False, True])
def test_a_relative_position_bias_per_head_moves_with_the_heads(eager):
    """The bias table of each block is a per-head parameter: its head axis is permuted with the block's heads (a
    per-head coordinate of the attention group), exact as derived; moving the heads without the table changes
    the outputs. A table shared by two blocks (T5) keeps their heads in place."""
    torch.manual_seed(8)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    model = RelativeBiasAttention(eager=eager).double()
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned, spec.pinned
    groups = {n: s.group for n, s in spec.spaces.items() if s.group.kind == "attention_heads"}
    assert len(groups) == 2 and all(g.permute_heads and g.per_head == 1 for g in groups.values()), groups
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12, report
    name, group = next(iter(groups.items()))
    perm = torch.tensor([2, 0, 1])
    eye = torch.eye(group.dk, dtype=torch.float64).expand(3, -1, -1).contiguous()
    M = group.block_matrix(perm, eye, torch.eye(group.dv, dtype=torch.float64).expand(3, -1, -1).contiguous())
    moved = apply_symmetry(model, {name: M.dense()}, spec)
    assert relerr(model, moved, x) <= 1e-13
    changed = [i for i in range(2) if not torch.equal(model.tables[i], moved.tables[i])]
    assert len(changed) == 1
    i = changed[0]
    assert torch.equal(moved.tables[i][:, perm], model.tables[i])   # head g's column is now at perm[g]
    stale = copy.deepcopy(moved)
    with torch.no_grad():
        stale.tables[i].copy_(model.tables[i])
    assert relerr(model, stale, x) > 1e-3
    shared = RelativeBiasAttention(eager=eager, shared=True).double()
    spec = symmetry_spec(shared, x, check=False)
    heads = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert heads and not any(g.permute_heads for g in heads) and any("shared" in r for r in spec.pinned.values())
    assert verify_symmetry(shared, x, spec=spec, trials=2).ok


def test_the_per_head_coordinates_of_an_attention_group_are_only_permuted():
    from intertwiners.symmetries.structured import AttentionGroup

    G = AttentionGroup(3, 2, 2, per_head=1)
    assert G.size == 15 and G.dimension(15) == AttentionGroup(3, 2, 2).dimension(12)
    M = G.sample(generator=torch.Generator().manual_seed(0))
    assert G.contains(M)
    scaled = M.clone()
    scaled[12:, 12:] *= 2.0    # the per-head coordinates scaled: not a member
    assert not G.contains(scaled)


class GroupedRelativeBias(nn.Module):
    """Grouped-query attention (4 query heads, 2 key/value heads) with a bias table of one column per query head
    as the mask: the key/value groups move two query heads at a time, which a per-query-head table cannot
    follow as a coordinate of the block."""

    def __init__(self, width=2, tokens=5):
        super().__init__()
        self.width = width
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.q, self.k, self.v = nn.Linear(8, 4 * width), nn.Linear(8, 2 * width), nn.Linear(8, 2 * width)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, 4))
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).reshape(-1))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, N, _ = h.shape
        q = self.q(h).view(B, N, 4, self.width).transpose(1, 2)
        k, v = (f(h).view(B, N, 2, 1, self.width).expand(B, N, 2, 2, self.width).reshape(B, N, 4, self.width)
                .transpose(1, 2) for f in (self.k, self.v))
        bias = self.table[self.index].view(N, N, 4).permute(2, 0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        return self.out(out.transpose(1, 2).reshape(B, N, -1))


def test_a_bias_per_query_head_keeps_grouped_heads_in_place():
    """With grouped-query attention the bias table stays fixed and so do the heads (their per-head maps remain):
    exact as derived. Permuting the key/value groups (with their query heads) without the table changes the
    outputs, which is why."""
    torch.manual_seed(9)
    model = GroupedRelativeBias().double()
    spec = symmetry_spec(model, X, check=False)
    (group,) = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert not group.permute_heads and group.per_head == 0 and group.heads == 2
    assert any("per-head parameter on its heads stays in place" in r for r in spec.pinned.values()), spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12, report
    swapped = copy.deepcopy(model)
    q_rows = torch.cat([torch.arange(4, 8), torch.arange(0, 4)])   # query heads (0, 1) <-> (2, 3)
    kv_rows = torch.tensor([2, 3, 0, 1])
    with torch.no_grad():
        for layer, rows in ((swapped.q, q_rows), (swapped.k, kv_rows), (swapped.v, kv_rows)):
            layer.weight.copy_(layer.weight[rows])
            layer.bias.copy_(layer.bias[rows])
        swapped.out.weight.copy_(model.out.weight[:, q_rows])
    assert relerr(model, swapped) > 1e-3


@pytest.mark.parametrize("v_norm, vo", [("plain", "sign"), ("rms", "sign"), ("layer_norm", "identity")])
def test_values_normalised_per_head_keep_head_permutations(v_norm, vo):
    """Values normalised over each head's width (Gemma 4 normalises queries, keys and values): one value
    coordinate per head, the heads still permute together with their outputs' columns, each head with a sign
    when the norm is odd and nothing under a bias; exact as derived. Excluded, and needed: a positive scale of
    a head's values (the norm undoes it, the output projection would not), a sign under the layer norm's bias."""
    torch.manual_seed(3)
    model = HeadNormAttention("rms", kv=2, v_norm=v_norm).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    space, group = attention_space(spec)
    assert group.permute_heads and (group.dk, group.dv) == (1, 1) and (group.qk, group.vo) == ("sign", vo), group
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12, report
    ones = torch.ones(2, 1, 1, dtype=torch.float64)
    swap = group.block_matrix(torch.tensor([1, 0]), ones, -ones if vo == "sign" else ones).dense()
    moved = apply_symmetry(model, {space: swap}, spec)   # the two key/value heads swapped, values' signs flipped
    assert relerr(model, moved) <= 1e-13
    for name in ("q", "k", "v", "o"):
        assert not torch.equal(getattr(model, name).weight, getattr(moved, name).weight), name
    for factor in (2.0, -1.0):   # a scale (never allowed) and a sign (not under a bias) on the first value head
        if factor == -1.0 and vo == "sign":
            continue
        vo_blocks = torch.ones(2, 1, 1, dtype=torch.float64)
        vo_blocks[0] = factor
        M = group.block_matrix(torch.arange(2), torch.ones(2, 1, 1, dtype=torch.float64), vo_blocks).dense()
        assert relerr(model, apply_symmetry(model, {space: M}, spec, check=False)) > 1e-3, factor
