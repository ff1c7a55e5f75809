"""The replicas of tests/replicas.py run forward (eval and train mode) with the right output shapes and
keep the features that make them faithful (in-place activations, depthwise/grouped convolutions, ...)."""

import pytest
import torch
from replicas import BATCH, HF_REPLICAS, NUM_CLASSES, REPLICAS, TOKENS, output_tensor, parameter_count
from torch import nn


@pytest.mark.parametrize("name", list(REPLICAS))
def test_vision_replica_forward(name):
    model, x = REPLICAS[name]()
    model2, x2 = REPLICAS[name]()  # seeded: the same weights and input again
    assert torch.equal(x, x2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert x.shape == (BATCH, 3, 16, 16) and not model.training
    with torch.no_grad():
        y = model(x)
        assert y.shape == (BATCH, NUM_CLASSES) and torch.isfinite(y).all()
        model.train()
        assert model(x).shape == (BATCH, NUM_CLASSES)
    assert max(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) <= 32
    assert parameter_count(model) < 100_000


def _has(model, pred) -> bool:
    return any(pred(m) for m in model.modules())


def test_replicas_are_faithful():
    def inplace(cls):
        return lambda m: isinstance(m, cls) and getattr(m, "inplace", False)

    def depthwise(m):
        return isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1

    mv2 = REPLICAS["mobilenet_v2"]()[0]
    assert _has(mv2, inplace(nn.ReLU6)) and _has(mv2, depthwise)
    mv3 = REPLICAS["mobilenet_v3"]()[0]
    assert _has(mv3, inplace(nn.Hardswish)) and _has(mv3, lambda m: isinstance(m, nn.Hardsigmoid))
    eff = REPLICAS["efficientnet"]()[0]
    assert _has(eff, inplace(nn.SiLU)) and _has(eff, lambda m: isinstance(m, nn.Sigmoid))
    cnx = REPLICAS["convnext"]()[0]
    assert _has(cnx, lambda m: isinstance(m, nn.Conv2d) and m.kernel_size == (7, 7) and m.groups == m.in_channels)
    reg = REPLICAS["regnet_x"]()[0]
    assert _has(reg, lambda m: isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels)
    assert _has(REPLICAS["vit_torchvision"]()[0], lambda m: isinstance(m, nn.MultiheadAttention))


def test_vit_attention_paths_agree():
    """The fused (scaled_dot_product_attention) and explicit softmax paths compute the same function."""
    model, x = REPLICAS["vit_timm"](dtype=torch.float64)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        assert torch.allclose(model(x), fused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,last", [("gpt2", 1000), ("bert", 64), ("llama", 1000)])
def test_hf_replica_forward(name, last):
    model, ids = HF_REPLICAS[name]()
    assert ids.shape == (BATCH, TOKENS) and ids.dtype == torch.long
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    with torch.no_grad():
        y = output_tensor(model(ids))
    assert y.shape == (BATCH, TOKENS, last) and torch.isfinite(y).all()
