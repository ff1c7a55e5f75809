"""Linear maps with a weight: ``linear``, ``addmm``, ``matmul``/``mm``/``bmm`` by a parameter, ``einsum``,
convolutions, embeddings (``embedding``, or a table indexed with ``index``/``index_select``), ``gather`` along
an axis without channels. A weight-normalised weight moves through its direction and magnitude, a standardised
weight through its raw weight and gain (:mod:`.norm`).

A producer makes new channels (the rows of W and b move with them, t -> T t); its input channels are W's
columns (w -> w T^-1). A convolution with ``groups == channels`` (depthwise) keeps each channel's identity
(its filter is a per-channel gain); a grouped one keeps channels within their group. A linear layer over an
axis without channels (MLP-Mixer's token mixing) makes *side* units (:class:`~..layout.Side`) when it feeds
an activation, and consumes them as its input columns.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.fx as fx

from .. import layout as L
from ..constraints import ConstantAdd, Monomial
from ..context import Context
from ..layout import FIXED, ZERO, Channels, Layout, Side
from ..records import (
    ConcatParam,
    GatheredParam,
    NormedWeight,
    ParamRef,
    ResampledParam,
    SlicedParam,
    StandardizedWeight,
)
from ..registry import builtin
from .activation import feeds_activation, feeds_only_gate
from .arithmetic import constant_along_channels
from .attention import batched_attention_product, weights_times_values
from .norm import normed_weight, standardized_weight
from .shape import as_resampled, own_parameter, table_rows, whole_table

aten = torch.ops.aten


def _feeds_only_norm(node: fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and getattr(users[0].target, "overloadpacket", None) is aten.batch_norm \
        and isinstance(users[0].args[1], fx.Node)


def producer(ctx: Context, node: fx.Node, x, weight: ParamRef | SlicedParam | NormedWeight | StandardizedWeight, bias,
             out_dim: int, w_out: int, w_in: int, in_dim: int | None, groups: int = 1):
    """New channels on ``out_dim`` of the output: rows of ``weight`` (dim ``w_out``) and ``bias``; columns
    (dim ``w_in``) read x's channels on ``in_dim``. A weight-normalised weight moves through its direction and
    magnitude (:func:`~.norm.normed_weight`), a standardised one through its raw weight and gain
    (:func:`~.norm.standardized_weight`)."""
    shape = ctx.shape(node)
    if isinstance(weight, NormedWeight) and weight.dim == w_in:
        return ctx.unsupported(node, f"{ctx.describe(node)}: weight normalisation per input channel is not "
                                     "supported")
    if isinstance(weight, StandardizedWeight) and ((w_out, w_in) != (0, 1) or weight.shape != weight.w.shape):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a standardised weight read in another shape than "
                                     "its own")
    unscaled = _feeds_only_norm(node) or feeds_only_gate(ctx, node)
    n_in = weight.shape[w_in] * groups
    if isinstance(x, Layout):
        got = L.atoms_along(x, [in_dim])
        if got is None or len(got[0]) != n_in:
            return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axis of its input")
        inp = Channels(*got)
    else:
        inp = Channels.fixed(n_in)
    if groups > 1:
        # grouped convolution: channels stay within their group (one value per group, both sides)
        ci = n_in // groups
        for g in range(groups):
            ctx.keep(L.simple(inp.atoms[g * ci:(g + 1) * ci], inp.chains[g * ci:(g + 1) * ci], (ci,), 0))
    out = ctx.fresh(shape, out_dim, unscaled=unscaled)
    if groups > 1:
        co = shape[out_dim] // groups
        for g in range(groups):
            ctx.keep(L.simple(out.atoms[g * co:(g + 1) * co], out.chains[g * co:(g + 1) * co], (co,), 0))
    if isinstance(weight, NormedWeight):
        normed_weight(ctx, weight, w_out, w_in, out, inp, groups)
    elif isinstance(weight, StandardizedWeight):
        standardized_weight(ctx, weight, out, inp, groups)
    else:
        ctx.rows(weight, w_out, out)
        ctx.columns(weight, w_in, inp, groups)
    _bias_rows(ctx, node, bias, out)
    return out


def bias_value(ctx: Context, arg):
    """What a layer's bias argument holds: None when there is no bias, the argument node itself when it is an
    untransformed tensor (which must not be read as "no bias"), else its value."""
    value = ctx.value(arg)
    return arg if value is None and isinstance(arg, fx.Node) else value


def _bias_rows(ctx: Context, node: fx.Node, bias, out: Layout) -> None:
    """The bias moves with the new channels: t -> T t. Concatenated biases: each slice of the channels is held
    apart (a value of its own, so no space spans two parts and T acts on each part alone), a parameter part
    moves with its slice, a zero part stays zero. Any other bias (a function of a parameter, a computed
    tensor) cannot move: the new channels would need T b = b for an unknown b, so they are pinned (the
    layer's input columns still move with its input)."""
    if bias is None:
        return
    if isinstance(bias, ParamRef | SlicedParam):
        ctx.rows(bias, 0, out)
    elif isinstance(bias, ConcatParam):
        for part, start, n in bias.parts:
            atoms, chains = out.atoms[start:start + n], out.chains[start:start + n]
            ctx.keep(L.simple(atoms, chains, (n,), 0))
            if part is not None:
                ctx.rows(part, 0, Channels(atoms, chains))
    else:
        ctx.pin(out, f"{ctx.describe(node)} has a bias that is not a parameter")


@builtin(aten.linear, side_aware=True)
def linear(ctx: Context, node: fx.Node):
    """y = x W^T + b: rows of W (and b) follow the new channels, columns the input's. Over an axis without
    channels (token mixing) channels pass, and the units the layer makes for an activation are a side axis."""
    x, w, b = ctx.value(node.args[0]), ctx.value(node.args[1]), bias_value(ctx, ctx.arg(node, 2, "bias"))
    if not isinstance(w, ParamRef | SlicedParam | NormedWeight | StandardizedWeight) or len(w.shape) != 2:
        return ctx.unsupported(node, f"{ctx.describe(node)} with a weight that is not a parameter")
    if whole_table(ctx, x):   # a table read whole as the input (DeBERTa v2's relative-position embeddings)
        x = table_rows(ctx, ctx.shape(node.args[0]), x)
    shape = ctx.shape(node)
    if isinstance(w, NormedWeight | StandardizedWeight) and isinstance(x, Layout) \
            and (x.side is not None or (x.ndim - 1) not in x.feature_dims()):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a weight-normalised or standardised layer over hidden "
                                     "units or a non-channel axis is not supported")
    if isinstance(x, Layout) and x.side is not None:
        side, x = x.side, x.derive(side=None)
        if side.dim == x.ndim - 1 and w.shape[1] == len(side.atoms):
            ctx.columns(w, 1, Channels(side.atoms, side.chains))   # consumed: the layer's input columns
        else:
            ctx.pin(Channels(side.atoms, side.chains), f"{ctx.describe(node)} reads hidden units along a "
                                                       "non-channel axis")
    if isinstance(x, Layout) and (x.ndim - 1) not in x.feature_dims():
        # token mixing (MLP-Mixer): the same map for every channel; its bias is the same for every channel
        if b is not None:
            ctx.require(ConstantAdd, x)
        side = None
        if feeds_activation(ctx, node) and (b is None or isinstance(b, ParamRef)):
            n = shape[-1]
            units = ctx.fresh((n,), 0)
            ctx.rows(w, 0, units)
            if isinstance(b, ParamRef):
                ctx.rows(b, 0, units)
            side = Side(len(shape) - 1, units.atoms, units.chains)
        return L.with_non_feature_size(x, x.ndim - 1, shape[-1]).derive(side=side)
    return producer(ctx, node, x, w, b, len(shape) - 1, 0, 1, (x.ndim - 1) if isinstance(x, Layout) else None)


@builtin(aten.addmm)
def addmm(ctx: Context, node: fx.Node):
    """transformers' Conv1D: b + x @ W with W of shape (in, out); also b + x @ W.T with W (out, in)."""
    b, x, w = bias_value(ctx, node.args[0]), ctx.value(node.args[1]), ctx.value(node.args[2])
    wt = transposed_param(ctx, node.args[2])
    if (wt is None and not isinstance(w, ParamRef)) or node.kwargs.get("beta", 1) != 1 \
            or node.kwargs.get("alpha", 1) != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} with a weight that is not a parameter")
    if wt is not None:   # b + x @ W.T with W (out, in)
        return producer(ctx, node, x, wt, b, 1, 0, 1, 1 if isinstance(x, Layout) else None)
    return producer(ctx, node, x, w, b, 1, 1, 0, 1 if isinstance(x, Layout) else None)


@builtin(aten.matmul, aten.mm, aten.bmm)
def matmul(ctx: Context, node: fx.Node):
    """x @ W with W a parameter (in, out), x @ W.T with W (out, in), W @ h with W (out, in) and h's channels on
    its second-last axis; a product of two hidden values is written-out attention (with ``bmm``, usually with
    the heads folded into the batch axis)."""
    x, w = ctx.value(node.args[0]), ctx.value(node.args[1])
    if isinstance(x, Layout) and isinstance(w, Layout):
        return batched_attention_product(ctx, node, x, w)
    if isinstance(x, GatheredParam) or isinstance(w, GatheredParam):
        return _experts(ctx, node, x, w)
    if isinstance(x, ParamRef) and len(x.shape) == 2 and isinstance(w, Layout) and w.ndim >= 2 \
            and (w.ndim - 2) in w.feature_dims():   # W @ h, h's channels on the contracted axis: a linear layer
        return producer(ctx, node, w, x, None, len(ctx.shape(node)) - 2, 0, 1, w.ndim - 2)
    if (x is None or isinstance(x, ParamRef)) and isinstance(w, Layout):   # a parameter here is not moved
        return weights_times_values(ctx, node, node.args[0], w)
    ndim = len(ctx.shape(node))
    in_dim = (x.ndim - 1) if isinstance(x, Layout) else None
    wt = transposed_param(ctx, node.args[1])
    if wt is not None:   # x @ W.T with W (out, in): nn.Linear written out
        return producer(ctx, node, x, wt, None, ndim - 1, 0, 1, in_dim)
    if _stacked_experts(ctx, x, w):   # (E, tokens, in) @ (E, in, out): one linear layer per expert
        return producer(ctx, node, x, w, None, 2, 2, 1, 2)
    if x is None and isinstance(w, ParamRef) and len(w.shape) == 3 and own_parameter(ctx, w) \
            and w.name not in ctx.captured.buffers:
        # untransformed coefficients times each slice's rows, (..., k, n, V) @ (k, V, C) (Gemma 4's position
        # tables read through one-hot vectors): an embedding per slice, its columns the new channels
        return producer(ctx, node, None, w, None, ndim - 1, 2, 1, None)
    if not isinstance(w, ParamRef) or len(w.shape) != 2:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product of hidden values (or a non-parameter "
                                     "weight) is not supported")
    return producer(ctx, node, x, w, None, ndim - 1, 1, 0, in_dim)


def _stacked_experts(ctx: Context, x, w) -> bool:
    """Is ``x @ w`` a batch of linear layers, one per slice along the first axis (Llama 4's experts:
    ``bmm(tokens.view(E, -1, in), gate_up_proj)`` with ``gate_up_proj`` (E, in, out))? ``x`` must hold its
    channels on its last axis only. Its rows and columns then move alike for every expert (a shared transform,
    a subgroup of the per-expert ones)."""
    if not (isinstance(x, Layout) and isinstance(w, ParamRef) and len(w.shape) == 3 and x.ndim == 3):
        return False
    return own_parameter(ctx, w) and x.feature_dims() == [2] and x.shape[0] == w.shape[0] \
        and x.shape[2] == w.shape[1]


def parse_einsum(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """The operands' index letters and the output's of an einsum equation (``"ibh,hnd->ibnd"``; without
    ``->`` the output is the letters used once, sorted, as torch does); None for an ellipsis, a letter repeated
    within one operand (a diagonal) or in the output, or a count of letters that does not match an operand's
    dimensions."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if not arrow:
        out = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    if len(ins) != len(ndims) or any(len(t) != n or len(set(t)) != len(t) for t, n in zip(ins, ndims)) \
            or len(set(out)) != len(out) or not set(out) <= set(lhs) - {","}:
        return None
    return ins, out


@builtin(aten.einsum)
def einsum(ctx: Context, node: fx.Node):
    """``torch.einsum`` (XLNet writes its projections and attention with it), read as the product it spells:

    * one operand whose letters the output only reorders: a transpose;
    * a hidden value (or an untransformed tensor) and a parameter ``P`` (``"ibh,hnd->ibnd"``): a linear map.
      P's letters shared with the input are its columns (they read the input's channels, which must lie on
      those letters), its letters only in the output are its rows: new channels, one per combination (a
      head-by-head projection (C, heads, width) makes heads·width channels). Letters of P shared with the input
      and kept in the output (one map per slice) are not followed;
    * two hidden values: reordered to ``(batch..., i, k) @ (batch..., k, j)`` and read as a product of hidden
      values (:func:`~.attention.batched_attention_product`: attention scores ``"ibnd,jbnd->bnij"``,
      weights times values ``"bnij,jbnd->ibnd"``), then reordered to the output's letters.

    Anything else with a hidden operand is not followed (pinned)."""
    operands = list(node.args[1])
    shapes = [ctx.shape(o) for o in operands]
    parsed = parse_einsum(node.args[0], [len(s) if s is not None else -1 for s in shapes]) \
        if all(s is not None for s in shapes) else None
    vals = [ctx.value(o) for o in operands]
    if parsed is None:
        return ctx.unsupported(node, f"{ctx.describe(node)}: an equation that is not a product of two operands")
    ins, out = parsed
    sizes = {c: int(n) for t, s in zip(ins, shapes) for c, n in zip(t, s)}
    if any(sizes[c] != n for t, s in zip(ins, shapes) for c, n in zip(t, s)) \
            or tuple(ctx.shape(node) or ()) != tuple(sizes[c] for c in out):
        return ctx.unsupported(node, f"{ctx.describe(node)}: an equation that broadcasts a letter (or an "
                                     "unexpected output shape)")
    if len(ins) == 1:
        x = vals[0]
        if isinstance(x, Layout) and sorted(ins[0]) == sorted(out):
            return L.permute(x, [ins[0].index(c) for c in out])
        return ctx.unsupported(node) if isinstance(x, Layout) else None
    if len(ins) != 2:
        return ctx.unsupported(node, f"{ctx.describe(node)}: an einsum of more than two operands is not supported")
    (a, b), (la, lb) = vals, ins
    if isinstance(a, Layout) and isinstance(b, Layout):
        return _einsum_hidden(ctx, node, a, b, la, lb, out, sizes)
    for (x, lx), (p, lp) in (((a, la), (b, lb)), ((b, lb), (a, la))):
        if isinstance(p, ParamRef) and (x is None or isinstance(x, Layout)):
            return _einsum_parameter(ctx, node, x, p, lx, lp, out, sizes)
    return ctx.unsupported(node) if isinstance(a, Layout) or isinstance(b, Layout) else None


def _einsum_hidden(ctx: Context, node: fx.Node, a: Layout, b: Layout, la: str, lb: str, out: str, sizes: dict):
    """Two hidden operands with one free letter each and one contracted letter (see :func:`einsum`)."""
    batch = [c for c in out if c in la and c in lb]
    k = [c for c in la if c in lb and c not in out]
    i, j = [c for c in la if c not in lb], [c for c in lb if c not in la]
    if len(k) != 1 or len(i) != 1 or len(j) != 1 or set(out) != {*batch, *i, *j}:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product of hidden values that is not "
                                     "(batch..., i, k) @ (batch..., k, j)")
    canon = "".join(batch + i + j)
    left = L.permute(a, [la.index(c) for c in batch + i + k])
    right = L.permute(b, [lb.index(c) for c in batch + k + j])
    got = batched_attention_product(ctx, node, left, right, tuple(sizes[c] for c in canon))
    return L.permute(got, [canon.index(c) for c in out]) if isinstance(got, Layout) else got


def _einsum_parameter(ctx: Context, node: fx.Node, x, p: ParamRef, lx: str, lp: str, out: str, sizes: dict):
    """A parameter ``p`` (letters ``lp``) applied to ``x`` (letters ``lx``; a hidden value or an untransformed
    tensor, None): see :func:`einsum`. Rows (or columns) with one letter are recorded along that axis of P, with
    several letters on the flattened tensor (the channel at every element); P's rows and columns cannot both
    span several axes (two flattened uses of P would be tied to each other)."""
    cols = [c for c in lp if c in lx]
    rows = [c for c in lp if c not in lx]
    own = [c for c in lx if c not in lp]
    if any(c in out for c in cols) or not set(rows) <= set(out) or not set(own) <= set(out) \
            or (isinstance(x, Layout) and not cols):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a product with a parameter that is not one linear map "
                                     "over the input's channels")
    ncol = int(np.prod([sizes[c] for c in cols]))
    if isinstance(x, Layout):
        got = L.atoms_along(x, [lx.index(c) for c in cols])
        if got is None:
            return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axes of its input")
        inp = (got[0].reshape(-1), got[1].reshape(-1))
    else:
        inp = (np.full(ncol, FIXED, np.int64), np.zeros(ncol, np.int64))
    own_shape = own_parameter(ctx, p)   # not a view: P's axes are its own
    if (len(rows) > 1 and len(cols) > 1) or (rows and not own_shape):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a parameter whose rows and columns both span several "
                                     "axes (or a view of one) is not supported")
    if not rows:   # one number per input position (a dot product with a vector): the output is untransformed
        ctx.columns(p, None, Channels(*_per_element(p, lp, cols, sizes, inp)))
        return None
    lead = [c for c in out if c in own]
    canon = lead + rows
    made = ctx.fresh(tuple(sizes[c] for c in lead) + (int(np.prod([sizes[c] for c in rows])),), len(lead))
    # rows and columns on axes of their own where they have one letter, else on the flattened tensor (never
    # both: uses of one parameter along the same axis are tied to each other)
    if len(rows) == 1:
        ctx.rows(p, lp.index(rows[0]), made)
    else:
        ctx.rows(p, None, Channels(*_per_element(p, lp, rows, sizes, (made.atoms, made.chains))))
    if len(cols) == 1:
        ctx.columns(p, lp.index(cols[0]), Channels(*inp))
    else:
        ctx.columns(p, None, Channels(*_per_element(p, lp, cols, sizes, inp)))
    shaped = L.reshape(made, tuple(sizes[c] for c in canon))
    if shaped is None:   # pragma: no cover - splitting one axis into its own factors always matches
        return ctx.unsupported(node, f"{ctx.describe(node)}: unexpected output layout")
    return L.permute(shaped, ["".join(canon).index(c) for c in out])


def _per_element(p: ParamRef, lp: str, letters: list[str], sizes: dict, channels: tuple) -> tuple:
    """(atoms, chains) at every element of ``p`` (flat order) from ``channels`` listed over the combinations
    of ``letters`` (row-major, in that order)."""
    grid = np.indices(tuple(sizes[c] for c in lp)).reshape(len(lp), -1)
    where = np.ravel_multi_index(tuple(grid[lp.index(c)] for c in letters), tuple(sizes[c] for c in letters))
    return channels[0][where], channels[1][where]


@builtin(aten.baddbmm)
def baddbmm(ctx: Context, node: fx.Node):
    """beta·bias + alpha·(a @ b) of two hidden values: written-out attention scores with an additive bias
    (BLOOM's ALiBi, a mask). A bias that is the same for every head keeps the scores' head atoms; one that
    varies across heads (ALiBi's per-head slopes) keeps the heads in place (the per-head maps remain)."""
    bias_arg = node.args[0]
    bias, a, b = (ctx.value(x) for x in node.args[:3])
    if not (isinstance(a, Layout) and isinstance(b, Layout)) or isinstance(bias, Layout | ParamRef):
        return ctx.unsupported(node, f"{ctx.describe(node)}: only attention scores plus an untransformed bias are "
                                     "supported")
    scores = batched_attention_product(ctx, node, a, b)
    if not isinstance(scores, Layout) or node.kwargs.get("beta", 1) == 0:
        return scores
    if not constant_along_channels(ctx, bias_arg, scores, ctx.shape(node)):
        ctx.pin(scores, f"{ctx.describe(node)} adds a bias that differs between heads (ALiBi): heads stay in place")
    return scores


def _experts(ctx: Context, node: fx.Node, a, b):
    """``bmm`` of the weights of the experts each token is routed to (a :class:`GatheredParam` (S, out, in))
    with the tokens' inputs (S, in, 1), or (S, 1, in) times (S, in, out) transposed: one linear layer per
    token whose rows and columns move alike for every expert (a shared transform: a subgroup of the
    per-expert ones)."""
    shape = ctx.shape(node)
    if isinstance(a, GatheredParam) and isinstance(b, Layout) and len(a.shape) == 3 and shape and shape[2] == 1:
        return producer(ctx, node, b, ParamRef(a.name, a.shape), None, 1, 1, 2, 1)
    if isinstance(b, GatheredParam) and isinstance(a, Layout) and len(b.shape) == 3 and shape and shape[1] == 1:
        return producer(ctx, node, a, ParamRef(b.name, b.shape), None, 2, 2, 1, 2)
    return ctx.unsupported(node, f"{ctx.describe(node)}: a product with gathered weights that is not one linear "
                                 "layer per token")


def transposed_param(ctx: Context, arg) -> ParamRef | SlicedParam | None:
    """The 2-D parameter (or part of one) W when ``arg`` is W.T (``.T``, ``.mT``, ``t``, ``transpose`` of its two
    axes, ``permute(1, 0)``)."""
    if not isinstance(arg, fx.Node) or arg.op != "call_function":
        return None
    op = getattr(arg.target, "overloadpacket", None)
    w = ctx.value(arg.args[0]) if arg.args else None
    if not isinstance(w, ParamRef | SlicedParam) or len(w.shape) != 2:
        return None
    if op in (aten.t, aten.numpy_T, aten.mT, aten.adjoint) \
            or (op is aten.transpose and {d % 2 for d in arg.args[1:3]} == {0, 1}) \
            or (op is aten.permute and [d % 2 for d in arg.args[1]] == [1, 0]):
        return w
    return None


@builtin(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
def conv(ctx: Context, node: fx.Node):
    """Convolutions: out channels new; depthwise convolutions keep each channel's identity (a per-channel
    filter, permuted with the channel; its scale carried through), grouped ones split channels into blocks."""
    x, w = ctx.value(node.args[0]), ctx.value(node.args[1])
    b = bias_value(ctx, ctx.arg(node, 2, "bias"))
    if node.target.overloadpacket is aten.convolution:
        if node.args[6]:
            return _transposed(ctx, node, x, w, b, node.args[8])
        groups = node.args[8]
    else:
        groups = ctx.arg(node, 6, "groups", 1)
    if not isinstance(w, ParamRef | NormedWeight | StandardizedWeight):
        return ctx.unsupported(node, f"{ctx.describe(node)} with a weight that is not a parameter")
    if groups > 1 and w.shape[1] == 1 and isinstance(x, Layout):
        if isinstance(w, NormedWeight):
            return ctx.unsupported(node, f"{ctx.describe(node)}: a weight-normalised depthwise convolution is not "
                                         "supported")
        return depthwise(ctx, node, x, w, b, groups)
    if groups > 1 and not isinstance(x, Layout):
        return ctx.unsupported(node, f"{ctx.describe(node)}: grouped convolution of an untransformed input")
    return producer(ctx, node, x, w, b, 1, 0, 1, 1 if isinstance(x, Layout) else None, groups)


@builtin(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def conv_transpose(ctx: Context, node: fx.Node):
    """Transposed convolutions (a decoder's upsampling: U-Nets, SAM's mask decoder, timm's LowFormer)."""
    b = bias_value(ctx, ctx.arg(node, 2, "bias"))
    return _transposed(ctx, node, ctx.value(node.args[0]), ctx.value(node.args[1]), b, ctx.arg(node, 6, "groups", 1))


def _transposed(ctx: Context, node: fx.Node, x, w, b, groups: int):
    """The weight of a transposed convolution is (in, out, *kernel): new channels on its second axis (rows),
    its first axis reads the input's channels (columns). Grouped ones are pinned."""
    if not isinstance(w, ParamRef) or groups != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a transposed convolution that is grouped or whose "
                                     "weight is not a parameter")
    return producer(ctx, node, x, w, b, 1, 1, 0, 1 if isinstance(x, Layout) else None)


def depthwise(ctx: Context, node: fx.Node, x: Layout, w: ParamRef | StandardizedWeight, b, groups: int):
    """Each output channel is its input channel filtered: the filter is a per-channel gain (w -> P t/s w, here
    t = s: only permuted). A standardised filter: its raw weight, gain and bias permuted with the channel."""
    if x.simple_dim() != 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axis")
    if isinstance(w, StandardizedWeight) and w.shape != w.w.shape:
        return ctx.unsupported(node, f"{ctx.describe(node)}: a standardised weight read in another shape than "
                                     "its own")
    mult = w.shape[0] // groups
    atoms, chains = np.repeat(x.atoms, mult), np.repeat(x.chains, mult)
    ctx.require(Monomial, x)
    out = ctx.keep(L.simple(np.where(atoms == ZERO, FIXED, atoms), chains, ctx.shape(node), 1))
    if isinstance(w, StandardizedWeight):
        for p, dim in ((w.w, 0), (w.gain, None), (w.bias, None)):
            if p is not None:
                ctx.permuted(p, dim, Channels(atoms, chains))
    else:
        ctx.gain(w, 0, out, Channels(atoms, chains))
    _bias_rows(ctx, node, b, out)
    return out


@builtin(aten.embedding)
def embedding(ctx: Context, node: fx.Node):
    """A lookup table (V, C): its columns are the new channels (row v -> T row v)."""
    w = ctx.value(node.args[0])
    if not isinstance(w, ParamRef) or isinstance(ctx.value(node.args[1]), Layout):
        return ctx.unsupported(node, f"{ctx.describe(node)} with hidden indices or a non-parameter table")
    return table_rows(ctx, ctx.shape(node), w)




@builtin(aten.index_select)
def index_select(ctx: Context, node: fx.Node):
    """``table.index_select(0, ids)``: an embedding (XGLM's sinusoidal positions, a buffer). A hidden value
    indexed along an axis without channels keeps its channels."""
    x, dim, ids = ctx.value(node.args[0]), node.args[1], ctx.value(node.args[2])
    if isinstance(ids, Layout):
        return ctx.unsupported(node, f"{ctx.describe(node)} with hidden indices")
    if isinstance(x, ParamRef):
        return table_rows(ctx, ctx.shape(node), x) if len(x.shape) == 2 and dim % 2 == 0 else None
    if not isinstance(x, Layout):
        return None
    if dim % x.ndim in x.feature_dims():
        return ctx.unsupported(node, f"{ctx.describe(node)} picks channels by tensor indices")
    return L.with_non_feature_size(x, dim % x.ndim, ctx.shape(node)[dim % x.ndim])


@builtin(aten.gather)
def gather(ctx: Context, node: fx.Node):
    """``torch.gather(x, dim, ids)`` of a hidden value along an axis without channels, with indices that are the
    same for every channel (DeBERTa's relative-position scores: per query, the entries of the key positions'
    distances, the same index for every head): each channel's entries are picked alike, so channels pass."""
    x, dim, ids_arg = ctx.value(node.args[0]), node.args[1], node.args[2]
    if isinstance(ctx.value(ids_arg), Layout):
        return ctx.unsupported(node, f"{ctx.describe(node)} with hidden indices")
    if not isinstance(x, Layout):
        return None
    shape, ids = ctx.shape(node), ctx.shape(ids_arg)
    dim = dim % x.ndim
    if dim in x.feature_dims() or shape is None or ids is None or tuple(ids) != tuple(shape) \
            or any(shape[d] != x.shape[d] for d in range(x.ndim) if d != dim) \
            or not constant_along_channels(ctx, _unexpanded(ids_arg), x, shape):
        return ctx.unsupported(node, f"{ctx.describe(node)} picks entries that differ between channels")
    return L.with_non_feature_size(x, dim, shape[dim])


def _unexpanded(arg):
    """The tensor an ``expand`` broadcast (the same entries along the broadcast axes), else ``arg``."""
    while isinstance(arg, fx.Node) and getattr(arg.target, "overloadpacket", None) in (aten.expand, aten.expand_as):
        arg = arg.args[0]
    return arg


def _indexed_axes(indices: list) -> list[int]:
    """The axes an advanced index reads: each index tensor one axis, a boolean mask as many as it has
    (``h[eos_mask]`` with a (batch, tokens) mask reads both), None skips one."""
    axes, axis = [], 0
    for t in indices:
        val = t.meta.get("val") if isinstance(t, fx.Node) else None
        n = val.ndim if isinstance(val, torch.Tensor) and val.dtype == torch.bool else 1
        if t is not None:
            axes += range(axis, axis + n)
        axis += n
    return axes


@builtin(aten.index)
def index(ctx: Context, node: fx.Node):
    """``table[ids]``: an embedding; ``weights[expert_ids]`` of a 3-D parameter: the experts' weights picked per
    token (:class:`GatheredParam`). A hidden value indexed by tensors along consecutive axes without channels
    (``h[torch.arange(B), last]``) keeps its channels."""
    x, indices = ctx.value(node.args[0], resampled=True), list(node.args[1])
    where = [i for i, t in enumerate(indices) if t is not None]
    if any(isinstance(ctx.value(indices[i]), Layout) for i in where):
        return ctx.unsupported(node, f"{ctx.describe(node)} with hidden indices")
    if isinstance(x, ParamRef) and where == [0]:
        if len(x.shape) == 2:
            return table_rows(ctx, ctx.shape(node), x)
        gather = len(x.shape) == 3 and len(ctx.shape(indices[0]) or ()) == 1
        return GatheredParam(x.name, x.shape) if gather and own_parameter(ctx, x) else None
    shape = ctx.shape(node)
    axes = _indexed_axes(indices)
    lo, hi = axes[0], axes[-1] + 1
    if isinstance(x, ParamRef | ResampledParam):
        # entries picked along other axes, alike at every index of the first (LeViT's attention biases
        # ``biases[:, idxs]``, one row per head): linear in the parameter, the picked axes mixed
        r = as_resampled(ctx, x)
        if r is None or shape is None or axes != list(range(lo, hi)):
            return None
        k = len(shape) - (len(r.shape) - len(axes))
        return replace(r, shape=tuple(shape), kept=r.kept[:lo] + (None,) * k + r.kept[hi:])
    if not isinstance(x, Layout):
        return None
    if axes != list(range(lo, hi)) or any(d in x.feature_dims() for d in axes) or shape is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} indexes channels or non-adjacent axes")
    k = len(shape) - (x.ndim - len(axes))
    dims = x.dims[:lo] + tuple(((int(s), -1),) if s != 1 else () for s in shape[lo:lo + k]) + x.dims[hi:]
    return x.derive(dims=dims, side=None)
