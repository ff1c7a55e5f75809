"""Capture leaves the model as it found it: a forward that stores tensors on its modules while it is traced
(timm's LeViT caches its attention biases, gathered from a parameter, in a dict in eval mode) must not keep
the trace's fake tensors there."""

import copy

import torch
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
