"""Activation functions by name, as ``torch.nn`` modules.

Names: ``identity``, ``relu``, ``leaky_relu`` (``leaky_relu:0.2`` for slope 0.2), ``sigmoid``, ``tanh``,
``gelu``, ``silu``, ``elu``, ``softplus``, ``gaussian`` (the RBF row of Table 1), ``power:D`` (x**D),
``abs``. Models take a name or any ``nn.Module``; modules are deep-copied so every site owns its own.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class Gaussian(nn.Module):
    """sigma(x) = exp(-x^2/2) / sqrt(2 pi), the RBF activation of Table 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


class Power(nn.Module):
    """sigma(x) = x**degree for a positive integer degree."""

    def __init__(self, degree: int):
        super().__init__()
        if int(degree) != degree or degree < 1:
            raise ValueError(f"power activation needs a positive integer degree, got {degree!r}")
        self.degree = int(degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**self.degree

    def extra_repr(self) -> str:
        return f"degree={self.degree}"


class Abs(nn.Module):
    """sigma(x) = |x|."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


_SIMPLE = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "gaussian": Gaussian,
    "abs": Abs,
}

ACTIVATION_NAMES = (*_SIMPLE, "leaky_relu", "power:D")


def make_activation(spec: str | nn.Module) -> nn.Module:
    """Build a fresh activation module from a name (see module docstring) or copy a given module."""
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)
    if not isinstance(spec, str):
        raise ValueError(f"activation must be a name or an nn.Module, got {type(spec).__name__}")
    name, _, arg = spec.strip().lower().partition(":")
    if name in _SIMPLE and not arg:
        return _SIMPLE[name]()
    if name == "leaky_relu":
        return nn.LeakyReLU(float(arg) if arg else 0.01)
    if name == "power":
        if not arg:
            raise ValueError("power activation needs a degree, e.g. 'power:3'")
        return Power(int(arg))
    raise ValueError(f"unknown activation {spec!r}; known: {', '.join(ACTIVATION_NAMES)}")


def activation_name(module: nn.Module) -> str:
    """The canonical name of an activation module (inverse of :func:`make_activation` where possible)."""
    if isinstance(module, nn.LeakyReLU):
        return f"leaky_relu:{module.negative_slope}"
    if isinstance(module, Power):
        return f"power:{module.degree}"
    for name, cls in _SIMPLE.items():
        if type(module) is cls:
            return name
    raise ValueError(f"{type(module).__name__} has no registered name")


# Module types and functions that the tracer treats as elementwise activations.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.ReLU6,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.CELU, nn.SELU, nn.PReLU,
    Gaussian, Power, Abs,
)

ACTIVATION_FUNCTIONS = {
    torch.relu: "relu", torch.nn.functional.relu: "relu", torch.relu_: "relu",
    torch.nn.functional.relu_: "relu",
    torch.sigmoid: "sigmoid", torch.nn.functional.sigmoid: "sigmoid",
    torch.tanh: "tanh", torch.nn.functional.tanh: "tanh",
    torch.nn.functional.leaky_relu: "leaky_relu", torch.nn.functional.gelu: "gelu",
    torch.nn.functional.silu: "silu", torch.nn.functional.elu: "elu",
    torch.nn.functional.softplus: "softplus", torch.abs: "abs",
}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "abs": "abs"}
