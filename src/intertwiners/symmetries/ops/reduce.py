"""Reductions and spatial operations: pooling, upsampling, reflection padding, mean/sum/max/var, softmax.

Over axes without channels they act on every channel alike (max pooling, max and standard deviation:
positive scalings only; variance and softmax: permutations only); a reduction over all channel axes gives an
untransformed value and needs unit scales (permutations); over part of the channel axes (a norm per attention
head) each reduced row becomes one coordinate, which the result holds; a vector norm over all channel axes
needs scales of modulus 1 (signed permutations).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from .. import layout as L
from ..constraints import PositiveScales, Signed, Unit
from ..context import Context
from ..layout import Layout
from ..records import ParamRef, ResampledParam
from ..registry import builtin
from .shape import as_resampled, mixed_along

aten = torch.ops.aten


_UPSAMPLING = (aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
               aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d,
               aten.upsample_linear1d,
               aten.upsample_bilinear2d, aten.upsample_trilinear3d, aten.upsample_bicubic2d,
               aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa)


@builtin(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
         aten.adaptive_max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
         aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, *_UPSAMPLING,
         aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d, aten.replication_pad1d,
         aten.replication_pad2d, aten.replication_pad3d, aten.max_pool2d_with_indices)
def spatial(ctx: Context, node: fx.Node):
    """The same on every channel (channels on axis 1); max pooling commutes with positive scalings only. A
    parameter interpolated (a position table resized to the input's grid) or averaged is a resampled one, the
    operation's spatial axes (its last 1, 2 or 3) mixed."""
    x = ctx.value(node.args[0], resampled=True)
    name = str(node.target.overloadpacket)
    if isinstance(x, ParamRef | ResampledParam) and "max" not in name:
        x = as_resampled(ctx, x)   # the operation's 1, 2 or 3 spatial axes are the last ones (batched or not)
        spatial = int(re.search(r"(\d)d", name).group(1))
        return None if x is None else mixed_along(x, ctx.shape(node), range(len(x.shape) - spatial, len(x.shape)))
    if not isinstance(x, Layout):
        return None
    shape = ctx.shape(node)
    if shape is None or x.simple_dim() != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} needs channels on axis 1")
    if "max" in str(node.target.overloadpacket):
        ctx.require(PositiveScales, x)
    out = x
    for d in range(2, len(shape)):
        out = L.with_non_feature_size(out, d, shape[d])
    return out


@builtin(aten.mean, aten.sum, aten.amax, aten.var, aten.std)
def reduce(ctx: Context, node: fx.Node):
    """Over non-channel axes: channels pass -- any linear map through a mean or sum, positive scalings only
    through a max or a standard deviation (max(d·x) = d·max(x) and std(d·x) = d·std(x) for d > 0 alone),
    permutations only through a variance (var(d·x) = d²·var(x): the output would need another transform);
    over all channel axes: the result is untransformed, and the sum must not see a scaling (permutations
    only)."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    dims = ctx.arg(node, 1, "dim")
    if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
        dims = list(range(x.ndim))
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else list(dims))}
    shape = ctx.shape(node)
    if shape is not None:   # the result's rank says it (var.dim takes keepdim as its fourth argument)
        keep = len(shape) == x.ndim
    else:
        keep = bool(ctx.arg(node, 2, "keepdim", False)) or node.kwargs.get("keepdim", False)
        if node.target.overloadpacket in (aten.var, aten.std):
            keep = node.kwargs.get("keepdim", False)
    fdims = set(x.feature_dims())
    if fdims <= dims:
        ctx.require(Unit, x)
        return None
    out = _reduced(x, dims, keep) if not fdims & dims else rows_reduced(ctx, node, x, dims, keep)
    if out is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} reduces over part of the channel axes")
    if node.target.overloadpacket in (aten.amax, aten.std):
        ctx.require(PositiveScales, x)
    elif node.target.overloadpacket is aten.var:
        ctx.require(Unit, x)
    return out


def rows_reduced(ctx: Context, node: fx.Node, x: Layout, dims, keep: bool) -> Layout | None:
    """x reduced over tensor axes ``dims`` that hold some of its channel axes but not all (a norm per attention
    head, ``q.pow(2).mean(-1)`` on (..., heads, width)): each row along the reduced channel axes becomes one
    channel (:func:`tie_rows`), so an element acts per row: it moves whole rows (whole heads) and scales or
    mixes them, which a sum or mean carries, as over an axis without channels. The result holds one channel
    per row; None when the rows cannot be tied."""
    out = tie_rows(ctx, node, x, dims, "reduced together")
    return out if out is None or keep else L.squeeze(out, sorted(dims))


def tie_rows(ctx: Context, node: fx.Node, x: Layout, dims, what: str) -> Layout | None:
    """Tie the channels of x that differ only along the tensor axes ``dims`` (a row: one coordinate, the same
    transform at each of its positions), as an operation over those axes alone needs (a reduction, a norm per
    head); x with ``dims`` reduced to size 1 and one channel per row, or None (nothing tied) when a channel
    axis of ``dims`` also lies in another axis, no channel axis is left, or x holds a zero or untransformed
    channel."""
    out = L.drop_feature_dims(x, dims)
    if out is None or (x.atoms < 0).any():
        return None
    faxes = {f for d in dims for _, f in x.dims[d] if f >= 0}
    ctx.tie(x, L.first_along(x, faxes), f"{ctx.describe(node)} (a row of channels {what})")
    return out


def _reduced(x: Layout, dims, keep: bool) -> Layout:
    """``x`` reduced over the axes ``dims`` (none of them with channels), kept as size 1 or squeezed."""
    out = x
    for d in sorted(dims):
        out = L.with_non_feature_size(out, d, 1)
    return out if keep else L.squeeze(out, sorted(dims))


def extreme_along(ctx: Context, node: fx.Node):
    """``max(x, dim)`` / ``min(x, dim)`` -> (values, indices) over an axis without channels: the values as
    ``amax`` (positive scalings only: max(d·x) = d·max(x) for d > 0 alone); the indices, where they are read,
    are per-channel positions that move with a permutation and not with a scale (permutations only)."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    dim = ctx.arg(node, 1, "dim") % x.ndim
    if dim in x.feature_dims():
        return ctx.unsupported(node, f"{ctx.describe(node)} reduces over a channel axis")
    ctx.require(PositiveScales, x)
    out = _reduced(x, [dim], bool(ctx.arg(node, 2, "keepdim", False)))
    indices_read = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    if indices_read:
        ctx.require(Unit, x)
    return [out, out if indices_read else None]


@builtin(aten.linalg_vector_norm, aten.norm)
def vector_norm(ctx: Context, node: fx.Node):
    """``x.norm(p, dim)`` over all channel axes (CLIP's ``embeds / embeds.norm(dim=-1, keepdim=True)``): the
    result is untransformed, and the transform must keep every p-norm (signed permutations: unit scales). Over
    part of the channels, or over axes without channels (a per-channel norm that loses the sign), not
    followed."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    dims = ctx.arg(node, 2, "dim")
    dims = set(range(x.ndim)) if dims is None or dims == [] else \
        {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    if not set(x.feature_dims()) <= dims:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a norm that does not span every channel axis")
    ctx.require(Signed, x)
    return None


@builtin(aten.softmax, aten._softmax, aten._safe_softmax, aten.log_softmax, aten._log_softmax)
def softmax(ctx: Context, node: fx.Node):
    """Along an axis without channels (attention scores over tokens): commutes with permutations only."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    if node.args[1] % x.ndim in x.feature_dims():
        return ctx.unsupported(node, f"{ctx.describe(node)}: a softmax across channels")
    ctx.require(Unit, x)
    return x
