"""Activation functions by name, as ``torch.nn`` modules.

Names: ``identity``, ``relu``, ``leaky_relu`` (``leaky_relu:0.2`` for slope 0.2), ``sigmoid``, ``tanh``,
``gelu``, ``silu``, ``elu``, ``softplus``, ``gaussian`` (the RBF row of Table 1), ``power:D`` (x**D),
``abs``. Parameters must be finite numbers (``power:D`` an integer 1 <= D <= 64); anything else is a
ValueError. Models take a name or any ``nn.Module``; modules are deep-copied so every site owns its own.
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


MAX_POWER_DEGREE = 64
"""Largest degree of :class:`Power`: x**D overflows float64 for |x| > 10**(308/D), and so do the
phi(A) = A^⊙D of sampled scalings, so checks of larger degrees would compare infinities."""


class Power(nn.Module):
    """sigma(x) = x**degree for an integer degree 1 <= degree <= MAX_POWER_DEGREE (64)."""

    def __init__(self, degree: int):
        super().__init__()
        if isinstance(degree, bool) or not isinstance(degree, int | float) or not math.isfinite(degree) \
                or int(degree) != degree or not 1 <= degree <= MAX_POWER_DEGREE:
            why = " (x**D overflows float64 for |x| > 10**(308/D))" if isinstance(degree, int | float) \
                and math.isfinite(degree) and degree > MAX_POWER_DEGREE else ""
            raise ValueError(f"power activation needs an integer degree from 1 to {MAX_POWER_DEGREE}, got "
                             f"{degree!r}{why}")
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


def _number(spec: str, arg: str) -> float:
    """The finite number after the colon of ``spec`` (e.g. '0.2' in 'leaky_relu:0.2'), else ValueError."""
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"activation {spec!r}: {arg!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"activation {spec!r}: the parameter must be finite, got {value}")
    return value


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
        return nn.LeakyReLU(_number(spec, arg) if arg else 0.01)
    if name == "power":
        if not arg:
            raise ValueError("power activation needs a degree, e.g. 'power:3'")
        degree = _number(spec, arg)
        return Power(int(degree) if degree.is_integer() else degree)
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
    nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.RReLU,
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
