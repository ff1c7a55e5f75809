"""Normalisations: batch norm and layer norm over the channel axis (GroupNorm and instance norm are pinned).

Batch norm: BN'(P s x) = P t BN(x) in train and eval mode with gamma' = P t/s gamma, beta' = P t beta,
running_mean' = P s mean, running_var' = P var, where s (the input's scale) must be ±1 because BN divides
by sqrt(var + eps). Layer norm over the channel axis commutes with permutations only; gamma and beta are
permuted and may absorb a scaling of the output.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..chains import ONE
from ..constraints import Signed, Unit
from ..context import Context
from ..layout import FIXED, ZERO, Layout
from ..records import ParamRef
from ..registry import builtin

aten = torch.ops.aten


def _output(ctx: Context, x: Layout, affine: bool) -> Layout:
    """The normalised value: zero channels are no longer zero; with an affine gain, a value that was only
    permuted (a convolution feeding the norm) may carry a scaling again."""
    one = ctx.chain_id((ONE,))
    chains = np.zeros_like(x.chains) if affine and bool(np.all(x.chains == one)) else x.chains
    return ctx.keep(x.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms), chains=chains))


def _affine(ctx: Context, x: Layout, w, b) -> Layout:
    """The normalised value of ``x`` with the norm's affine step: gamma ``w`` a gain from ``x`` to the output,
    beta ``b`` rows of the output (either may be absent). Returns the output's layout."""
    out = _output(ctx, x, isinstance(w, ParamRef))
    if isinstance(w, ParamRef):
        ctx.gain(w, 0, out, x)
    if isinstance(b, ParamRef):
        ctx.rows(b, 0, out)
    return out


@builtin(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
         aten.native_batch_norm, aten.instance_norm)
def batch_norm(ctx: Context, node: fx.Node):
    """Channels pass; gamma is a gain, beta rows, the running mean rows of the input, the variance permuted."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    if node.target.overloadpacket is aten.instance_norm:
        return ctx.unsupported(node, f"{ctx.describe(node)}: instance norm is not supported")
    w, b, mean, var = (ctx.value(a) for a in node.args[1:5])
    if x.simple_dim() != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axis")
    ctx.require(Signed, x)
    out = _affine(ctx, x, w, b)
    if isinstance(mean, ParamRef):
        ctx.rows(mean, 0, x)
    if isinstance(var, ParamRef):
        ctx.permuted(var, 0, x)
    if node.target.overloadpacket is not aten.batch_norm:
        return ctx.unsupported(node, f"{ctx.describe(node)} returns several values")
    return out


@builtin(aten.layer_norm, aten.native_layer_norm)
def layer_norm(ctx: Context, node: fx.Node):
    """Over exactly the channel axis: permutations only (gamma a gain, beta rows)."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    w, b = ctx.value(ctx.arg(node, 2, "weight")), ctx.value(ctx.arg(node, 3, "bias"))
    if len(node.args[1]) != 1 or x.simple_dim() != x.ndim - 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not normalise exactly the channel axis")
    ctx.require(Unit, x)
    out = _affine(ctx, x, w, b)
    if node.target.overloadpacket is aten.native_layer_norm:
        return ctx.unsupported(node, f"{ctx.describe(node)} returns several values")
    return out


@builtin(aten.group_norm, aten.native_group_norm)
def group_norm(ctx: Context, node: fx.Node):
    return ctx.unsupported(node, f"{ctx.describe(node)}: GroupNorm is not supported")
