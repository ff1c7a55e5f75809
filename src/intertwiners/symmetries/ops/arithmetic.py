"""Arithmetic outside activations: residual additions, products with parameters and gates, ``where``, ``neg``.

(Elementwise arithmetic with constants on one hidden value is an activation, claimed first by
:mod:`.activation`; these rules see the rest.)

* ``a + b`` of two hidden values ties their channels position by position (Remark 3.6);
* ``x + p`` with a per-channel parameter moves p with the channels; ``x + c`` with a constant needs A·1 = 1;
* ``x * p`` with a per-channel parameter (layer scale, a norm gain) is a gain (monomial elements only);
  by a scalar or a per-token/per-pixel factor it commutes with any linear map; by an untransformed tensor
  that varies along some channel axes (rotary cos/sin) it ties the channels along those axes;
* ``x * g`` of two hidden values (gated MLPs, squeeze-excitation): one permutation for both, the gate only
  permuted, the product carries x's transform.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .. import layout as L
from ..chains import ONE
from ..constraints import ConstantAdd, Monomial, Unit
from ..context import Context
from ..layout import FIXED, ZERO, Channels, Layout
from ..records import DerivedParam, ParamRef, ResampledParam
from ..registry import builtin
from .reduce import extreme_along
from .shape import merged_resampled, param_channels

aten = torch.ops.aten


def constant_along_channels(ctx: Context, arg, x: Layout, out_shape) -> bool:
    """Is the tensor ``arg`` (broadcast to ``out_shape``) the same for every channel of x?"""
    s = ctx.shape(arg) if isinstance(arg, fx.Node) else ()
    if s is None:
        return False
    s = (1,) * (len(out_shape) - len(s)) + tuple(s)
    return all(s[d] == 1 for d in x.feature_dims())


def _shaped(x: Layout, shape) -> Layout:
    return x if x.shape == tuple(shape) else L.broadcast_to(x, shape)


def _broadcast_rows(x: Layout, shape) -> Layout:
    """x broadcast to ``shape`` when that only adds leading dimensions or resizes axes without channels."""
    if shape is None or len(shape) < x.ndim:
        return x
    lead = len(shape) - x.ndim
    if any(shape[lead + d] != x.shape[d] for d in x.feature_dims()):
        return x
    return _shaped(x, shape)


def _unzeroed(x: Layout) -> Layout:
    """x after adding something: channels that were known to be zero no longer are."""
    return x.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms))


@builtin(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub)
def add(ctx: Context, node: fx.Node):
    a, b = ctx.value(node.args[0], resampled=True), ctx.value(node.args[1], resampled=True)
    shape = ctx.shape(node)
    if isinstance(a, Layout) and isinstance(b, Layout):
        # a value with fewer dimensions (Whisper's positions (T, C) added to (B, T, C)) is broadcast first
        x, r = (a, b) if len(a.atoms) > len(b.atoms) else (b, a)
        per_position = row_channels(x, r) if node.kwargs.get("alpha", 1) != 0 else None
        if per_position is not None:   # a statistic per row subtracted from its row (a group norm's mean)
            ctx.tie(x, per_position, f"{ctx.describe(node)} (a value per row added to its row)")
            return _unzeroed(_shaped(x, shape))
        a, b = (_broadcast_rows(v, shape) for v in (a, b))
        if not L.same_structure(a, b) or node.kwargs.get("alpha", 1) == 0:
            return ctx.unsupported(node, f"{ctx.describe(node)} adds values with different channel layouts")
        ctx.tie(a, b, f"{ctx.describe(node)}")
        atoms, chains = L.merge_tied(a, b)
        return (a if a.shape == tuple(shape) else b).derive(atoms=atoms, chains=chains)
    x, other, other_node = (a, b, node.args[1]) if isinstance(a, Layout) else (b, a, node.args[0])
    if not isinstance(x, Layout):   # two parameters added, resampled or not (SAM 2's two position tables)
        both = all(isinstance(v, ParamRef | ResampledParam) for v in (a, b)) and node.kwargs.get("alpha", 1) != 0
        return merged_resampled(ctx, [a, b], shape) if both else None
    if isinstance(other, ResampledParam):
        axes = resampled_axes(ctx, x, other, shape) if node.target.overloadpacket is not aten.rsub else None
        if axes is not None:   # a position table interpolated to the input's grid: it moves as a bias would
            for param, axis in axes:
                ctx.rows(param, axis, x)
            return _unzeroed(x)
        other = None
    if isinstance(other, ParamRef) and constant_along_channels(ctx, other_node, x, shape):
        other = None  # a parameter/buffer that is the same for every channel (an attention mask): a constant
    if isinstance(other, ParamRef):
        got = param_channels(x, other, shape)
        if got is None or node.target.overloadpacket is aten.rsub:
            return ctx.unsupported(node, f"{ctx.describe(node)} adds a parameter that is not per-channel")
        ctx.rows(other, None, got)
        return _unzeroed(x)
    if isinstance(other, int | float):
        if other == 0:
            return x
        ctx.require(ConstantAdd, x)
        return _unzeroed(x)
    if other is None and constant_along_channels(ctx, other_node, x, shape):
        ctx.require(ConstantAdd, x)
        return _unzeroed(_shaped(x, shape))
    # (e.g. ALiBi on written-out attention scores): x's channels stay in place, and the sum keeps their layout so
    # that what follows (p @ v) still sees whose channels they are
    ctx.pin(x, f"{ctx.describe(node)} adds an untransformed tensor that varies across channels")
    ctx.pin_side(x, node)
    return _unzeroed(_shaped(x, shape))


def resampled_axes(ctx: Context, x: Layout, r: ResampledParam, out_shape) -> list | None:
    """Where a resampled ``r`` added to x moves with x's channels: [(parameter, its axis), ...] when x's channels
    lie in order on one axis where r (broadcast against x) keeps an axis of each of its parameters at full
    size; None otherwise."""
    d = x.simple_dim()
    k = None if d is None else d - (x.ndim - len(r.shape))
    if k is None or k < 0 or tuple(out_shape or ()) != x.shape or r.kept[k] is None or r.shape[k] != x.shape[d]:
        return None
    return [(ParamRef(n, tuple(ctx.captured.tensors[n].shape)), axis) for n, axis in zip(r.names, r.kept[k])]


@builtin(aten.mul, aten.mul_, aten.div, aten.div_)
def mul(ctx: Context, node: fx.Node):
    a, b = ctx.value(node.args[0]), ctx.value(node.args[1])
    shape = ctx.shape(node)
    div = node.target.overloadpacket in (aten.div, aten.div_)
    if isinstance(a, Layout) and isinstance(b, Layout):
        gates = [(x, g) for x, g in ((a, b), (b, a)) if not div and _per_position(x, g, shape)]
        if gates:
            # a gate broadcast across every channel axis of x: a factor per token (Qwen2-MoE's
            # sigmoid(shared_expert_gate(h))) or per token and stream (hyper-connections' weights (B, T, n, 1)
            # times the streams (B, T, n, d)), the same for every channel of x. Its units stay untransformed
            # (the smaller of the two when each is broadcast across the other's channels: an outer product)
            x, g = min(gates, key=lambda xg: len(xg[1].atoms))
            unit = "one-unit " if len(g.atoms) == 1 else ""
            ctx.pin(g, f"{ctx.describe(node)}: a {unit}gate broadcast across the channels it scales")
            return _shaped(x, shape)
        if not L.same_structure(a, b):
            return broadcast_gate(ctx, node, a, b, shape, div)
        if div:
            return ctx.unsupported(node, f"{ctx.describe(node)} divides two hidden values")
        return gate(ctx, node, a, b, shape)
    x, other, other_node = (a, b, node.args[1]) if isinstance(a, Layout) else (b, a, node.args[0])
    if not isinstance(x, Layout):
        return None
    if div and x is not a:
        return ctx.unsupported(node, f"{ctx.describe(node)} divides by a hidden value")
    if isinstance(other, int | float):
        return x if other != 0 else ctx.unsupported(node, "multiplication by zero")
    if isinstance(other, ParamRef | DerivedParam) and constant_along_channels(ctx, other_node, x, shape):
        return _shaped(x, shape)  # a scalar (or per-token) parameter/buffer: commutes with any linear map
    if isinstance(other, ParamRef | DerivedParam):
        got = param_channels(x, other, shape)
        if got is None and coarsen(ctx, x, other_node, shape):
            # a gain shared along some channel axes (a per-head norm's gain, the same for every head): read
            # untransformed, as a constant that varies along the others
            return _shaped(x, shape)
        if got is None or div:
            return ctx.unsupported(node, f"{ctx.describe(node)} multiplies by a parameter that is not per-channel")
        ctx.require(Monomial, x)
        ctx.gain(other, None, got, got)
        return _shaped(x, shape)
    if other is None and constant_along_channels(ctx, other_node, x, shape):
        return _shaped(x, shape)  # a per-token/per-pixel factor (RMSNorm's 1/rms) commutes with any linear map
    if other is None and not div and coarsen(ctx, x, other_node, shape):
        return _shaped(x, shape)
    return ctx.unsupported(node, f"{ctx.describe(node)} multiplies by a tensor that varies across channels")


def _per_position(x: Layout, g: Layout, shape) -> bool:
    """Is g broadcast along every channel axis of x (a factor per token/pixel, or per token and stream, the
    same for all of x's channels)?"""
    if len(x.atoms) == 1 or shape is None or x.ndim > len(shape) or g.ndim > len(shape):
        return False
    gs = (1,) * (len(shape) - g.ndim) + tuple(g.shape)
    xd = [d + len(shape) - x.ndim for d in x.feature_dims()]
    return all(gs[d] == 1 for d in xd)


def coarsen(ctx: Context, x: Layout, other_node, shape) -> bool:
    """x * c with c untransformed and varying along some channel axes V (rotary embeddings: cos/sin vary along
    the head width, not across heads): the transform must act alike at every V coordinate. Tie the channels
    that differ only in their V coordinates (then a space element acts per remaining coordinate, e.g. one
    scalar per head, and commutes with c). False when c is not of that form."""
    s = ctx.shape(other_node)
    if s is None or shape is None or x.ndim != len(shape):   # x's axes are the result's
        return False
    s = (1,) * (len(shape) - len(s)) + tuple(s)
    varying = set()
    for d in x.feature_dims():
        if s[d] > 1:   # every channel axis this dimension holds (an interleaved pair merged back: two)
            varying |= {f for _, f in x.dims[d] if f >= 0}
    if not varying:
        return False
    if len(varying) == len(x.fsizes):   # c varies along every channel: only a scalar multiple of I commutes
        ctx.atoms.union_arrays(x.atoms, np.full_like(x.atoms, x.atoms[0]), 0,
                               f"{ctx.describe(other_node)} (channels tied by a factor that varies along all of them)")
        return True
    A = x.atoms.reshape(x.fsizes)
    idx = tuple(slice(0, 1) if f in varying else slice(None) for f in range(len(x.fsizes)))
    base = np.broadcast_to(A[idx], A.shape)
    ctx.atoms.union_arrays(A.reshape(-1), base.reshape(-1), 0, f"{ctx.describe(other_node)} (channels tied by a "
                                                               "factor that varies along them)")
    return True


def row_channels(x: Layout, r: Layout) -> Channels | None:
    """When ``r`` is ``x`` broadcast along some of x's channel axes (a per-head statistic (..., heads, 1) of
    (..., heads, width), leading axes may be missing): r's channel at every position of x (feature order), the
    row each position lies in; None when r is not of that form or either holds a zero or untransformed
    channel."""
    lead = x.ndim - r.ndim
    if lead < 0 or (x.atoms < 0).any() or (r.atoms < 0).any():
        return None
    rs = (1,) * lead + tuple(r.shape)
    across = [d for d in x.feature_dims() if rs[d] == 1]
    rows = L.drop_feature_dims(x, across) if across else None
    for _ in range(lead):
        r = L.unsqueeze(r, 0)
    if rows is None or not L.same_structure(rows, r):
        return None
    gone = {f for d in across for _, f in x.dims[d] if f >= 0}
    index = np.arange(len(rows.atoms)).reshape(rows.fsizes)
    index = np.expand_dims(index, sorted(gone)) if gone else index
    index = np.broadcast_to(index, x.fsizes).reshape(-1)
    return Channels(r.atoms[index], r.chains[index])


def broadcast_gate(ctx: Context, node: fx.Node, a: Layout, b: Layout, shape, div: bool = False):
    """x * g (or x / g) with g broadcast along some of x's channel axes (a per-head norm's ``1/rms`` (..., heads,
    1) times the queries (..., heads, width)): x's channels along those axes are tied to g's channel of their
    row, one coordinate per row, which gates it (:func:`gate`: one permutation for both, g only permuted, the
    product or quotient carries x's transform)."""
    x, g = (a, b) if len(a.atoms) > len(b.atoms) else (b, a)
    per_position = row_channels(x, g)
    if per_position is None or (div and x is not a):
        return ctx.unsupported(node, f"{ctx.describe(node)} multiplies hidden values with different channel layouts")
    ctx.atoms.union_arrays(x.atoms, per_position.atoms, 0, f"{ctx.describe(node)} (channels scaled by one gate)")
    ctx.require(Unit, g)
    ctx.require(Monomial, x)
    return _shaped(x, shape)


def gate(ctx: Context, node: fx.Node, a: Layout, b: Layout, shape):
    """x * g with both hidden (gated MLPs, squeeze-excitation): one permutation for both; the gate must carry
    no scaling, the product carries x's transform."""
    if not L.same_structure(a, b):
        return ctx.unsupported(node, f"{ctx.describe(node)} multiplies hidden values with different channel layouts")
    na, nb = int(np.prod(a.shape)), int(np.prod(b.shape))
    a_one, b_one = (all(ctx.chain(c)[:1] == (ONE,) for c in np.unique(v.chains).tolist()) for v in (a, b))
    if na != nb:
        x, g = (a, b) if na > nb else (b, a)
    elif a_one != b_one:  # the unscaled gate branch (see activation.feeds_only_gate) is g
        x, g = (b, a) if a_one else (a, b)
    else:
        x, g = (a, b) if len(ctx.chain(b.chains[0])) >= len(ctx.chain(a.chains[0])) else (b, a)
    ctx.atoms.union_arrays(x.atoms, g.atoms, 0, f"{ctx.describe(node)} (product of two hidden values)")
    ctx.require(Unit, g)
    ctx.require(Monomial, x)
    return _shaped(x, shape).derive(atoms=np.where((x.atoms == ZERO) | (g.atoms == ZERO), ZERO,
                                                   np.where(x.atoms >= 0, x.atoms, g.atoms)))


@builtin(aten.where)
def where(ctx: Context, node: fx.Node):
    """where(mask, x, c) with a mask and a value c that are the same for every channel (a causal mask written
    with ``torch.where``): channels pass; c is not scaled, so permutations only."""
    if len(node.args) != 3:
        return ctx.unsupported(node)
    cond, a, b = (ctx.value(v) for v in node.args)
    shape = ctx.shape(node)
    if isinstance(cond, Layout) or (isinstance(a, Layout) == isinstance(b, Layout)) or shape is None:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a selection between values with channels")
    x, other = (a, node.args[2]) if isinstance(a, Layout) else (b, node.args[1])
    for arg in (node.args[0], other):
        if isinstance(arg, fx.Node) and not constant_along_channels(ctx, arg, x, shape):
            return ctx.unsupported(node, f"{ctx.describe(node)}: a mask or value that varies across channels")
    ctx.require(Unit, x)
    return _shaped(x, shape)


@builtin(aten.masked_fill, aten.masked_fill_)
def masked_fill(ctx: Context, node: fx.Node):
    """x.masked_fill(mask, c) with a mask that is the same for every channel (a causal mask on attention scores,
    MPT): channels pass; c is not scaled, so permutations only."""
    x, mask = ctx.value(node.args[0]), ctx.value(node.args[1])
    shape = ctx.shape(node)
    if not isinstance(x, Layout):
        return None
    fill = node.args[2] if len(node.args) > 2 else None
    if isinstance(mask, Layout) or shape is None or not constant_along_channels(ctx, node.args[1], x, shape) \
            or (isinstance(fill, fx.Node) and not constant_along_channels(ctx, fill, x, shape)):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a mask or value that varies across channels")
    ctx.require(Unit, x)
    return _unzeroed(_shaped(x, shape))


@builtin(aten.maximum, aten.minimum, aten.max, aten.min, aten.fmax, aten.fmin)
def extremum(ctx: Context, node: fx.Node):
    """max(x, c) / min(x, c) elementwise with a tensor c that is the same for every channel (XGLM floors its
    attention scores at the dtype's minimum with a 0-d tensor): channels pass; c is not scaled, so
    permutations only. ``max(x, dim)`` / ``min(x, dim)``: a reduction (:func:`.reduce.extreme_along`).
    ``max(x)`` over everything and extremes of two hidden values pin."""
    if node.target in (aten.max.dim, aten.min.dim):
        return extreme_along(ctx, node)
    if len(node.args) != 2 or not isinstance(node.args[1], fx.Node):
        return ctx.unsupported(node)
    a, b = ctx.value(node.args[0]), ctx.value(node.args[1])
    shape = ctx.shape(node)
    if isinstance(a, Layout) == isinstance(b, Layout) or shape is None:
        return ctx.unsupported(node, f"{ctx.describe(node)}: an extreme of two values with channels")
    x, other = (a, node.args[1]) if isinstance(a, Layout) else (b, node.args[0])
    if isinstance(ctx.value(other), ParamRef | DerivedParam) or not constant_along_channels(ctx, other, x, shape):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a bound that varies across channels")
    ctx.require(Unit, x)
    return _unzeroed(_shaped(x, shape))


@builtin(aten.clamp)
def clamp(ctx: Context, node: fx.Node):
    """``clamp(x, lo, hi)`` with tensor bounds (a clamp with number bounds is an activation): bounds that are the
    same for every channel (timm's Gemma 4 vision encoder clamps between two 0-d buffers) pass the channels,
    and since a bound is not scaled, for any values the bounds may take: permutations only. Bounds that vary
    across channels pin."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    shape = ctx.shape(node)
    bounds = [ctx.arg(node, i, name) for i, name in ((1, "min"), (2, "max"))]
    for b in bounds:
        if isinstance(b, fx.Node) and (isinstance(ctx.value(b), Layout) or shape is None
                                       or not constant_along_channels(ctx, b, x, shape)):
            return ctx.unsupported(node, f"{ctx.describe(node)}: a bound that varies across channels")
    ctx.require(Unit, x)
    return _unzeroed(_shaped(x, shape))


@builtin(aten.neg)
def neg(ctx: Context, node: fx.Node):
    """-x commutes with every linear map."""
    x = ctx.value(node.args[0])
    return x if isinstance(x, Layout) else None
