"""Checks the symmetry tests share (an importable helper module, no tests here)."""

from __future__ import annotations

import torch
from torch import nn

from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec, verify_symmetry


def one_exact_space(model, x, size: int, trials: int = 2):
    """The spec of ``model`` on ``x`` as derived (safety check off) must hold exactly one space, of ``size``
    coordinates, pin nothing, and verify to float64 rounding (``trials`` random elements); returns
    ``(spec, moved)``, ``moved`` the model under one random element of that space."""
    spec = symmetry_spec(model, x, check=False)
    (space,) = spec.spaces.values()
    assert space.size == size and not spec.pinned, spec.pinned
    report = verify_symmetry(model, x, spec=spec, trials=trials)
    assert report.ok and report.max_rel <= 1e-12
    return spec, apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(1)), spec)


def randomised(model, seed: int = 0):
    """``model`` in float64 with random values in every parameter (no constant gains or zero biases that would
    hide a wrong move)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.double()


def output_change(model, spec, space, element, x) -> float:
    """Largest output change on ``x`` when ``element`` (an (n, n) matrix, outside the group) acts on ``space``."""
    new = apply_symmetry(model, {space: element}, spec, check=False)
    with torch.no_grad():
        return float((new(x) - model(x)).abs().max())


class Logits(nn.Module):
    """A transformers model that returns its logits alone: ``model(x, **kwargs).logits``, with x passed as the
    keyword ``input_name`` when one is given."""

    def __init__(self, model: nn.Module, input_name: str | None = None, **kwargs):
        super().__init__()
        self.model, self.input_name, self.kwargs = model, input_name, kwargs

    def forward(self, x):
        out = self.model(**{self.input_name: x}, **self.kwargs) if self.input_name else self.model(x, **self.kwargs)
        return out.logits
