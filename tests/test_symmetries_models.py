"""Symmetries of the models people use: transformers (GPT-2, BERT, Llama tiny configs) and small replicas of
depthwise / squeeze-excitation / layer-scale / nn.MultiheadAttention blocks. Every model: float64 outputs
unchanged by a random element (eval and train mode) and a non-invariance check."""

import copy

import pytest
import torch
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry
from intertwiners.symmetries.verify import compare


def changed_share(model, new):
    a, b = dict(model.named_parameters()), dict(new.named_parameters())
    total = sum(p.numel() for p in a.values())
    return sum(int((a[k] != b[k]).sum()) for k in a) / total


def check(model, args, tol=1e-9):
    spec = symmetry_spec(model, args)
    before = copy.deepcopy(model.state_dict())
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(0)), spec)
    errs = compare(model, new, args)
    assert all(e[1] <= tol for e in errs.values()), (errs, str(spec))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return spec, new


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    if kind.endswith("-eager"):  # attention written out: softmax(q k^T / sqrt(d) + mask) v
        model = _hf(kind[:-len("-eager")])
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        return model
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, use_cache=False)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=50, max_position_embeddings=16)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, use_cache=False, bos_token_id=0,
                                   eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "gpt2-eager", "llama-eager"])
def test_transformers_residual_stream_mlps_and_attention(kind):
    model = _hf(kind).double().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    tol = 1e-5 if kind.startswith("llama") else 1e-9  # Llama's RMSNorm computes in float32 in a float64 model
    spec, new = check(model, (ids,), tol)
    assert spec.lower_precision_inside == kind.startswith("llama")  # LlamaRMSNorm casts to float32
    kinds = [s.kind for s in spec.spaces.values()]
    assert kinds.count("attention_heads") == 2
    assert sum(1 for s in spec.spaces.values() if s.sites) >= 2      # the MLP hidden layers
    assert max(s.ties for s in spec.spaces.values()) >= 4              # the residual stream, tied through blocks
    assert changed_share(model, new) > 0.9
    # a non-member of the stream's group (a scaling where LayerNorm/RMSNorm only allow (signed) permutations)
    stream = max(spec.spaces.values(), key=lambda s: s.ties)
    D = torch.diag(torch.linspace(0.5, 2.0, stream.size, dtype=torch.float64))
    bad = apply_symmetry(model, {stream.name: D}, spec, check=False)
    assert compare(model, bad, (ids,), ("eval",))["eval"][1] > 1e-6


def test_gpt2_tied_unembedding_moves_once():
    model = _hf("gpt2").double().eval()
    ids = torch.randint(0, 50, (2, 6))
    spec, new = check(model, (ids,))
    assert new.lm_head.weight is new.transformer.wte.weight
    assert not torch.equal(new.lm_head.weight, model.lm_head.weight)


def test_inplace_apply_moves_large_tensors_in_slices_bit_for_bit(monkeypatch):
    """apply_symmetry(inplace=True) moves a tensor larger than SLICE entries in slices along an axis no slot
    acts on, where every element acting on it is monomial; the result equals the copy's bit for bit, and
    tensors an attention (dense) element acts on are moved whole."""
    import intertwiners.symmetries.apply as apply_module

    model = _hf("gpt2").double().eval()
    ids = torch.randint(0, 50, (2, 6))
    spec = symmetry_spec(model, (ids,))
    g = random_symmetry(spec, torch.Generator().manual_seed(3))
    want = apply_symmetry(model, g, spec)
    monkeypatch.setattr(apply_module, "SLICE", 7)
    axes = []
    real = apply_module._slicing_axis

    def spy(t, slots, els):
        axes.append((slots[0].tensor, real(t, slots, els)))
        return axes[-1][1]

    monkeypatch.setattr(apply_module, "_slicing_axis", spy)
    got = apply_symmetry(copy.deepcopy(model), g, spec, inplace=True)
    sliced = {k for k, a in axes if a is not None}
    assert "transformer.wte.weight" in sliced and not any("c_attn" in k for k in sliced)
    for (k, p), q in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


def test_attention_element_outside_group_changes_output():
    model = _hf("gpt2").double().eval()
    ids = torch.randint(0, 50, (2, 6))
    spec = symmetry_spec(model, (ids,))
    name = next(k for k, s in spec.spaces.items() if s.kind == "attention_heads")
    n = spec.spaces[name].size
    A = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, dtype=torch.float64)  # mixes heads
    assert not spec.spaces[name].group.contains(A)
    with pytest.raises(ValueError):
        apply_symmetry(model, {name: A}, spec)
    bad = apply_symmetry(model, {name: A}, spec, check=False)
    assert compare(model, bad, (ids,), ("eval",))["eval"][1] > 1e-6


class InvertedResidual(nn.Module):
    """MobileNet-style: 1x1 expand -> BN -> ReLU6 (in place) -> depthwise 3x3 -> BN -> hardswish -> SE -> 1x1."""

    def __init__(self, c=6, e=12):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e),
                                nn.Hardswish())
        self.se1, self.se2 = nn.Conv2d(e, 4, 1), nn.Conv2d(4, e, 1)
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.dw(self.expand(x))
        s = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h * s)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> LayerNorm (channels last) -> MLP -> layer scale, residual."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.fc2(nn.functional.gelu(self.fc1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class MHAClassifier(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(5, d), nn.MultiheadAttention(d, 4, batch_first=True), nn.Linear(d, 3)
        self.ln = nn.LayerNorm(d)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(self.ln(h).mean(1))


REPLICAS = {
    "mobilenet_block": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), InvertedResidual(),
                                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)), (4, 3, 8, 8)),
    "convnext_block": (lambda: nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), ConvNeXtBlock(), nn.AdaptiveAvgPool2d(1),
                                             nn.Flatten(), nn.Linear(8, 3)), (2, 3, 8, 8)),
    "mha": (MHAClassifier, (3, 4, 5)),
}


@pytest.mark.parametrize("name", list(REPLICAS))
def test_replica_blocks(name):
    build, shape = REPLICAS[name]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        model(x * 1.3 + 0.2)
    model.eval()
    spec, new = check(model, x)
    assert changed_share(model, new) > 0.8, str(spec)


def test_unbatched_image_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match="unbatched"):
        symmetry_spec(model, torch.randn(3, 8, 8))


def test_nan_model_fails_verification():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        verify_symmetry(model, torch.randn(5, 3, dtype=torch.float64))


def test_nan_outputs_give_nan_errors():
    torch.manual_seed(0)   # unseeded, a draw whose ReLUs all zero the infinite input gave finite outputs
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[0, 0] = float("inf")
    with torch.no_grad():
        assert not torch.isfinite(model(x)).all()   # the premise: the outputs are not finite
    errs = compare(model, copy.deepcopy(model), x, ("eval",))
    assert all(e != e for e in errs["eval"])  # NaN, never 0


def test_actions_name_parameters_dims_and_roles():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    spec = symmetry_spec(model, torch.randn(6, 3, dtype=torch.float64))
    (name,) = spec.spaces
    got = {(a.param, a.dim, a.role) for a in spec.actions(name)}
    assert {("0.weight", 0, "out"), ("0.bias", 0, "out"), ("1.weight", 0, "scale"), ("1.running_mean", 0, "out"),
            ("1.running_var", 0, "perm"), ("3.weight", 1, "in")} <= got
    assert spec.spaces[name].sites == ["2"]
    with pytest.raises(ValueError, match="unknown space"):
        spec.actions("nope")


def test_block_matrix_agrees_with_dense_algebra():
    """Splitting into blocks (one per head, permuted; unequal q/k and v/o widths) changes nothing:
    products, inverses and transposes equal the dense ones; a singular pattern is still reported."""
    from intertwiners.symmetries.blocks import BlockMatrix
    from intertwiners.symmetries.structured import AttentionGroup

    g = torch.Generator().manual_seed(3)
    dense = torch.randn(7, 7, generator=g, dtype=torch.float64) + 7 * torch.eye(7, dtype=torch.float64)
    for M in [AttentionGroup(h, dk, dv).sample(generator=g) for h, dk, dv in ((4, 3, 2), (1, 5, 5), (6, 1, 4))] \
            + [dense]:
        B = BlockMatrix.of(M)
        X = torch.randn(M.shape[0], 3, generator=g, dtype=torch.float64)
        assert torch.equal(B.dense(), M)
        assert torch.allclose(B.matmul(X), M @ X, atol=1e-12)
        assert torch.allclose(B.inverse().dense(), torch.linalg.inv(M), atol=1e-10)
        assert torch.equal(B.transpose().dense(), M.T)
    assert len(BlockMatrix.of(AttentionGroup(4, 3, 2).sample(generator=g)).blocks) == 2   # sizes 3 and 2
    with pytest.raises(RuntimeError):  # a singular pattern (a zero column) is still reported
        BlockMatrix.of(torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))).inverse()


def test_attention_group_membership():
    """Sampled elements are members and decompose into their permutation and blocks; an entry outside the
    blocks, a singular block, a head permutation where none is allowed, or a non-scalar block of a scalar
    group is not a member."""
    from intertwiners.symmetries.structured import AttentionGroup

    g = torch.Generator().manual_seed(5)
    G = AttentionGroup(4, 3, 2)
    M = G.sample(generator=g)
    assert G.contains(M)
    perm, qk, vo = G.decompose(M)
    for src in range(4):
        t = int(perm[src])
        assert torch.equal(M[t * 3:(t + 1) * 3, src * 3:(src + 1) * 3], qk[src])
        assert torch.equal(M[12 + t * 2:12 + (t + 1) * 2, 12 + src * 2:12 + (src + 1) * 2], vo[src])
    leak = M.clone()
    leak[0, 13] = 0.1  # a query coordinate fed from a value coordinate
    assert not G.contains(leak)
    singular = M.clone()
    t = int(perm[0])
    singular[t * 3:(t + 1) * 3, 0] = 0.0
    assert not G.contains(singular)
    fixed = AttentionGroup(4, 3, 2, permute_heads=False)
    assert fixed.contains(fixed.sample(generator=g))
    assert not torch.equal(perm, torch.arange(4)) and not fixed.contains(M)
    scalar = AttentionGroup(4, 3, 2, qk="scalar")
    assert scalar.contains(scalar.sample(generator=g)) and not scalar.contains(M)


@pytest.mark.parametrize("kind, entries", [("monomial", "any"), ("positive_monomial", "positive"),
                                           ("signed_permutation", "±1"), ("permutation", "1")])
def test_attention_group_with_monomial_blocks(kind, entries):
    """Blocks that are a permutation within the head times a diagonal: sampled elements are members, with one
    entry per row and column of each block of the kind's values; a general block, or a block with an entry the
    kind excludes, is not a member (of the stricter kinds)."""
    from intertwiners.symmetries.structured import AttentionGroup

    g = torch.Generator().manual_seed(6)
    G = AttentionGroup(3, 4, 2, qk=kind)
    assert G.dimension(G.size) == 3 * ((4 if kind in ("monomial", "positive_monomial") else 0) + 4)
    for _ in range(5):
        M = G.sample(generator=g)
        assert G.contains(M)
        _, qk, _ = G.decompose(M)
        nonzero = qk != 0
        assert bool((nonzero.sum(1) == 1).all()) and bool((nonzero.sum(2) == 1).all())
        values = qk[nonzero]
        assert {"any": True, "positive": bool((values > 0).all()), "±1": bool((values.abs() == 1).all()),
                "1": bool((values == 1).all())}[entries]
    general = AttentionGroup(3, 4, 2).sample(generator=g)
    assert not G.contains(general)
    flipped = G.sample(generator=g)
    qk = flipped[:12, :12]
    qk[qk > 0.0] *= -1.5   # every query/key entry negative, none of modulus 1
    assert G.contains(flipped) == (kind == "monomial")


class GatedMLP(nn.Module):
    """down(silu(gate x) * up x), as Llama/Mistral write it (and a hand-written swish gate)."""

    def __init__(self, d=6, hidden=10, swish=False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, 3)
        self.swish = swish

    def forward(self, x):
        g = self.gate(x)
        g = g * torch.sigmoid(g) if self.swish else nn.functional.silu(g)
        return self.down(g * self.up(x))


@pytest.mark.parametrize("swish", [False, True])
def test_gated_mlp_scalings_are_carried_by_up(swish):
    """The hidden units of a gated MLP: one permutation for gate and up, any non-zero scaling carried by
    `up` (and undone by `down`); `gate` is only permuted. Scaling the gate rows too changes the output."""
    torch.manual_seed(0)
    model = GatedMLP(swish=swish).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    spec, new = check(model, x)
    (space,) = spec.spaces.values()
    assert space.kind == "scaled_permutation"
    perm, scale = random_symmetry(spec, torch.Generator().manual_seed(3), monomial=True)[space.name]
    new = apply_symmetry(model, {space.name: (perm, scale)}, spec)
    inv = torch.argsort(perm)
    assert torch.equal(new.gate.weight[perm], model.gate.weight)                 # only permuted
    assert torch.allclose(new.up.weight[perm], scale[:, None] * model.up.weight)  # permuted and scaled
    assert torch.allclose(new.down.weight[:, perm], model.down.weight / scale[None, :])
    assert not torch.equal(inv, torch.arange(10))
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.gate.weight.mul_(scale[inv][:, None])
        wrong.gate.bias.mul_(scale[inv])
    assert float((wrong(x) - model(x)).abs().max().detach()) > 1e-6


def test_block_matrix_restriction_and_sampled_attention_elements():
    """Restricting a block matrix to whole blocks equals restricting the dense matrix; an index set that cuts
    a block is refused. A sampled attention element (applied from its remembered blocks) and a plain copy of
    it (read back from the matrix) give the same model."""
    from intertwiners.symmetries.blocks import BlockMatrix
    from intertwiners.symmetries.structured import AttentionGroup

    G = AttentionGroup(3, 4, 2)
    M = G.sample(generator=torch.Generator().manual_seed(0))
    B = BlockMatrix.of(M)
    for idx in (torch.arange(12), torch.arange(12, 18), torch.arange(18)):
        assert torch.equal(B.restrict(idx).dense(), M[idx][:, idx])
    assert B.restrict(torch.arange(5)) is None
    model = _hf("gpt2").double().eval()
    ids = torch.randint(0, 50, (2, 6))
    spec = symmetry_spec(model, (ids,))
    el = random_symmetry(spec, torch.Generator().manual_seed(4))
    plain = {k: v.clone() for k, v in el.items()}
    assert not any(hasattr(v, "_intertwiners_blocks") or hasattr(v, "_intertwiners_monomial") for v in plain.values())
    a, b = apply_symmetry(model, el, spec), apply_symmetry(model, plain, spec)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14), name
    assert compare(model, a, (ids,), ("eval",))["eval"][1] <= 1e-9


class TokenMixer(nn.Module):
    """x + fc2(act(fc1(LN(x)^T)))^T along the token axis (MLP-Mixer), then a channel head; ``read`` adds an
    operation on the token-mixing hidden units that the side-axis tracking does not follow."""

    def __init__(self, tokens=6, hidden=5, channels=4, read=None):
        super().__init__()
        self.inp, self.norm = nn.Linear(3, channels), nn.LayerNorm(channels)
        self.fc1, self.fc2, self.head = nn.Linear(tokens, hidden), nn.Linear(hidden, tokens), nn.Linear(channels, 2)
        self.read = read

    def forward(self, x):
        h = self.inp(x)
        u = torch.relu(self.fc1(self.norm(h).transpose(1, 2)))
        if self.read == "cumsum":   # mixes the hidden units: they must be pinned
            u = u.cumsum(-1)
        y = h + self.fc2(u).transpose(1, 2)
        return self.head(y.mean(1))


def test_token_mixing_hidden_units_are_a_space_of_their_own():
    """The J hidden units of a token-mixing MLP: P·D (ReLU: positive scalings) on fc1's rows and fc2's
    columns, independent of the channel permutation; outputs unchanged. A scaling with a negative entry
    (outside G_ReLU) changes the output; an operation that mixes the units pins them."""
    torch.manual_seed(0)
    model = TokenMixer().double()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    spec, new = check(model, x)
    token = spec.spaces["fc1"]
    assert token.size == 5 and token.kind == "positive_scaled_permutation"
    assert {(a.param, a.dim, a.role) for a in spec.actions("fc1")} == \
        {("fc1.weight", 0, "out"), ("fc1.bias", 0, "out"), ("fc2.weight", 1, "in")}
    assert not torch.equal(new.fc1.weight, model.fc1.weight) and not torch.equal(new.fc2.weight, model.fc2.weight)
    bad = apply_symmetry(model, {"fc1": torch.diag(torch.tensor([1.0, -1.0, 2.0, 1.0, 1.0], dtype=torch.float64))},
                         spec, check=False)
    assert compare(model, bad, x, ("eval",))["eval"][1] > 1e-6
    mixed = TokenMixer(read="cumsum").double()
    spec2, _ = check(mixed, x)
    assert "fc1" in spec2.pinned and "non-channel axis" in spec2.pinned["fc1"]


class WrittenOutAttention(nn.Module):
    """Self-attention written out as softmax(q k^T * s + mask) v, optionally with a per-head relative
    position bias on the scores (T5/Swin style) or with the attention weights returned as an output."""

    def __init__(self, d=8, heads=2, tokens=5, bias=False, return_weights=False):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.inp, self.head = nn.Linear(3, d), nn.Linear(d, 2)
        self.rel = nn.Parameter(torch.randn(heads, tokens, tokens)) if bias else None
        self.return_weights = return_weights
        self.register_buffer("mask", torch.triu(torch.full((tokens, tokens), -1e9), 1))

    def forward(self, x):
        h = self.inp(x)
        B, T, D = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        s = (q @ k.transpose(-2, -1)) * self.dh ** -0.5 + self.mask
        if self.rel is not None:
            s = s + self.rel
        p = s.softmax(-1)
        y = h + self.proj((p @ v).transpose(1, 2).reshape(B, T, D))
        out = self.head(y.mean(1))
        return (out, p) if self.return_weights else out


def test_written_out_attention_is_an_attention_block():
    """softmax(q k^T) v written with matmul: heads permuted and per-head maps on q/k and v/o, outputs
    unchanged; an element that mixes heads changes them. A per-head parameter on the scores moves with the heads
    (tests/test_symmetries_head_norms.py); the scores returned as an output keep the heads in place (the
    per-head maps remain; never a wrong symmetry)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    spec, new = check(WrittenOutAttention().double(), x)
    (name,) = [k for k, s in spec.spaces.items() if s.kind == "attention_heads"]
    assert spec.spaces[name].group.heads == 2 and not spec.pinned
    model = WrittenOutAttention().double()
    n = spec.spaces[name].size
    A = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=torch.Generator().manual_seed(2),
                                                              dtype=torch.float64)
    bad = apply_symmetry(model, {name: A}, spec, check=False)
    assert compare(model, bad, x, ("eval",))["eval"][1] > 1e-6
    # (scores returned: their heads reach the output, which is never listed as pinned)
    torch.manual_seed(0)
    spec2, _ = check(WrittenOutAttention(bias=True).double(), x)
    (group,) = [s.group for s in spec2.spaces.values() if s.kind == "attention_heads"]
    assert group.permute_heads and group.per_head == 1 and not spec2.pinned, spec2.pinned
    for kwargs in ({"return_weights": True},):
        torch.manual_seed(0)
        spec2, _ = check(WrittenOutAttention(**kwargs).double(), x)
        (group,) = [s.group for s in spec2.spaces.values() if s.kind == "attention_heads"]
        assert not group.permute_heads and group.qk == group.vo == "general_linear"
        assert not spec2.pinned, spec2.pinned
        # as derived (no safety net) nothing is wrong: the scores' heads stay in place
        assert verify_symmetry(WrittenOutAttention(**kwargs).double(), x, trials=2).ok
        # and that is needed: swapping the two heads (q, k, v rows and proj's columns) changes the outputs
        torch.manual_seed(0)
        plain = WrittenOutAttention(**kwargs).double()
        swapped = copy.deepcopy(plain)
        heads = torch.cat([torch.arange(4, 8), torch.arange(0, 4)])
        rows = torch.cat([heads, heads + 8, heads + 16])
        with torch.no_grad():
            swapped.qkv.weight.copy_(plain.qkv.weight[rows])
            swapped.qkv.bias.copy_(plain.qkv.bias[rows])
            swapped.proj.weight.copy_(plain.proj.weight[:, heads])
        outs = [torch.cat([t.reshape(-1) for t in (m(x) if kwargs.get("return_weights") else (m(x),))])
                for m in (plain, swapped)]
        assert (outs[0] - outs[1]).abs().max() > 1e-6


def test_stochastic_depth_does_not_pin_train_mode():
    """torchvision's EfficientNet drops whole residual branches per sample in train mode (stochastic depth,
    p = 0.2). The safety check and verify compare both models from the same random state, so the same
    samples are dropped and nothing is pinned; the check still sees a wrong element in train mode."""
    import replicas

    model, x = replicas.efficientnet(dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, replicas.StochasticDepth):
            m.p = 0.2
    spec, new = check(model, x)
    assert not spec.pinned and len(spec.spaces) == 8
    name = next(k for k, s in spec.spaces.items() if s.size > 8)
    D = torch.diag(torch.linspace(-2.0, 2.0, spec.spaces[name].size, dtype=torch.float64) + 0.01)
    bad = apply_symmetry(model, {name: D}, spec, check=False)
    assert compare(model, bad, x, ("train",))["train"][1] > 1e-6


FLOAT32_INSIDE = {"gemma", "mistral", "qwen2", "gpt_neo"}  # cast to float32 inside, even in a float64 model


@pytest.mark.parametrize("family", ["gpt_neox", "phi", "gemma", "gpt_neo", "opt", "distilbert"])
def test_more_transformers_families(family):
    """Fused per-head qkv with partial rotary (GPT-NeoX), partial rotary with a parallel block (Phi), a gain
    written as 1 + w, a scalar embedding scale and multi-query attention (Gemma), a causal mask applied with
    torch.where in written-out attention (GPT-Neo), OPT, DistilBERT: every attention block and MLP is a free
    space, nothing is pinned, outputs unchanged."""
    import replicas

    model, ids = replicas.hf_family(family, dtype=torch.float64)
    spec, new = check(model, (ids,), 1e-5 if family in FLOAT32_INSIDE else 1e-9)
    assert not spec.pinned, spec.pinned
    assert sum(s.kind == "attention_heads" for s in spec.spaces.values()) == 2
    assert changed_share(model, new) > 0.95


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_in_transformers_default_implementation(family):
    """transformers' default experts ("grouped_mm": an opaque custom operator when traced) are captured in their
    gathered twin ("batched_mm") and switched back: the residual stream and every expert's hidden units are
    spaces (the router's experts stay in place), checked as derived on the model as it is, in float32 (its
    grouped product has no float64, so the safety check runs in float32 too); weight matching recovers a
    planted element."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    moe = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
               num_experts_per_tok=2, use_cache=False)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                                                           **moe))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, **moe))
    model.eval()
    before = model.get_experts_implementation()
    assert set(before.values()) == {"grouped_mm"}
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    spec = symmetry_spec(model, (ids,), check=False)
    assert model.get_experts_implementation() == before
    experts = [s for name, s in spec.spaces.items() if name.endswith("mlp.experts.act_fn")]
    assert len(experts) == 2 and all(s.size == 16 if family == "qwen2_moe" else 48 for s in experts), spec
    assert any(s.size == 32 and s.kind == "signed_permutation" for s in spec.spaces.values())   # the stream
    reasons = sorted(r.split(": ")[-1] for r in spec.pinned.values())   # Qwen2-MoE: its shared expert's gate too
    assert reasons == ["a one-unit gate broadcast across the channels it scales"] * (2 * (family == "qwen2_moe")) + \
        ["a softmax across channels"] * 2, spec.pinned
    report = verify_symmetry(model, (ids,), spec=spec, trials=1)
    assert report.ok, report
    checked = symmetry_spec(model, (ids,))   # the check runs in float32 (no float64 copy runs), pins nothing
    assert list(checked.spaces) == list(spec.spaces)
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(0)), spec)
    assert changed_share(model, new) > 0.95
    from intertwiners import align
    back = align(model, new, example_input=ids, method="weights").model    # the planted element recovered
    assert max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), back.parameters())) < 1e-6
    with torch.no_grad():
        assert (new(ids).logits - model(ids).logits).abs().max() <= 1e-4
        # the stream's element applied to the experts' input columns alone changes the output
        broken = copy.deepcopy(new)
        broken.model.layers[0].mlp.experts.gate_up_proj.copy_(model.model.layers[0].mlp.experts.gate_up_proj)
        assert (broken(ids).logits - model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_key_value_cache_on_by_default_hides_no_attention_head(family):
    """A causal language model as transformers builds it (``use_cache=True``, as every pretrained one): the
    cache's update sat between the projections and the attention and pinned every attention space; the capture
    now runs without the cache (and puts the setting back), the heads are spaces, and the model as it is (with
    its cache) keeps its logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                                     n_positions=16))
    model.eval()
    assert model.config.use_cache is True
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    spec = symmetry_spec(model, (ids,), check=False)
    assert model.config.use_cache is True
    assert sum(s.kind == "attention_heads" for s in spec.spaces.values()) == 2 and not spec.pinned, spec.pinned
    assert verify_symmetry(model, (ids,), spec=spec, trials=1).ok
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(0)), spec)
    with torch.no_grad():
        assert (new(ids).logits - model(ids).logits).abs().max() <= 1e-4


class SharedLayer(nn.Module):
    """A block's second Linear also registered at the top, under a second name (timm's CoaT registers each
    relative-position module at its stage and in the blocks that use it)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"fc": nn.Linear(4, 6), "out": nn.Linear(6, 2)})
        self.out = self.block["out"]

    def forward(self, x):
        return self.block["out"](torch.relu(self.block["fc"](x)))


def test_a_shared_module_keeps_its_own_parameters():
    """The trace swaps parameters in by name; a module under several names once got a fake tensor back, and
    the user's model computed with it afterwards. Every parameter stays the same object, outputs unchanged."""
    torch.manual_seed(0)
    model = SharedLayer().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    before, y = [id(p) for p in model.parameters()], model(x)
    for check in (False, True):
        spec = symmetry_spec(model, x, check=check)
        assert [id(p) for p in model.parameters()] == before
        assert all(type(p) is nn.Parameter for p in model.parameters())
        assert torch.equal(model(x), y)
    new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(0)), spec)
    assert (new(x) - y).abs().max() <= 1e-12 and spec.spaces


def test_failing_model_errors_say_what_to_do():
    """An integer input to a float model without an embedding: pass floats; a float64 model whose operation has
    no float64: run it in float32; token ids into an embedding get no integer hint."""
    with pytest.raises(ValueError, match="integer tensor.*floating-point input"):
        symmetry_spec(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.ones(2, 3, dtype=torch.int64))

    class NoDouble(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.dtype == torch.float64:
                raise RuntimeError("expected mat1 to be Float, got Double")
            return self.fc(x)

    with pytest.raises(ValueError, match="got Double.*does not support torch.float64: run the model in float32"):
        symmetry_spec(NoDouble().double(), torch.randn(2, 3))
    embed = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="fails on its example input") as err:
        symmetry_spec(embed, torch.tensor([[1, 7]]))                      # id 7 is outside the table
    assert "integer tensor" not in str(err.value)


class DerivedGain(nn.Module):
    """tanh(scale · W1 x) · (1 + w) then W2, with a scalar buffer ``scale``; ``mask``: a torch.where that
    varies across channels (must pin) or only across samples (channels pass)."""

    def __init__(self, mask=None):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.w = nn.Parameter(torch.randn(6))
        self.register_buffer("scale", torch.tensor(3.0))
        self.mask = mask

    def forward(self, x):
        h = torch.tanh(self.lin1(x) * self.scale) * (1 + self.w)
        if self.mask == "channels":
            h = torch.where(torch.arange(6) % 2 == 0, h, 0.5)
        elif self.mask == "samples":
            h = torch.where(x[:, :1] > 0, h, 0.5)
        return self.lin2(h)


def test_derived_parameters_scalar_buffers_and_where():
    """A gain written 1 + w is permuted through w; a scalar buffer factor commutes with the space; a
    torch.where whose mask is the same for every channel keeps the channels (permutations), one that differs
    across channels pins them."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    for mask, kind in ((None, "signed_permutation"), ("samples", "permutation")):
        model = DerivedGain(mask).double()
        spec, new = check(model, x)
        (space,) = spec.spaces.values()
        assert space.kind == kind and ("w", None, "scale") in {(a.param, a.dim, a.role) for a in spec.actions()}
        assert not torch.equal(new.w, model.w) and torch.equal(torch.sort(new.w).values, torch.sort(model.w).values)
    model = DerivedGain().double()
    spec = symmetry_spec(model, x)
    (name,) = spec.spaces  # ":tanh", the site name of a functional tanh in the root module
    bad = apply_symmetry(model, {name: torch.diag(torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0],
                                                                dtype=torch.float64))}, spec, check=False)
    assert compare(model, bad, x, ("eval",))["eval"][1] > 1e-6
    spec = symmetry_spec(DerivedGain("channels").double(), x)
    assert not spec.spaces and any("varies across channels" in r for r in spec.pinned.values())


def test_keyword_inputs_with_a_padding_mask():
    """A dict of keyword inputs (a tokenizer's output: input_ids and an attention_mask with padding) works
    for the spec, the safety check and verification; a non-tensor entry is a ValueError."""

    model = _hf("bert").double().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    spec, new = check(model, inputs)
    assert not spec.pinned and sum(s.kind == "attention_heads" for s in spec.spaces.values()) == 2
    assert verify_symmetry(model, inputs, spec, trials=1, per_space=False).max_rel <= 1e-9
    with pytest.raises(ValueError, match="dict of tensors"):
        symmetry_spec(model, {"input_ids": ids, "attention_mask": [1, 1]})
