"""Normalisations: batch norm, layer norm and group norm over the channel axis (instance norm is pinned), and
weight normalisation of a layer's weight (``torch._weight_norm``) and weight standardisation (batch norm of a
reshaped weight in train mode).

Batch norm: BN'(P s x) = P t BN(x) in train and eval mode with gamma' = P t/s gamma, beta' = P t beta,
running_mean' = P s mean, running_var' = P var, where s (the input's scale) must be ±1 because BN divides
by sqrt(var + eps). Layer norm over the channel axis commutes with permutations only; gamma and beta are
permuted and may absorb a scaling of the output.

A layer norm or RMS norm over the last axis when other axes hold channels too (queries normalised per attention
head, over each head's width, with a gain shared by the heads) normalises each row on its own: the row's
channels become one coordinate, the gain and bias are read untransformed, and the rows may be permuted and,
for an odd norm (no bias), negated.

Group norm with G groups of k = C/G channels normalises each group by its own mean and variance: a permutation
that keeps every channel in its group leaves the statistics unchanged, as does a common sign flip of a group
(mean -> -mean, variance unchanged). With k = 1 (one channel per group, wav2vec2's first convolution) this is
batch norm's group: signed permutations of all channels. With k > 1 each group is a space of its own with
permutations (per-channel signs, any scale and permutations of whole groups would change or are not
represented: a smaller group than the true one, never a larger one).

Weight normalisation ``w = g · v / ||v||`` (the norm over every axis but ``dim``): a layer whose weight is
moved w -> T w S^-1 is reproduced by moving v and g, when the norms ``||v||`` do not change, that is when the
transform on every axis that the norm runs over is orthogonal. With the norm per output row (``dim`` = 0): v's
rows are permuted, g takes the output's scaling (g -> T g), the input transform S must be a signed
permutation. With the norm over output rows too (``dim`` a kernel axis, or -1: the whole tensor): T and S are
signed permutations, g does not move.

Weight standardisation ``gain · (w - mean) / sqrt(var + eps) + bias`` per output row of w (timm's ``StdConv2d``
and ``ScaledStdConv2d`` write it as batch norm in train mode of ``w.reshape(1, out, -1)``): a row's mean and
variance stay when its elements are permuted and change under any other map of them (a scaling changes the
row's statistics relative to ``eps``, a sign or a mixture changes its mean). So the layer's input transform S
must be a permutation (w's columns permuted). Its output transform T = P·D: with a gain that scales (a
parameter, or a parameter times constants as timm's ``gain * scale``), D is carried by the gain and the bias
(w's rows only permuted); without one, D must be ±1, carried by w's rows (negating a row negates its
standardised row exactly).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .. import layout as L
from ..chains import ONE
from ..constraints import Monomial, Signed, Unit
from ..context import Context
from ..layout import FIXED, ZERO, Channels, Layout
from ..records import DerivedParam, NormedWeight, ParamRef, StandardizedWeight
from ..registry import builtin
from .reduce import tie_rows
from .shape import table_rows, whole_table

aten = torch.ops.aten


def _output(ctx: Context, x: Layout, affine: bool) -> Layout:
    """The normalised value: zero channels are no longer zero; with an affine gain, a value that was only
    permuted (a convolution feeding the norm) may carry a scaling again."""
    one = ctx.chain_id((ONE,))
    chains = np.zeros_like(x.chains) if affine and bool(np.all(x.chains == one)) else x.chains
    return ctx.keep(x.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms), chains=chains))


def _affine(ctx: Context, node: fx.Node, x: Layout, w_arg, b_arg, axis: int | None = None) -> Layout | None:
    """The normalised value of ``x`` with the norm's affine step: gamma (argument ``w_arg``) a gain from ``x`` to
    the output, beta (``b_arg``) rows of the output (either may be absent). ``axis``: the tensor axis holding every
    channel, read position by position (its channel axes need not be in order: Swin's patch merging flattens
    (2, 2, C) after a permute); None: channels in order. A gain that is a function of a parameter (Nemotron's
    ``1 + w``) is a gain through it when it scales with it, else only permuted (the output then carries the
    input's transform). A gain or bias that is no parameter (nor such a function, a bias one that scales with it)
    would stay while the channels move: unsupported (None). Returns the output's layout."""
    w, b = ctx.value(w_arg), ctx.value(b_arg)
    if any(a is not None and not isinstance(v, ParamRef | DerivedParam) for a, v in ((w_arg, w), (b_arg, b))) \
            or (isinstance(b, DerivedParam) and not b.scales):
        return ctx.unsupported(node, f"{ctx.describe(node)} has a gain or bias that is no parameter")
    scaling = isinstance(w, ParamRef) or (isinstance(w, DerivedParam) and w.scales)
    out = _output(ctx, x, scaling)
    if axis is not None:
        (a_in, c_in), (a_out, c_out) = L.atoms_along(x, [axis]), L.atoms_along(out, [axis])
        x_ch, out_ch = Channels(a_in, c_in), Channels(a_out, c_out)
    else:
        x_ch, out_ch = x, out
    if scaling:
        ctx.gain(w, 0, out_ch, x_ch)
    elif isinstance(w, DerivedParam):
        ctx.permuted(w, 0, out_ch)
    if b is not None:
        ctx.rows(b, 0, out_ch)
    return out


def _over_all_channels(x: Layout) -> int | None:
    """The last axis when it holds every channel axis of x (in any order), else None."""
    return x.ndim - 1 if x.feature_dims() == [x.ndim - 1] else None


@builtin(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
         aten.native_batch_norm, aten.instance_norm)
def batch_norm(ctx: Context, node: fx.Node):
    """Channels pass; gamma is a gain, beta rows, the running mean rows of the input, the variance permuted. A
    parameter normalised in train mode without running statistics is a standardised weight (:func:`standardized`)."""
    x = ctx.value(node.args[0])
    if isinstance(x, ParamRef):
        return standardized(ctx, node, x)
    if not isinstance(x, Layout):
        return None
    if node.target.overloadpacket is aten.instance_norm:
        return ctx.unsupported(node, f"{ctx.describe(node)}: instance norm is not supported")
    mean, var = (ctx.value(a) for a in node.args[3:5])
    if x.simple_dim() != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axis")
    ctx.require(Signed, x)
    out = _affine(ctx, node, x, node.args[1], node.args[2])
    if out is None:
        return None
    if isinstance(mean, ParamRef):
        ctx.rows(mean, 0, x)
    if isinstance(var, ParamRef):
        ctx.permuted(var, 0, x)
    if node.target.overloadpacket is not aten.batch_norm:
        return ctx.unsupported(node, f"{ctx.describe(node)} returns several values")
    return out


@builtin(aten.layer_norm, aten.native_layer_norm)
def layer_norm(ctx: Context, node: fx.Node):
    """Over exactly the channel axis: permutations only (gamma a gain, beta rows). A whole 2-D parameter
    normalised over its rows (DeBERTa v2's relative-position table) is read as an embedding of all its rows."""
    x = ctx.value(node.args[0])
    if whole_table(ctx, x):
        x = table_rows(ctx, ctx.shape(node.args[0]), x)
    if not isinstance(x, Layout):
        return None
    if len(node.args[1]) == 1 and _over_all_channels(x) is None:   # a norm per head (timm's qk_norm)
        out = per_row(ctx, node, x)
        if out is not None:   # LN(-x) = -LN(x), LN(-x) + beta does not
            ctx.require(Unit if ctx.arg(node, 3, "bias") is not None else Signed, x)
    elif len(node.args[1]) == 1:
        ctx.require(Unit, x)
        out = _affine(ctx, node, x, ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias"), _over_all_channels(x))
        if out is None:
            return None
    else:
        out = None
    if out is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not normalise exactly the channel axis")
    if node.target.overloadpacket is aten.native_layer_norm:
        return ctx.unsupported(node, f"{ctx.describe(node)} returns several values")
    return out


@builtin(aten.rms_norm)
def rms_norm(ctx: Context, node: fx.Node):
    """``F.rms_norm`` / ``nn.RMSNorm`` over exactly the channel axis, ``w · x / sqrt(mean(x²) + eps)``: the mean
    square keeps its value under signed permutations only (a scaling of a channel changes it; eps keeps even a
    common scale from cancelling), so the input's transform is a signed permutation, which the output carries;
    gamma is a gain (permuted with the channels)."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    out = None
    if len(node.args[1]) == 1:
        last = _over_all_channels(x)
        if last is not None:
            out = _affine(ctx, node, x, ctx.arg(node, 2, "weight"), None, last)
            if out is None:
                return None
        else:
            out = per_row(ctx, node, x)
    if out is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not normalise exactly the channel axis")
    ctx.require(Signed, x)
    return out


def per_row(ctx: Context, node: fx.Node, x: Layout) -> Layout | None:
    """A norm over the last axis of x when that axis holds some of its channel axes and other axes the rest (a
    norm per attention head over the head's width, Qwen3's and timm's ``qk_norm``): each row is normalised on
    its own, with a gain (and bias) shared by all rows. Its channels are tied into one coordinate (as a
    reduction over them, :func:`~.reduce.tie_rows`), so an element moves whole rows and scales them; the
    gain and bias do not move (they are read untransformed) and the caller states which scales the norm
    lets through (signs: it is odd; none with a bias). The output carries x's transform; None when the rows
    cannot be tied."""
    last = x.ndim - 1
    if last not in x.feature_dims() or tie_rows(ctx, node, x, [last], "normalised together") is None:
        return None
    return _output(ctx, x, False)


@builtin(aten.group_norm)
def group_norm(ctx: Context, node: fx.Node):
    """Over groups of k channels: k = 1 signed permutations (batch norm's group), k > 1 permutations within
    each group (a space per group); gamma a gain, beta rows."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    groups = node.args[1]
    w_arg, b_arg = ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")
    if x.simple_dim() != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axis")
    k = x.shape[1] // groups
    if k == 1:
        ctx.require(Signed, x)
        return _affine(ctx, node, x, w_arg, b_arg)
    blocks = [slice(g * k, (g + 1) * k) for g in range(groups)]
    owner = np.concatenate([np.full(k, g) for g in range(groups)])
    moving = x.atoms >= 0
    pairs = np.unique(np.stack([x.atoms[moving], owner[moving]], 1), axis=0)
    if len(np.unique(pairs[:, 0])) != len(pairs):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a channel appears in two of its groups")
    ctx.require(Unit, x)
    for blk in blocks:   # channels stay within their group: one value per group
        ctx.keep(L.simple(x.atoms[blk], x.chains[blk], (k,), 0))
    return _affine(ctx, node, x, w_arg, b_arg)


@builtin(aten.native_group_norm)
def native_group_norm(ctx: Context, node: fx.Node):
    return ctx.unsupported(node, f"{ctx.describe(node)}: native_group_norm (several outputs) is not supported")


@builtin(aten._weight_norm)
def weight_norm(ctx: Context, node: fx.Node):
    """``g · v / ||v||`` of two parameters, read by one linear layer or convolution: a :class:`NormedWeight`
    (the layer moves v and g, :func:`normed_weight`). Anything else: an untransformed tensor, and v and g are
    recorded as used untransformed on every axis (so another use cannot move them)."""
    v, g, dim = ctx.value(node.args[0]), ctx.value(node.args[1]), ctx.arg(node, 2, "dim", 0)
    users = list(node.users)
    layer = (aten.linear, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
    if not (isinstance(v, ParamRef) and isinstance(g, ParamRef)) or len(v.shape) < 2 or len(users) != 1 \
            or getattr(users[0].target, "overloadpacket", None) not in layer or users[0].args[1] is not node:
        for p in (v, g):   # read untransformed: a layer that also reads v and g must not move them either
            if isinstance(p, ParamRef):
                for d, n in enumerate(p.shape):
                    ctx.rows(p, d, Channels.fixed(n))
        return None
    return NormedWeight(v, g, dim if dim == -1 else dim % len(v.shape), tuple(v.shape))


def normed_weight(ctx: Context, w: NormedWeight, w_out: int, w_in: int, out: Layout,
                  inp: Channels, groups: int = 1) -> None:
    """Record how a layer's weight-normalised weight ``w`` moves when the layer's output channels ``out``
    (weight axis ``w_out``) carry T and its input channels ``inp`` (axis ``w_in``) carry S: w -> T w S^-1
    through v and g, with T and S restricted to the transforms that keep ``||v||`` (module docstring)."""
    if w.dim == w_out:
        ctx.require(Monomial, out)
        ctx.permuted(w.v, w_out, out)   # v's rows only permuted: their norms stay
        ctx.rows(w.g, w_out, out)       # the magnitude takes T's scaling (and sign)
    else:   # the norm runs over the output rows too (the layer refuses a norm per input channel)
        ctx.require(Signed, out)
        ctx.rows(w.v, w_out, out)
    ctx.require(Signed, inp)
    ctx.columns(w.v, w_in, inp, groups)


def standardized(ctx: Context, node: fx.Node, x: ParamRef) -> StandardizedWeight | None:
    """``F.batch_norm(w.reshape(1, out, -1), None, None, gain, bias, training=True)`` of a parameter w (out, ...):
    w standardised row by row, a :class:`StandardizedWeight` for the layer that reads it. Anything else
    (running statistics, eval mode, another shape, a gain or bias that is not a parameter): None, an
    untransformed tensor (the parameters it reads are then recorded as read untransformed)."""
    full = ctx.captured.tensors.get(x.name)
    if node.target.overloadpacket is not aten.batch_norm or full is None or full.dim() < 2 \
            or tuple(x.shape) != (1, full.shape[0], full[0].numel()) or ctx.arg(node, 3, "running_mean") is not None \
            or ctx.arg(node, 4, "running_var") is not None or not ctx.arg(node, 5, "training", False):
        return None
    n = full.shape[0]
    parts = []
    for i, name in ((1, "weight"), (2, "bias")):
        arg = ctx.arg(node, i, name)
        v = ctx.value(arg)
        if arg is None:
            parts.append(None)
        elif isinstance(v, ParamRef | DerivedParam) and int(np.prod(v.shape)) == n \
                and (i == 1 or isinstance(v, ParamRef) or v.scales):
            parts.append(v)
        else:
            return None
    return StandardizedWeight(ParamRef(x.name, tuple(full.shape)), parts[0], parts[1], tuple(x.shape))


def standardized_weight(ctx: Context, w: StandardizedWeight, out: Layout, inp: Channels, groups: int = 1) -> None:
    """Record how a layer's standardised weight ``w`` (output rows on axis 0, input channels on axis 1) moves when
    the layer's output channels ``out`` carry T and its input channels ``inp`` carry S: w -> T w S^-1 through the
    raw weight, the gain and the bias, with S a permutation and T's scaling on the gain (module docstring)."""
    gain = w.gain
    if gain is not None and (isinstance(gain, ParamRef) or gain.scales):
        ctx.require(Monomial, out)
        ctx.permuted(w.w, 0, out)       # the rows only permuted: their statistics stay
        ctx.rows(gain, _axis(ctx, gain), out)   # the gain takes T's scaling (and sign)
    else:
        ctx.require(Signed, out)
        ctx.rows(w.w, 0, out)           # a sign of T negates the row, and its standardised row
        if gain is not None:            # f(g) of a gain that does not scale with g (1 + g): permuted only
            ctx.permuted(gain, _axis(ctx, gain), out)
    if w.bias is not None:
        ctx.rows(w.bias, _axis(ctx, w.bias), out)
    ctx.require(Unit, inp)              # a permutation of a row's elements keeps its mean and variance
    ctx.columns(w.w, 1, inp, groups)


def _axis(ctx: Context, p: ParamRef | DerivedParam) -> int | None:
    """The axis of parameter ``p`` (its own tensor) that holds its elements when all others have size 1 (timm's
    gain (out, 1, 1, 1)): 0; else None (the flattened tensor), so that other uses of it along that axis are tied."""
    full = ctx.captured.tensors.get(p.name)
    return 0 if full is not None and full.dim() >= 1 and full.shape[0] == full.numel() else None
