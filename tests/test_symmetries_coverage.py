"""Issue 18's families of operations on hand-written replica blocks: each derived space is checked as derived
(no safety net) against the outputs, and each operation that would break a symmetry pins with its reason."""

import copy

import pytest
import torch
import torch.nn.functional as F
from symmetry_checks import Logits, one_exact_space, randomised
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
    _, new = one_exact_space(model, X, 6)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()) if p.shape[0] == 6)


def test_shifting_or_tiling_the_channel_axis_pins_it():
    # (tiling the channel axis is followed -- each copy carries the same channels -- but the slice across the
    # copies then mixes the copy index with the channels)
    for op, why in [(lambda h: torch.roll(h, 1, dims=-1), "shifts a channel axis"),
                    (lambda h: h.repeat(1, 1, 2)[..., 3:9], "indexes an axis that mixes channels")]:
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


class TalkingHeads(nn.Module):
    """timm CaiT's talking-heads attention: the scores and the attention weights are mixed across heads by two
    linear maps over the head axis (``proj_l`` before the softmax, ``proj_w`` after it). ``talking=False``: the
    same block without them (plain written-out attention)."""

    def __init__(self, dim=6, heads=3, talking=True):
        super().__init__()
        self.heads, self.talking = heads, talking
        self.inp, self.qkv, self.proj = nn.Linear(4, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, 3)
        self.proj_l, self.proj_w = nn.Linear(heads, heads), nn.Linear(heads, heads)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, N, C = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * 0.5) @ k.transpose(-2, -1)
        if self.talking:
            attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        if self.talking:
            attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_talking_heads_keep_heads_in_place_and_per_head_maps():
    torch.manual_seed(0)
    model = TalkingHeads().double()
    spec = symmetry_spec(model, X, check=False)
    attention = {s.group.dk and "qk" or "vo": s.group for s in spec.spaces.values()
                 if s.group.kind == "attention_heads"}
    # queries/keys: per-head A_g, values/outputs: per-head B_g; no head permutation (the heads are mixed)
    assert set(attention) == {"qk", "vo"} and not any(g.permute_heads for g in attention.values())
    assert attention["qk"].dv == 0 and attention["vo"].dk == 0
    # between proj_l and proj_w the heads are channels of their own: permuted (the softmax allows no more)
    assert spec.spaces["proj_l"].group.kind == "permutation"
    assert sum("talking heads" in r for r in spec.pinned.values()) == 2, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    news = [apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(s)), spec) for s in range(3)]
    assert all(torch.allclose(new(X), model(X), rtol=0, atol=1e-12) for new in news)
    assert all(not torch.equal(new.qkv.weight, model.qkv.weight) for new in news)
    assert any(not torch.equal(new.proj_l.bias, model.proj_l.bias) for new in news)   # a permutation of 3 heads


def test_talking_heads_pins_are_needed_and_plain_attention_permutes_heads():
    torch.manual_seed(0)
    model = TalkingHeads().double()
    # what a free head axis would claim: proj_l's columns times A^-1 with nothing acting on the scores
    wrong = TalkingHeads().double()
    wrong.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong.proj_l.weight.copy_(model.proj_l.weight @ torch.linalg.inv(torch.randn(3, 3, dtype=torch.float64)))
    assert (wrong(X) - model(X)).abs().max() > 1e-4
    # without the maps across heads the same block permutes its heads
    plain = TalkingHeads(talking=False).double()
    spec = symmetry_spec(plain, X, check=False)
    (group,) = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert group.permute_heads and group.heads == 3 and group.dk == group.dv == 2 and not spec.pinned
    assert verify_symmetry(plain, X, spec=spec, trials=2).ok


class SplitValues(nn.Module):
    """Differential attention as transformers' DiffLlama writes it (eager, grouped-query): one set of scores
    ``q @ k^T`` read by two ``p @ v`` whose values are halves of v along its key/value heads, each repeated to
    every key/value head (``v.chunk(2, dim=1)``, ``.repeat(1, 2, 1, 1)``) and then to every query head
    (``repeat_kv``): values the rules do not follow head by head."""

    def __init__(self, dim=8, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.width = heads, kv_heads, dim // heads
        kv = kv_heads * self.width
        self.inp, self.q, self.k, self.v = (nn.Linear(4, dim), nn.Linear(dim, dim), nn.Linear(dim, kv),
                                            nn.Linear(dim, kv))
        self.out = nn.Linear(2 * dim, 3)

    def repeat_kv(self, t):
        B, H, N, d = t.shape
        return t[:, :, None].expand(B, H, self.heads // H, N, d).reshape(B, self.heads, N, d)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, N, C = h.shape
        q, k, v = (f(h).reshape(B, N, -1, self.width).transpose(1, 2) for f in (self.q, self.k, self.v))
        p = (q @ self.repeat_kv(k).transpose(-2, -1)).softmax(-1)
        v1, v2 = (self.repeat_kv(part.repeat(1, 2, 1, 1)) for part in v.chunk(2, dim=1))
        o = torch.cat([p @ v1, p @ v2], dim=-1)
        return self.out(o.transpose(1, 2).reshape(B, N, 2 * C))


def test_scores_whose_values_are_not_followed_keep_queries_and_keys_per_head():
    """The p @ v that cannot be followed used to drop its scores' queries and keys from every attention block:
    tied to each other but recorded nowhere, they read as one general-linear space across heads, and an element
    of it changed the output (here by 12%, DiffLlama's by 2%). They are now an attention block without values:
    per-head maps A_g, heads in place."""
    torch.manual_seed(0)
    model = SplitValues().double()
    spec = symmetry_spec(model, X, check=False)
    (group,) = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert group.heads == 2 and group.dv == 0 and not group.permute_heads   # one map per key/value head
    assert not any(s.group.kind == "general_linear" and any(t.tensor == "q.weight" for t in spec.slots(n))
                   for n, s in spec.spaces.items())
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    # heads in place: swapping the query heads (0, 1) with (2, 3) and the key/value heads 0 and 1 with them
    # permutes the scores across heads, which the values (not followed) do not undo
    wrong = copy.deepcopy(model)
    qrows, krows = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]), torch.tensor([2, 3, 0, 1])
    with torch.no_grad():
        for layer, rows in ((wrong.q, qrows), (wrong.k, krows)):
            layer.weight.copy_(layer.weight[rows])
            layer.bias.copy_(layer.bias[rows])
    assert (wrong(X) - model(X)).abs().max() > 1e-4


def test_transformers_diffllama_eager_attention_is_exact():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DiffLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=64, use_cache=False)
    model = transformers.DiffLlamaForCausalLM(cfg).double().eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    spec = symmetry_spec(model, ids, check=False)
    report = verify_symmetry(model, ids, spec=spec, trials=2, modes=("eval",))
    assert report.ok, report


class MaskedTokens(nn.Module):
    """BART's classification head reads the hidden state at each end-of-sequence token, ``h[eos_mask]`` with a
    (batch, tokens) boolean mask: a size that depends on the input's values."""

    def __init__(self, dim=6):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = (nn.Linear(4, dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim),
                                                  nn.Linear(dim, 3))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.norm(self.inp(x))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        picked = h[x[..., 0] > 0]                       # (selected tokens, dim)
        return self.out(picked.view(-1, picked.shape[-1])).sum(0)


def test_tokens_picked_by_a_boolean_mask_keep_their_channels():
    """The mask reads the batch and token axes (both), never the channels: the stream stays a space, and the
    element keeps the outputs on another input with another number of selected tokens."""
    torch.manual_seed(0)
    model = MaskedTokens().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    assert {s.group.kind for s in spec.spaces.values()} == {"permutation", "positive_scaled_permutation"}
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    other = torch.randn(3, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert int((other[..., 0] > 0).sum()) != int((X[..., 0] > 0).sum())
    assert torch.allclose(new(other), model(other), rtol=0, atol=1e-12)
    assert not torch.equal(new.fc1.weight, model.fc1.weight)
    # the stream's group is the permutations (the layer norm): a scaling of it changes the outputs
    D = torch.diag(torch.linspace(0.5, 2.0, 6, dtype=torch.float64))
    stream = next(n for n, s in spec.spaces.items() if s.group.kind == "permutation")
    bad = apply_symmetry(model, {stream: D}, spec, check=False)
    assert (bad(X) - model(X)).abs().max() > 1e-4


class ComplexRotary(nn.Module):
    """Llama 4's attention: rotary embeddings written as a complex product (``view_as_complex`` of the
    (width/2, 2) pairs times ``exp(i·t·θ)``, ``view_as_real``, flattened back); ``norm``: then a weightless RMS
    norm over each head's width (Llama 4's ``qk_norm``)."""

    def __init__(self, dim=8, heads=2, norm=False):
        super().__init__()
        self.heads, self.width, self.norm = heads, dim // heads, norm
        self.inp, self.q, self.k, self.v, self.o = (nn.Linear(4, dim), nn.Linear(dim, dim), nn.Linear(dim, dim),
                                                    nn.Linear(dim, dim), nn.Linear(dim, 3))
        self.theta = 1.0 / (10.0 ** torch.arange(self.width // 2, dtype=torch.float64))   # a constant

    def rotate(self, t):
        angles = torch.arange(t.shape[1], dtype=t.dtype)[:, None] * self.theta           # (tokens, width/2)
        freqs = torch.polar(torch.ones_like(angles), angles)
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2))
        t = torch.view_as_real(z * freqs[None, :, None, :]).flatten(3)
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) if self.norm else t

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, N, C = h.shape
        q, k = (self.rotate(f(h).view(B, N, self.heads, -1)).transpose(1, 2) for f in (self.q, self.k))
        v = self.v(h).view(B, N, self.heads, -1).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class InterleavedRotary(nn.Module):
    """timm's EVA / ViT-RoPE attention: fused qkv, rotary embeddings on interleaved pairs (``rot(x) =
    stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)``, ``x * cos + rot(x) * sin`` with cos/sin
    repeated per pair), applied to the patch tokens only: the class token's queries/keys are concatenated back
    unrotated."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.width = heads, dim // heads
        self.inp, self.qkv, self.o = nn.Linear(4, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, 3)

    def rotate(self, t):                                       # (B, H, N, width), the first token left alone
        n = t.shape[2] - 1
        angles = torch.arange(n, dtype=t.dtype)[:, None] / 10.0 ** torch.arange(self.width // 2, dtype=t.dtype)
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        x = t[:, :, 1:]
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
        return torch.cat([t[:, :, :1], x * cos + rot * sin], 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, N, C = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v)
        return self.o(out.transpose(1, 2).reshape(B, N, C))


def test_rotary_embeddings_on_interleaved_pairs_keep_one_scalar_per_head():
    """The pairs stacked along a new axis and reshaped back into the head width are the head's channels (the
    stack is a concatenation along a new channel axis, which the reshape merges): each head's channels are tied
    by the rotation, the heads permute with one scalar per head, nothing is pinned. A map that scales one channel
    of a pair apart (undone on the keys) does not commute with the rotation."""
    torch.manual_seed(0)
    model = InterleavedRotary().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert group.heads == 2 and group.dk == 1 and group.qk == "general_linear" and group.permute_heads
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    D = torch.ones(24, dtype=torch.float64)
    D[0], D[8] = 2.0, 0.5   # the first query channel and the first key channel
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.qkv.weight.mul_(D[:, None])
        wrong.qkv.bias.mul_(D)
    assert (wrong(X) - model(X)).abs().max() > 1e-4


def test_rotary_embeddings_as_complex_products_keep_one_scalar_per_head():
    torch.manual_seed(0)
    model = ComplexRotary().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert group.heads == 2 and group.dk == 1 and group.dv == 4 and group.permute_heads
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    # a map that treats the two parts of a number apart (the real part of the first scaled, undone on the keys'
    # real part) does not commute with the rotation
    D = torch.ones(8, dtype=torch.float64)
    D[0] = 2.0
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        for layer, f in ((wrong.q, D), (wrong.k, 1 / D)):
            layer.weight.mul_(f[:, None])
            layer.bias.mul_(f)
    assert (wrong(X) - model(X)).abs().max() > 1e-4


def test_queries_and_keys_normalised_after_complex_rotary_keep_head_permutations_and_signs():
    """Llama 4's weightless RMS norm per head after the complex rotary embeddings: each head stays one coordinate
    (the rotation tied it), the norm lets a sign through and no other scale; heads permute with their values
    and outputs. (tests/test_symmetries_head_norms.py states the norms per head in general.)"""
    torch.manual_seed(0)
    model = ComplexRotary(norm=True).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    (group,) = [s.group for s in spec.spaces.values() if s.group.kind == "attention_heads"]
    assert group.dk == 1 and group.qk == "sign" and group.dv == 4 and group.permute_heads
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12


class StackedExperts(nn.Module):
    """Llama 4's routed experts: every token sent to every expert, weighted by its routing score (untransformed,
    as Llama 4's after its ``topk``), and run through all experts at once with ``bmm`` of stacked weights
    (E, in, out)."""

    def __init__(self, dim=6, hidden=5, experts=3):
        super().__init__()
        self.inp, self.out = nn.Linear(4, dim), nn.Linear(dim, 3)
        self.norm = nn.LayerNorm(dim)
        self.experts = experts
        self.gate_up = nn.Parameter(torch.randn(experts, dim, 2 * hidden))
        self.down = nn.Parameter(torch.randn(experts, hidden, dim))

    def forward(self, x):
        h = self.inp(x).reshape(-1, self.inp.out_features)                 # (tokens, dim)
        E = self.experts
        scores = torch.sigmoid(x.reshape(-1, x.shape[-1])[:, :E])          # (tokens, experts), read from the input
        routed = self.norm(h).repeat(E, 1) * scores.t().reshape(-1, 1)
        gate, up = torch.bmm(routed.view(E, -1, h.shape[1]), self.gate_up).chunk(2, dim=-1)
        moved = torch.bmm(up * F.silu(gate), self.down).sum(0)
        return self.out(h + moved).view(*x.shape[:-1], 3)


def test_experts_multiplied_with_stacked_weights_move_alike():
    torch.manual_seed(0)
    model = StackedExperts().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    slots = {(s.tensor, s.axis) for s in spec.all_slots}
    assert {("gate_up", 1), ("gate_up", 2), ("down", 1), ("down", 2)} <= slots
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    # the stream's element must reach every expert's slice: left out of one expert, the output changes
    stream = next(n for n, sp in spec.spaces.items() if any(t.tensor == "inp.weight" for t in spec.slots(n)))
    wrong = apply_symmetry(model, {stream: random_symmetry(spec, torch.Generator().manual_seed(2))[stream]}, spec)
    assert torch.allclose(wrong(X), model(X), rtol=0, atol=1e-12)
    with torch.no_grad():
        wrong.gate_up[1] = model.gate_up[1]
        wrong.down[1] = model.down[1]
    assert (wrong(X) - model(X)).abs().max() > 1e-4


def test_transformers_llama4_text_moves_its_stream_experts_and_values():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, vocab_size=64, num_local_experts=4, num_experts_per_tok=1,
                                        use_cache=False, interleave_moe_layer_step=1)
    model = transformers.Llama4ForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    spec = symmetry_spec(model, ids, check=False)
    assert "model.embed_tokens" in spec.spaces          # the stream (21% of the parameters moved before)
    assert sum(s.kind == "attention_heads" for s in spec.spaces.values()) == 2
    report = verify_symmetry(model, ids, spec=spec, trials=1, modes=("eval",))
    assert report.ok, report


class RMSNormBlock(nn.Module):
    """PyTorch's own ``nn.RMSNorm`` (``aten.rms_norm``) on a residual stream, and a clamp between two 0-d
    buffers (timm's Gemma 4 vision encoder: bounds that start at -inf and +inf until a checkpoint sets them)."""

    def __init__(self, dim=6, bounds=(-float("inf"), float("inf"))):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = (nn.Linear(4, dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim),
                                                  nn.Linear(dim, 3))
        self.norm, self.final = nn.RMSNorm(dim), nn.RMSNorm(dim, elementwise_affine=False)
        self.register_buffer("lo", torch.tensor(bounds[0]))
        self.register_buffer("hi", torch.tensor(bounds[1]))

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(F.gelu(self.fc1(torch.clamp(self.norm(h), self.lo, self.hi))))
        return self.out(self.final(h))


@pytest.mark.parametrize("bounds", [(-float("inf"), float("inf")), (-0.3, 0.4)])
def test_rms_norm_and_clamp_between_buffers(bounds):
    """The stream through ``nn.RMSNorm`` and a clamp between buffers: signed permutations through the norm,
    the clamp allows permutations only (whatever the bounds hold); infinite buffers are accepted, NaN ones not."""
    torch.manual_seed(0)
    model = RMSNormBlock(bounds=bounds).double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    stream = next(n for n, sp in spec.spaces.items() if any(t.tensor == "inp.weight" for t in spec.slots(n)))
    assert spec.spaces[stream].kind == "permutation"
    report = verify_symmetry(model, X, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.norm.weight, model.norm.weight)     # the gain moves with the stream
    # a sign flip of one stream channel: allowed by the norms, not by a clamp with finite, unequal bounds
    S = torch.eye(6, dtype=torch.float64)
    S[0, 0] = -1.0
    flipped = apply_symmetry(model, {stream: S}, spec, check=False)
    change = float((flipped(X) - model(X)).abs().max())
    assert (change > 1e-4) == (bounds[0] != -float("inf"))
    with torch.no_grad():
        model.lo.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN values in buffer 'lo'"):
        symmetry_spec(model, X)


class ClassTokenJoin(nn.Module):
    """CaiT's class token: a parameter updated by its own layer, then concatenated with the patch tokens."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, x):
        h = self.a(x)
        c = self.cls.expand(x.shape[0], 1, 6) + self.c(h.mean(1, keepdim=True))
        return self.b(torch.relu(torch.cat((c, h), dim=1)))


def test_concatenating_tokens_of_two_values_ties_their_channels():
    torch.manual_seed(0)
    model = ClassTokenJoin().double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = dict(apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec).named_parameters())
    assert all(not torch.equal(p, new[n]) for n, p in model.named_parameters() if n != "b.bias"), spec
    # the tie is needed: a's rows (and b's columns) permuted without the class token's channels change outputs
    moved = ClassTokenJoin().double()
    moved.load_state_dict(model.state_dict())
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    with torch.no_grad():
        moved.a.weight.copy_(model.a.weight[perm])
        moved.a.bias.copy_(model.a.bias[perm])
        moved.b.weight.copy_(model.b.weight[:, perm])
    assert (moved(X) - model(X)).abs().max() > 1e-4


def test_xglm_bmm_attention_and_sinusoidal_positions():
    """transformers' XGLM: attention written with bmm on (batch·heads, tokens, width), scores floored with
    torch.max(·, finfo.min), sinusoidal positions looked up with index_select from a buffer and added to the
    stream. Every block is an attention space with its heads permuted, nothing is pinned, outputs unchanged."""
    transformers = pytest.importorskip("transformers")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # XGLM builds its mask fill in the default dtype
    try:
        torch.manual_seed(0)
        model = transformers.XGLMForCausalLM(transformers.XGLMConfig(
            vocab_size=50, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, max_position_embeddings=32,
            use_cache=False)).eval()
        ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
        spec = symmetry_spec(model, (ids,), check=False)
        assert not spec.pinned, spec.pinned
        groups = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
        assert len(groups) == 2 and all(g.permute_heads and g.heads == 4 for g in groups)
        new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(2)), spec)
        before, after = model(ids).logits, new(ids).logits
        assert (after - before).abs().max() <= 1e-12 * before.abs().max()
        old, moved = dict(model.named_parameters()), dict(new.named_parameters())
        changed = sum(int((old[k] != moved[k]).sum()) for k in old) / sum(p.numel() for p in old.values())
        assert changed > 0.97
        assert not torch.equal(new.model.embed_positions.weights, model.model.embed_positions.weights)
    finally:
        torch.set_default_dtype(default)


class FoldedHeads(nn.Module):
    """Attention written with the heads folded into the batch axis (BLOOM/XGLM style): scores from
    ``baddbmm(bias, q, k^T)`` with an ALiBi bias (a slope per head, ``alibi=True``) or one bias shared by the heads,
    weights times values with ``bmm``; token embeddings looked up as ``table[ids]`` and the last token picked
    with ``h[arange(B), last]``."""

    def __init__(self, d=6, heads=3, vocab=7, alibi=True):
        super().__init__()
        self.h, self.alibi = heads, alibi
        self.table = nn.Parameter(torch.randn(vocab, d))
        self.qkv, self.o, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1.0, heads + 1))

    def forward(self, ids):
        x = self.table[ids]                                            # (B, T, d)
        B, T, d = x.shape
        q, k, v = (t.reshape(B, T, self.h, -1).transpose(1, 2).reshape(B * self.h, T, -1)
                   for t in self.qkv(x).chunk(3, -1))
        pos = torch.arange(T, dtype=x.dtype)
        slopes = self.slopes if self.alibi else torch.ones_like(self.slopes)
        bias = (slopes[:, None] * pos).repeat(B, 1)[:, None, :]        # (B·H, 1, T)
        p = torch.baddbmm(bias if self.alibi else bias[:1], q, k.transpose(1, 2), beta=1.0, alpha=0.5).softmax(-1)
        a = torch.bmm(p, v).reshape(B, self.h, T, -1).transpose(1, 2).reshape(B, T, d)
        y = x + self.o(a)
        return self.out(y[torch.arange(B), ids.argmax(1)])


def test_folded_heads_bmm_baddbmm_alibi_and_index_lookups():
    ids = torch.tensor([[1, 4, 2, 6], [3, 0, 5, 5]])
    for alibi in (True, False):
        torch.manual_seed(0)
        model = FoldedHeads(alibi=alibi).double()
        spec = symmetry_spec(model, (ids,), check=False)
        (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
        # ALiBi's slopes differ between heads: they stay in place, each keeps its maps; a shared bias permutes
        assert group.permute_heads != alibi and group.heads == 3 and group.dk == group.dv == 2
        assert any("ALiBi" in r for r in spec.pinned.values()) if alibi else not spec.pinned, spec.pinned
        report = verify_symmetry(model, (ids,), spec=spec, trials=2)
        assert report.ok and report.max_rel <= 1e-12
        new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
        assert not torch.equal(new.table, model.table) and not torch.equal(new.qkv.weight, model.qkv.weight)
    # the ALiBi pin is needed: swapping two heads (q, k, v rows and o's columns) changes the outputs
    torch.manual_seed(0)
    model = FoldedHeads(alibi=True).double()
    swapped = FoldedHeads(alibi=True).double()
    swapped.load_state_dict(model.state_dict())
    heads = torch.tensor([2, 3, 0, 1, 4, 5])
    with torch.no_grad():
        swapped.qkv.weight.copy_(model.qkv.weight[torch.cat([heads, heads + 6, heads + 12])])
        swapped.qkv.bias.copy_(model.qkv.bias[torch.cat([heads, heads + 6, heads + 12])])
        swapped.o.weight.copy_(model.o.weight[:, heads])
    assert (swapped(ids) - model(ids)).abs().max() > 1e-6


class ConcatBias(nn.Module):
    """Layers whose bias is built in the forward: BEiT's qkv bias ``cat(q_bias, zero k bias, v_bias)`` (the zero
    part a buffer, or ``zeros_like``), a bias made of two parameters side by side in front of a linear map with
    no activation (a general-linear space that must not span the two parts), and a bias that is a function of a
    parameter (untransformed: its layer's channels are pinned)."""

    def __init__(self, zeros="buffer", d=6, heads=3):
        super().__init__()
        self.h, self.zeros = heads, zeros
        self.inp, self.proj, self.out = nn.Linear(4, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)
        self.w1, self.w2 = nn.Parameter(torch.randn(4, d)), nn.Linear(4, d)
        self.b1, self.b2 = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.w3, self.b3, self.w4 = nn.Parameter(torch.randn(5, d)), nn.Parameter(torch.randn(5)), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, C = h.shape
        k_bias = self.k_bias if self.zeros == "buffer" else torch.zeros_like(self.v_bias)
        qkv = F.linear(h, self.qkv.weight, torch.cat((self.q_bias, k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        h = h + self.w2(F.linear(h, self.w1, torch.cat((self.b1, self.b2))))   # no activation: GL spaces
        h = torch.tanh(h)
        return self.out(h) + self.w4(torch.tanh(F.linear(h, self.w3, 2 * self.b3)))   # a bias not a parameter


def test_concatenated_biases_move_part_by_part():
    for zeros in ("buffer", "zeros_like"):
        torch.manual_seed(0)
        model = ConcatBias(zeros).double()
        spec = symmetry_spec(model, X, check=False)
        (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
        assert group.permute_heads and group.heads == 3
        assert sorted(s.size for s in spec.spaces.values() if s.kind == "general_linear") == [2, 2]
        (why,) = spec.pinned.values()   # w3's rows, with 2·b3
        assert "bias that is not a parameter" in why and spec.pinned_sizes[next(iter(spec.pinned))] == 5
        report = verify_symmetry(model, X, spec=spec, trials=2)
        assert report.ok and report.max_rel <= 1e-12
        new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
        assert not torch.equal(new.q_bias, model.q_bias) and not torch.equal(new.v_bias, model.v_bias)
        assert not torch.equal(new.b1, model.b1) and not torch.equal(new.b2, model.b2)
        assert torch.equal(new.b3, model.b3) and not torch.equal(new.w3, model.w3)   # its columns still move


class RoutedExperts(nn.Module):
    """A mixture-of-experts MLP on a residual stream: a router picks ``k`` of ``E`` experts per token; each expert
    is a gated MLP. ``implementation`` follows transformers' experts: ``"batched_mm"`` gathers each token's experts'
    weights (``w[ids]``) and multiplies with ``bmm``; ``"eager"`` loops over the experts the batch is routed to
    (data-dependent control flow, which torch.export refuses). ``switchable``: the model offers transformers'
    ``get/set_experts_implementation``. Beside the routed experts, a shared expert scaled per token by a one-unit
    gate ``sigmoid(shared_gate(h))`` (Qwen2-MoE)."""

    def __init__(self, d=4, hidden=3, experts=3, k=2, implementation="batched_mm", switchable=True):
        super().__init__()
        self.k, self.experts, self.implementation, self.switchable = k, experts, implementation, switchable
        self.inp, self.router, self.out = nn.Linear(4, d), nn.Linear(d, experts, bias=False), nn.Linear(d, 2)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * hidden, d))
        self.down = nn.Parameter(torch.randn(experts, d, hidden))
        self.shared_up, self.shared_down, self.shared_gate = nn.Linear(d, 3), nn.Linear(3, d), nn.Linear(d, 1)

    def get_experts_implementation(self):
        if not self.switchable:
            raise AttributeError("not switchable")
        return {"": self.implementation}

    def set_experts_implementation(self, impl):
        self.implementation = impl[""]

    def _expert(self, x, gate_up, down):
        gate, up = (gate_up @ x).chunk(2, dim=-2)
        return down @ (F.silu(gate) * up)

    def forward(self, x):
        h = self.inp(x)
        B, T, d = h.shape
        flat = h.reshape(-1, d)
        weights, ids = torch.topk(self.router(flat).softmax(-1), self.k, dim=-1)    # (N, k)
        if self.implementation == "batched_mm":
            picked = flat.repeat_interleave(self.k, dim=0)[:, :, None]             # (N·k, d, 1)
            gate, up = torch.bmm(self.gate_up[ids.reshape(-1)], picked).chunk(2, dim=1)
            y = torch.bmm(self.down[ids.reshape(-1)], F.silu(gate) * up)[:, :, 0]    # (N·k, d)
            moe = (y * weights.reshape(-1, 1)).view(-1, self.k, d).sum(1)
        else:
            moe = torch.zeros_like(flat)
            for e in (ids == torch.arange(self.experts)[:, None, None]).any(-1).any(-1).nonzero():
                rows, slot = torch.where(ids == e[0])
                moe = moe.index_add(0, rows, weights[rows, slot, None] * self._expert(
                    flat[rows, :, None], self.gate_up[e[0]], self.down[e[0]])[:, :, 0])
        moe = moe + torch.sigmoid(self.shared_gate(flat)) * self.shared_down(torch.relu(self.shared_up(flat)))
        return self.out(h + moe.view(B, T, d))


def test_routed_experts_move_with_one_transform_for_every_expert():
    """Gathered experts' weights times the routed tokens: the stream and the experts' hidden units are spaces
    (one transform shared by all experts, rows of gate_up and columns of down); the router's experts stay in
    place (a softmax over them, then top-k), and so does the shared expert's one-unit gate. Captured from the
    eager loop too, by switching to the gather for the export only; a loop without that twin is refused with a
    ValueError that names the cause."""
    for implementation in ("batched_mm", "eager"):
        torch.manual_seed(0)
        model = RoutedExperts(implementation=implementation).double()
        spec = symmetry_spec(model, X, check=False)
        assert model.implementation == implementation                  # switched back after the export
        assert sorted(s.size for s in spec.spaces.values()) == [3, 3, 4], spec
        assert sorted(r.split(": ")[-1] for r in spec.pinned.values()) == [
            "a one-unit gate broadcast across the channels it scales", "a softmax across channels"], spec.pinned
        report = verify_symmetry(model, X, spec=spec, trials=2)      # on the model as it is (the loop: eager)
        assert report.ok and report.max_rel <= 1e-12
        new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
        for name in ("gate_up", "down", "router.weight", "inp.weight", "shared_up.weight", "shared_gate.weight"):
            assert not torch.equal(dict(new.named_parameters())[name], dict(model.named_parameters())[name])
    # the router's pin is needed: its rows permuted alone route tokens to other experts
    torch.manual_seed(0)
    model = RoutedExperts().double()
    moved = RoutedExperts().double()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved.router.weight.copy_(model.router.weight[[1, 2, 0]])
    assert (moved(X) - model(X)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="data-dependent control flow.*batched_mm.*register_rule"):
        symmetry_spec(RoutedExperts(implementation="eager", switchable=False).double(), X)


class RelativeBiasSDPA(nn.Module):
    """T5-style attention: a per-head bias looked up from a table of relative-position buckets (an embedding with
    one column per head) is the mask of ``scaled_dot_product_attention``."""

    def __init__(self, d=6, heads=3, buckets=5):
        super().__init__()
        self.h = heads
        self.inp, self.qkv, self.o, self.out = nn.Linear(4, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.rel = nn.Embedding(buckets, heads)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, d = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(T)
        bias = self.rel((pos[None, :] - pos[:, None]).clamp(-2, 2) + 2).permute(2, 0, 1)[None]   # (1, H, T, T)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(h + self.o(a.transpose(1, 2).reshape(B, T, d)))


def test_a_per_head_mask_from_a_table_moves_the_table_with_the_heads():
    """The table's columns (one per head) are permuted with the heads: one attention space with a per-head
    coordinate, exact as derived. (Read by several blocks, as T5's is, the table keeps their heads in place:
    tests/test_symmetries_head_norms.py.)"""
    torch.manual_seed(0)
    model = RelativeBiasSDPA().double()
    spec = symmetry_spec(model, X, check=False)
    (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert group.permute_heads and group.per_head == 1 and group.qk == group.vo == "general_linear"
    assert group.heads == 3 and not spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.qkv.weight, model.qkv.weight)
    # the table must move: swapping two heads (q, k, v rows and o's columns) without it changes outputs
    swapped = RelativeBiasSDPA().double()
    swapped.load_state_dict(model.state_dict())
    heads = torch.tensor([2, 3, 0, 1, 4, 5])
    rows = torch.cat([heads, heads + 6, heads + 12])
    with torch.no_grad():
        swapped.qkv.weight.copy_(model.qkv.weight[rows])
        swapped.qkv.bias.copy_(model.qkv.bias[rows])
        swapped.o.weight.copy_(model.o.weight[:, heads])
    assert (swapped(X) - model(X)).abs().max() > 1e-6


class AlibiAttention(RelativeBiasSDPA):
    """ALiBi: a bias per head from a buffer of slopes, as the mask of ``scaled_dot_product_attention`` or, written
    out (MPT), added to ``q @ k^T`` before a causal ``masked_fill`` and the softmax."""

    def __init__(self, written=False):
        super().__init__()
        self.written = written
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125]))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, d = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(T, dtype=h.dtype)
        alibi = self.slopes[:, None, None] * (pos[None, :] - pos[:, None])[None]            # (H, T, T)
        if self.written:
            s = (q @ k.transpose(-2, -1)) * 0.5 + alibi
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), torch.finfo(s.dtype).min)
            a = s.softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi)
        return self.out(h + self.o(a.transpose(1, 2).reshape(B, T, d)))


@pytest.mark.parametrize("written", [False, True])
def test_mask_that_differs_between_heads_keeps_them_in_place(written):
    """An untransformed bias with one slice per head (ALiBi from a buffer of slopes) would not follow a head
    permutation: the heads stay in place, the per-head maps remain."""
    torch.manual_seed(0)
    model = AlibiAttention(written).double()
    spec = symmetry_spec(model, X, check=False)
    (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    assert not group.permute_heads and group.heads == 3 and group.qk == group.vo == "general_linear"
    why = "adds an untransformed tensor that varies" if written else "differs between heads"
    assert any(why in r for r in spec.pinned.values()) and len(spec.pinned) == 1, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    swapped = copy.deepcopy(model)
    heads = torch.tensor([2, 3, 0, 1, 4, 5])
    rows = torch.cat([heads, heads + 6, heads + 12])
    with torch.no_grad():
        swapped.qkv.weight.copy_(model.qkv.weight[rows])
        swapped.qkv.bias.copy_(model.qkv.bias[rows])
        swapped.o.weight.copy_(model.o.weight[:, heads])
    assert (swapped(X) - model(X)).abs().max() > 1e-6


class PositionsAdded(nn.Module):
    """Whisper's encoder: position embeddings looked up as a (T, C) value and added to the (B, T, C) stream."""

    def __init__(self):
        super().__init__()
        self.a, self.pos, self.b = nn.Linear(4, 6), nn.Embedding(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) + self.pos(torch.arange(x.shape[1]))))


def test_a_value_with_fewer_dimensions_is_broadcast_before_the_residual_tie():
    torch.manual_seed(0)
    model = PositionsAdded().double()
    _, new = one_exact_space(model, X, 6)
    assert not torch.equal(new.pos.weight, model.pos.weight) and not torch.equal(new.a.weight, model.a.weight)


class BroadcastToken(nn.Module):
    """A class token of shape (d,) broadcast over the batch, then given its token axis (torchvision's MViT:
    ``class_token.expand(B, -1).unsqueeze(1)``), or a (1, d) token squeezed after the broadcast."""

    def __init__(self, squeeze: bool):
        super().__init__()
        self.squeeze = squeeze
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 6) if squeeze else torch.randn(6))

    def forward(self, x):
        B = x.shape[0]
        c = self.cls.expand(B, 1, -1).squeeze(1).unsqueeze(1) if self.squeeze else self.cls.expand(B, -1).unsqueeze(1)
        return self.b(torch.relu(torch.cat([c, self.a(x)], dim=1)))


@pytest.mark.parametrize("squeeze", [False, True])
def test_a_class_token_viewed_after_its_broadcast_moves_with_its_channels(squeeze):
    # the view reads the parameter's own elements: with a batch of two, the expanded shape holds twice as many
    torch.manual_seed(0)
    model = BroadcastToken(squeeze).double()
    _, new = one_exact_space(model, X, 6)
    assert not torch.equal(new.cls, model.cls)


class FixedWeights(nn.Module):
    """Values mixed over tokens by untransformed weights (a buffer): the same for every head, or one matrix per
    head; with ``matmul`` on (B, H, T, w) or ``bmm`` with the heads folded into the batch axis."""

    def __init__(self, per_head, folded, d=6, heads=3, tokens=3):
        super().__init__()
        self.h, self.folded = heads, folded
        self.inp, self.v, self.o, self.out = nn.Linear(4, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)
        self.register_buffer("mix", torch.randn(heads if per_head else 1, tokens, tokens).softmax(-1))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        B, T, d = h.shape
        v = self.v(h).reshape(B, T, self.h, -1).transpose(1, 2)                     # (B, H, T, w)
        if self.folded:
            mix = self.mix.expand(B, self.h, T, T).reshape(B * self.h, T, T)
            a = torch.bmm(mix, v.reshape(B * self.h, T, -1)).reshape(B, self.h, T, -1)
        else:
            a = self.mix @ v
        return self.out(h + self.o(a.transpose(1, 2).reshape(B, T, d)))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("folded", [False, True])
def test_untransformed_weights_times_values(per_head, folded):
    """Shared weights commute with any transform of the values (a general-linear space); weights that differ
    between heads (or may: only shapes are read) leave per-head maps only (an attention block without
    queries/keys, heads in place)."""
    torch.manual_seed(0)
    model = FixedWeights(per_head, folded).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    groups = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
    if per_head or folded:   # folded, shared weights arrive expanded to (B·H, T, T): per-head maps (a subgroup)
        assert len(groups) == 1 and not groups[0].permute_heads and groups[0].dk == 0 and groups[0].dv == 2
    else:
        assert not groups and sorted((s.kind, s.size) for s in spec.spaces.values()) == [
            ("general_linear", 6), ("signed_permutation", 6)]
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12


class ReadsAWeightAside(nn.Module):
    """A weight used by its layer and also read, untransformed, by another computation whose rule records no use
    of it: ``(b.weight ** 3).sum()`` added to the output (``aside=False``: the plain MLP)."""

    def __init__(self, aside=True):
        super().__init__()
        self.aside = aside
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        out = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return out + (self.b.weight ** 3).sum() if self.aside else out


def test_a_parameter_read_where_no_rule_records_its_use_is_not_moved():
    """Without the aside both ReLU spaces are derived and the weight moves; with it, the weight's untransformed
    read is recorded and nothing may move it: the spec as derived (check=False) verifies, pins no space by the
    safety net, and leaves b.weight as it is. Before, both spaces were derived and verify failed."""
    torch.manual_seed(0)
    plain = ReadsAWeightAside(aside=False).double()
    assert sorted(s.size for s in symmetry_spec(plain, X, check=False).spaces.values()) == [5, 6]
    model = ReadsAWeightAside().double()
    model.load_state_dict(plain.state_dict())
    spec = symmetry_spec(model, X, check=False)
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert torch.equal(new.b.weight, model.b.weight)
    torch.testing.assert_close(new(X), model(X), rtol=1e-12, atol=1e-12)


class ReturnsAParameter(nn.Module):
    """An MLP that also returns one of its parameters: the first layer's weight as it is (``weight``),
    transposed (``t``), or the position table added to its hidden value, transposed (``table``)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        self.pos = nn.Parameter(torch.randn(1, 3, 6))

    def forward(self, x):
        out = self.b(torch.relu(self.a(x) + self.pos))
        returned = {"weight": self.a.weight, "t": self.a.weight.t(), "table": self.pos.permute(0, 2, 1)}[self.how]
        return out, returned


@pytest.mark.parametrize("how", ["weight", "t", "table"])
def test_a_parameter_among_the_outputs_is_read_untransformed(how):
    """The hidden space would move the returned parameter: the spec as derived (check=False) must not hold it
    (before, it held the 6 ReLU channels and verify failed), and moving them does change that output."""
    torch.manual_seed(0)
    model = ReturnsAParameter(how).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.spaces and spec.pinned, spec.pinned
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok
    moved = copy.deepcopy(model)
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    with torch.no_grad():
        moved.a.weight.copy_(model.a.weight[perm])
        moved.a.bias.copy_(model.a.bias[perm])
        moved.pos.copy_(model.pos[..., perm])
        moved.b.weight.copy_(model.b.weight[:, perm])
    torch.testing.assert_close(moved(X)[0], model(X)[0], rtol=1e-12, atol=1e-12)   # the first output keeps
    assert not torch.equal(moved(X)[1], model(X)[1])                                # the returned one does not


class GlobalQuery(nn.Module):
    """GC ViT's global query in miniature: layer-normalised global features are the queries of several attention
    blocks of a stage (no query projection), each block with its own keys/values and output projection."""

    def __init__(self, blocks: int = 2, heads: int = 2, width: int = 3):
        super().__init__()
        self.h, c = heads, heads * width
        self.embed, self.glob, self.norm = nn.Linear(4, c), nn.Linear(4, c), nn.LayerNorm(c)
        self.kv = nn.ModuleList(nn.Linear(c, 2 * c) for _ in range(blocks))
        self.proj = nn.ModuleList(nn.Linear(c, c) for _ in range(blocks))
        self.head = nn.Linear(c, 3)

    def forward(self, x):                                         # (B, T, 4)
        B, T, _ = x.shape
        h = self.embed(x)
        q = self.norm(self.glob(x)).reshape(B, T, self.h, -1).transpose(1, 2)
        for kv, proj in zip(self.kv, self.proj):
            k, v = kv(h).reshape(B, T, 2, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
            a = (q @ k.transpose(-2, -1)).softmax(-1)
            h = h + proj((a @ v).transpose(1, 2).reshape(B, T, -1))
        return self.head(h)


@pytest.mark.parametrize("blocks", [1, 3])
def test_a_global_query_read_by_several_blocks_keeps_per_head_spaces(blocks):
    """The queries are a layer norm's output: permutations only. Read by one block, that block's group holds them:
    a permutation within each head, the heads permuting. Read by several, no one block's group can (each block
    would permute the shared heads its own way): permutations within each head, every block's keys following
    them, its values/outputs keeping per-head maps."""
    torch.manual_seed(0)
    model = GlobalQuery(blocks).double()
    spec = symmetry_spec(model, X, check=False)
    assert not spec.pinned, spec.pinned
    kinds = sorted((s.size, s.kind) for s in spec.spaces.values())
    if blocks == 1:
        (group,) = [s.group for s in spec.spaces.values() if s.kind == "attention_heads"]
        assert (group.size, group.qk, group.permute_heads) == (12, "permutation", True), group
    else:
        assert kinds.count((3, "permutation")) == 2 and [k for k in kinds if k[1] == "attention_heads"] \
            == [(6, "attention_heads")] * blocks, kinds
    report = verify_symmetry(model, X, spec=spec, trials=2)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert all(not torch.equal(new.kv[i].weight, model.kv[i].weight) for i in range(blocks))
    # a permutation that swaps a query channel with one of the other head (keys moved alike) changes the output
    perm = torch.tensor([3, 1, 2, 0, 4, 5])
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        for p in (swapped.glob.weight, swapped.glob.bias, swapped.norm.weight, swapped.norm.bias):
            p.copy_(p[perm])
        for kv in swapped.kv:
            kv.weight[:6], kv.bias[:6] = kv.weight[:6][perm], kv.bias[:6][perm]
        assert (swapped(X) - model(X)).abs().max() > 1e-6
        within = torch.tensor([1, 0, 2, 3, 4, 5])   # the same within a head: unchanged
        for m in (swapped,):
            m.load_state_dict(model.state_dict())
            for p in (m.glob.weight, m.glob.bias, m.norm.weight, m.norm.bias):
                p.copy_(p[within])
            for kv in m.kv:
                kv.weight[:6], kv.bias[:6] = kv.weight[:6][within], kv.bias[:6][within]
        assert (swapped(X) - model(X)).abs().max() < 1e-12


class TokenReduction(nn.Module):
    """Two linear layers around a reduction over the token axis (Hiera's max-pooled queries: ``amax``)."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Linear(4, 6), nn.Linear(6, 2), op

    def forward(self, x):                                   # (B, T, 4) -> (B, 2)
        r = getattr(self.a(x), self.op.removesuffix("+indices"))(1)
        if self.op.endswith("+indices"):                    # max(x, dim): the indices read too
            return self.b(r.values + r.indices.to(r.values.dtype))
        return self.b(r if isinstance(r, torch.Tensor) else r[0])


@pytest.mark.parametrize("op, kind, breaker", [
    ("mean", "general_linear", None), ("sum", "general_linear", None),
    ("amax", "positive_scaled_permutation", torch.diag(torch.tensor([-1.0, 1, 1, 1, 1, 1]))),
    ("var", "permutation", torch.diag(torch.tensor([2.0, 1, 1, 1, 1, 1]))),
    ("std", "positive_scaled_permutation", torch.diag(torch.tensor([-1.0, 1, 1, 1, 1, 1]))),
    ("max", "positive_scaled_permutation", torch.diag(torch.tensor([-1.0, 1, 1, 1, 1, 1]))),
    ("min", "positive_scaled_permutation", torch.diag(torch.tensor([-1.0, 1, 1, 1, 1, 1]))),
    ("max+indices", "permutation", torch.diag(torch.tensor([2.0, 1, 1, 1, 1, 1])))])
def test_a_reduction_over_tokens_keeps_exactly_the_maps_it_commutes_with(op, kind, breaker):
    """mean/sum commute with every linear map of the channels; max, min (``amax``, ``max(x, dim)``) and standard
    deviation with positive scalings and permutations only; a variance with permutations only (var(d·x) =
    d²·var(x)), and so do the indices of ``max(x, dim)`` where they are read (a scale moves the values, not the
    positions). Each derived space is exact as derived, and the next larger element (a sign through max, min or
    std, a scale through var or the indices) changes the output, so the restriction is needed."""
    torch.manual_seed(0)
    model = TokenReduction(op).double()
    spec = symmetry_spec(model, X, check=False)
    (name,) = spec.spaces
    assert spec.spaces[name].kind == kind and not spec.pinned
    assert verify_symmetry(model, X, spec=spec, trials=3).ok
    if breaker is not None:
        moved = apply_symmetry(model, {name: breaker.double()}, spec, check=False)
        assert (moved(X) - model(X)).abs().max() > 1e-3


class LatentArray(nn.Module):
    """Perceiver's latents: one parameter (latents, channels) expanded over the batch, read through a layer norm
    as queries and added whole to the block's output as its residual."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(3, 4))
        self.norm, self.q, self.inp = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.o, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):                                           # (B, T, 4) -> (B, 2)
        lat = self.latents.expand(x.shape[0], -1, -1)
        h = self.o(torch.relu(self.q(self.norm(lat)) + self.inp(x).mean(1, keepdim=True)))
        return self.out(h + lat).mean(1)


def test_a_parameter_read_whole_and_along_an_axis_is_pinned():
    """The latents move with their rows' space as the norm's input and with the block output's space as the
    residual: two motions of one parameter that cannot be matched, so both spaces are pinned (before, each moved
    the parameter its own way and the output changed). The ReLU's space between q/inp and o stays free."""
    torch.manual_seed(0)
    model = LatentArray().double()
    spec = symmetry_spec(model, X, check=False)
    assert verify_symmetry(model, X, spec=spec, trials=2).ok
    assert any("used more than once, whole and along an axis" in r for r in spec.pinned.values()), spec.pinned
    assert [s.kind for s in spec.spaces.values()] == ["positive_scaled_permutation"]


class PatchMerging(nn.Module):
    """Swin's patch merging (timm): 2x2 neighbours gathered into the channel axis by a reshape and a permute that
    puts the neighbour axes *before* the channels, then a layer norm and a linear layer over the merged axis."""

    def __init__(self, dim=3):
        super().__init__()
        self.inp, self.norm, self.reduction = nn.Linear(4, dim), nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2)
        with torch.no_grad():
            self.norm.weight.add_(0.3 * torch.randn(4 * dim))
            self.norm.bias.add_(0.3 * torch.randn(4 * dim))

    def forward(self, x):                                   # (B, H, W, 4)
        h = torch.relu(self.inp(x))
        B, H, W, C = h.shape
        h = h.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(h))


def test_a_layer_norm_over_channels_merged_in_another_order_moves_its_gain_by_position():
    """The merged axis holds the channels in the order (column neighbour, row neighbour, channel), not the order
    the reshape made them: the norm's gain and bias are read position by position. One space, permutations (the
    layer norm), exact as derived; a gain permuted in the reshape's order instead changes the outputs."""
    torch.manual_seed(0)
    model = PatchMerging().double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned, spec.pinned
    (space,) = spec.spaces.values()
    assert space.size == 3 and space.kind == "permutation"
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    perm = torch.tensor([1, 2, 0])
    moved = apply_symmetry(model, {space.name: (perm, torch.ones(3, dtype=torch.float64))}, spec)
    assert not torch.equal(moved.norm.weight, model.norm.weight)
    wrong = copy.deepcopy(moved)
    with torch.no_grad():   # the gain permuted as if the channels were the merged axis' slowest factor
        order = (torch.arange(12).view(3, 4)[torch.argsort(perm)]).reshape(-1)
        wrong.norm.weight.copy_(model.norm.weight[order])
    assert (wrong(x) - model(x)).abs().max() > 1e-4


class HyperConnected(nn.Module):
    """Hyper-connections (DeepSeek V4's mHC): ``n`` residual streams (B, T, n, d), collapsed into a block's input
    by weights per token and stream computed from the streams (``pre``), the block's output spread back over the
    streams (``post``: an outer product) and the streams mixed by an n×n matrix per token (``comb``), with a
    softmax over a learned bias, or without one (a hidden value times the streams)."""

    def __init__(self, comb_softmax: bool, d=6, n=3, hidden=8):
        super().__init__()
        self.n, self.comb_softmax = n, comb_softmax
        self.embed, self.out = nn.Linear(4, d), nn.Linear(d, 3)
        self.fn = nn.Parameter(0.3 * torch.randn((2 + n) * n, n * d))
        self.base = nn.Parameter(0.3 * torch.randn((2 + n) * n))
        self.norm, self.up, self.down = nn.RMSNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head_fn = nn.Parameter(0.3 * torch.randn(n, n * d))

    @staticmethod
    def rms(x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)

    def forward(self, x):
        n, h = self.n, self.embed(x)
        B, T, d = h.shape
        s = h.unsqueeze(2).expand(-1, -1, n, -1).contiguous()                       # (B, T, n, d)
        mix = F.linear(self.rms(s.view(B, T, -1)), self.fn)
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre = torch.sigmoid(pre_w + self.base[:n])
        post = 2 * torch.sigmoid(post_w)
        comb = comb_w.view(B, T, n, n)
        comb = torch.softmax(comb + self.base[2 * n:].view(n, n), -1) if self.comb_softmax else torch.sigmoid(comb)
        y = self.down(torch.relu(self.up(self.norm((pre.unsqueeze(-1) * s).sum(dim=2)))))
        s = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), s)
        pre = torch.sigmoid(F.linear(self.rms(s.flatten(2)), self.head_fn))
        return self.out((pre.unsqueeze(-1) * s).sum(dim=2))


@pytest.mark.parametrize("comb_softmax", [True, False])
def test_hyper_connected_streams_move_and_their_mixing_weights_stay(comb_softmax):
    """The streams' channels keep the residual stream's group (signed permutations: the norms are odd) through
    the collapse, the spread and the mixing: each mixing weight is the same for every channel of a stream, so its
    units stay untransformed and nothing else is pinned for it. Pinned as it must be: permuting the last collapse
    weights' units changes the outputs."""
    torch.manual_seed(0)
    model = HyperConnected(comb_softmax).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    stream = spec.spaces["embed"]
    assert stream.kind == "signed_permutation" and stream.size == 6
    assert spec.spaces[":relu"].kind == "positive_scaled_permutation"
    assert any("a gate broadcast across the channels it scales" in r for r in spec.pinned.values()), spec.pinned
    if not comb_softmax:
        assert any("weights that mix values along an axis without channels" in r for r in spec.pinned.values())
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    moved = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(moved.fn, model.fn) and not torch.equal(moved.embed.weight, model.embed.weight)
    wrong = copy.deepcopy(model)
    with torch.no_grad():   # the last collapse weights' units permuted (the streams differ by then)
        wrong.head_fn.copy_(model.head_fn[[1, 2, 0]])
        assert (wrong(x) - model(x)).abs().max() > 1e-4


class OneHotPositions(nn.Module):
    """Gemma 4's vision position embeddings: a table (2, positions, d) per coordinate axis read through one-hot
    vectors, ``one_hot(ids) @ table`` (B, 2, T, d), summed over the axes and added to the residual stream."""

    def __init__(self, d=6, positions=5):
        super().__init__()
        self.positions = positions
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 3)
        self.table = nn.Parameter(torch.randn(2, positions, d))

    def forward(self, x):                                        # (B, T, 4)
        B, T, _ = x.shape
        ids = torch.stack([torch.arange(T) % self.positions, torch.arange(T) // 2], 0).expand(B, 2, T)
        one_hot = F.one_hot(ids, self.positions).to(self.table)  # (B, 2, T, positions)
        pos = (one_hot @ self.table).sum(dim=1)                  # (B, T, d)
        return self.out(torch.relu(self.inp(x) + pos))


def test_a_table_read_through_one_hot_vectors_moves_with_the_stream():
    """Untransformed coefficients times a parameter's rows, slice by slice, is an embedding: the table's last axis
    carries the channels it is added to. Exact as derived; the table moved with another permutation than the
    stream's changes the outputs."""
    torch.manual_seed(0)
    model = OneHotPositions().double()
    spec, new = one_exact_space(model, X, 6)
    assert not torch.equal(new.table, model.table)
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.table.copy_(new.table[..., [1, 0, 2, 3, 4, 5]])
    assert (wrong(X) - model(X)).abs().max() > 1e-4


class Upsampling(nn.Module):
    """A decoder's upsampling (U-Nets, SAM's mask decoder, timm's LowFormer): a transposed convolution between two
    convolutions, its weight (in, out, k, k) -- rows on its second axis, columns on its first."""

    def __init__(self, conv_module: bool = True):
        super().__init__()
        self.conv_module = conv_module
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(5, 2, 1)
        self.up = nn.ConvTranspose2d(4, 5, 2, stride=2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.conv_module:
            u = self.up(h)
        else:   # the generic convolution with its transposed flag (what some exports produce)
            u = torch.ops.aten.convolution(h, self.up.weight, self.up.bias, [2, 2], [0, 0], [1, 1], True, [0, 0], 1)
        return self.b(torch.relu(u))


@pytest.mark.parametrize("conv_module", [True, False])
def test_a_transposed_convolution_moves_its_weight_rows_on_the_second_axis(conv_module):
    torch.manual_seed(0)
    model = Upsampling(conv_module).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    spec = symmetry_spec(model, x, check=False)
    assert not spec.pinned, spec.pinned
    assert sorted(s.size for s in spec.spaces.values()) == [4, 5]
    report = verify_symmetry(model, x, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.up.weight, model.up.weight) and not torch.equal(new.up.bias, model.up.bias)


def test_a_grouped_transposed_convolution_is_pinned():
    torch.manual_seed(0)
    model = Upsampling().double()
    model.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2).double()
    model.b = nn.Conv2d(6, 2, 1).double()
    spec = symmetry_spec(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), check=False)
    assert any("a transposed convolution that is grouped" in r for r in spec.pinned.values()), spec.pinned


class ShiftedGainNorm(nn.Module):
    """A residual stream through norms whose gain is ``1 + w`` (Nemotron's ``LayerNorm1P``; ``F.rms_norm`` and
    ``F.batch_norm`` with such a gain): the gain is a function of the parameter, not the parameter itself."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb, self.fc, self.out = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.w1, self.w2 = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.b1, self.b2 = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)

    def norm(self, h, w, b):
        if self.kind == "layer_norm":
            return F.layer_norm(h, (6,), w + 1.0, b)
        if self.kind == "rms_norm":
            return F.rms_norm(h, (6,), w + 1.0) + b
        return F.batch_norm(h.transpose(1, 2), self.mean, self.var, w + 1.0, b).transpose(1, 2)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(torch.relu(self.norm(h, self.w1, self.b1)))
        return self.out(self.norm(h, self.w2, self.b2))


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "batch_norm"])
def test_a_norm_gain_written_as_one_plus_w_moves_with_the_stream(kind):
    """The stream is one space and each gain ``1 + w`` is permuted with it (w permuted): exact as derived. Before,
    the gain was read untransformed while the stream moved (Nemotron's spec changed its outputs by 120%); the
    stream permuted with w left in place changes the outputs."""
    torch.manual_seed(0)
    model = ShiftedGainNorm(kind).double().eval()
    ids = torch.randint(0, 10, (2, 5))
    spec = symmetry_spec(model, ids, check=False)
    assert not spec.pinned, spec.pinned
    report = verify_symmetry(model, ids, spec=spec, trials=3)
    assert report.ok and report.max_rel <= 1e-12
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)
    assert not torch.equal(new.w1, model.w1) and not torch.equal(new.w2, model.w2)
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.w1.copy_(model.w1)
        wrong.w2.copy_(model.w2)
    assert (wrong(ids) - model(ids)).abs().max() > 1e-6


def test_transformers_nemotron_keeps_its_outputs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.NemotronConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=100, head_dim=16, pad_token_id=0)
    torch.manual_seed(0)
    model = Logits(randomised(transformers.NemotronForCausalLM(cfg)).eval(), "input_ids", use_cache=False)
    ids = torch.randint(1, 100, (2, 8))
    spec = symmetry_spec(model, ids, check=False)
    report = verify_symmetry(model, ids, spec=spec, trials=2)
    assert report.max_rel <= 1e-9, report   # (the rotary tables are float32 inside, the rest float64)


class ConstantGainNorm(nn.Module):
    """A layer norm whose gain is a tensor made in the forward pass (no parameter): it varies across the channels
    and stays where it is."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids)
        gain = torch.linspace(0.5, 1.5, 6, dtype=h.dtype)
        return self.out(F.layer_norm(h, (6,), gain))


def test_a_norm_gain_that_is_no_parameter_pins_the_channels():
    torch.manual_seed(0)
    model = ConstantGainNorm().double()
    ids = torch.randint(0, 10, (2, 5))
    spec = symmetry_spec(model, ids, check=False)
    assert not spec.spaces and any("gain or bias that is no parameter" in r for r in spec.pinned.values()), \
        spec.pinned
    moved = copy.deepcopy(model)   # the pin is needed: the stream permuted, the gain not
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    with torch.no_grad():
        moved.emb.weight.copy_(model.emb.weight[:, perm])
        moved.out.weight.copy_(model.out.weight[:, perm])
    assert (moved(ids) - model(ids)).abs().max() > 1e-6
