"""Moving channels around: copies, views, transposes, broadcasts, indexing, splitting, concatenation, padding.

These operations only move a value's channel factors between tensor dimensions
(:mod:`~intertwiners.symmetries.layout`): attention's head reshapes, ``nn.MultiheadAttention``'s
batch×heads merge and a feature map flattened into a linear layer (each channel repeated once per pixel)
are followed exactly. Slicing, concatenation and zero channel padding split a producer's channels into
independent spaces (the resolver groups channels held by the same values).
"""

from __future__ import annotations

import operator
from dataclasses import replace

import numpy as np
import torch
import torch.fx as fx

from .. import layout as L
from ..constraints import ConstantAdd
from ..context import Context
from ..layout import FIXED, ZERO, Layout
from ..records import ConcatParam, DerivedParam, ParamRef, ResampledParam, SlicedParam, Span, StandardizedWeight
from ..registry import builtin

aten = torch.ops.aten


@builtin(aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata, aten._assert_scalar,
         aten.sym_constrain_range_for_size)
def not_a_tensor(ctx: Context, node: fx.Node):
    """Sizes and assertions."""
    return None


@builtin(aten.alias, aten.clone, aten.contiguous, aten.detach, aten.detach_, aten.lift_fresh_copy, aten.to,
         aten._to_copy, aten.type_as, aten.dropout, aten.dropout_, aten.feature_dropout,
         aten.feature_dropout_, aten.alpha_dropout, aten.native_dropout, side_aware=True)
def passthrough(ctx: Context, node: fx.Node):
    """Identity on values (copies, dtype changes; dropout, which is off in the captured eval-mode graph)."""
    x = ctx.value(node.args[0], resampled=True)
    if isinstance(x, ParamRef | SlicedParam | ResampledParam):
        return x
    if isinstance(x, Layout):
        if node.target.overloadpacket is aten.native_dropout:
            return ctx.unsupported(node, "native dropout returns a mask")
        return x
    return None


def _param_view(ctx: Context, node: fx.Node, x: ParamRef) -> ParamRef | None:
    """A view of a parameter: its own elements in the node's shape. A parameter broadcast before (``expand``
    keeps its own shape: ``cls.expand(B, -1).unsqueeze(1)``) holds fewer elements than the node; its own axes are
    the trailing ones, so an unsqueeze or squeeze is followed there and any other view is refused."""
    shape = ctx.shape(node)
    if shape is None or int(np.prod(shape)) == int(np.prod(x.shape)):
        return ParamRef(x.name, tuple(shape) if shape is not None else x.shape)
    op, src, own = node.target.overloadpacket, ctx.shape(node.args[0]), tuple(x.shape)
    if src is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} views a broadcast parameter of unknown shape")
    if op is aten.unsqueeze:
        after = len(src) - node.args[1] % (len(src) + 1)  # the input's axes after the new one
        return ParamRef(x.name, own[:len(own) - after] + (1,) + own[len(own) - after:] if after <= len(own) else own)
    if op is aten.squeeze:
        dims = node.args[1] if len(node.args) > 1 else range(len(src))
        gone = {d % len(src) - (len(src) - len(own)) for d in ([dims] if isinstance(dims, int) else dims)}
        return ParamRef(x.name, tuple(n for i, n in enumerate(own) if not (i in gone and n == 1)))
    return ctx.unsupported(node, f"{ctx.describe(node)} reshapes a broadcast parameter")


@builtin(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.reshape_as, aten.view_as)
def view(ctx: Context, node: fx.Node):
    """A hidden value's channels follow the reshape; a parameter, a derived parameter (``(g * c).view(-1)``) and
    a standardised weight (reshaped back to its weight's shape) stay what they are, with the new shape."""
    x = ctx.value(node.args[0], resampled=True)
    shape = ctx.shape(node)
    if isinstance(x, ParamRef):
        return _param_view(ctx, node, x)
    if isinstance(x, ResampledParam):
        return resampled_view(ctx, node, x)
    if isinstance(x, DerivedParam | StandardizedWeight) and shape is not None:
        return replace(x, shape=tuple(shape))
    if not isinstance(x, Layout):
        return None
    out = L.reshape(x, shape)
    if out is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} reshapes {x.shape} -> {shape} across channels")
    return out


@builtin(aten.unsqueeze)
def unsqueeze(ctx: Context, node: fx.Node):
    x = ctx.value(node.args[0], resampled=True)
    if isinstance(x, ParamRef):
        return _param_view(ctx, node, x)
    if isinstance(x, ResampledParam):
        return resampled_view(ctx, node, x)
    if not isinstance(x, Layout):
        return None
    return L.unsqueeze(x, node.args[1] % (x.ndim + 1))


@builtin(aten.squeeze)
def squeeze(ctx: Context, node: fx.Node):
    x = ctx.value(node.args[0], resampled=True)
    if isinstance(x, ParamRef):
        return _param_view(ctx, node, x)
    if isinstance(x, ResampledParam):
        return resampled_view(ctx, node, x)
    if not isinstance(x, Layout):
        return None
    dims = node.args[1] if len(node.args) > 1 else list(range(x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return L.squeeze(x, [d % x.ndim for d in dims if x.shape[d % x.ndim] == 1])


@builtin(aten.transpose, aten.t, aten.numpy_T, aten.mT, aten.adjoint, aten.permute, aten.swapaxes, aten.movedim,
         side_aware=True)
def transpose(ctx: Context, node: fx.Node):
    """Axes reordered: ``transpose``/``swapaxes`` of two axes, ``t`` and ``.T`` (all axes reversed), ``.mT`` and
    ``adjoint`` (the last two: real tensors only reach here), ``permute``, ``movedim``."""
    x = ctx.value(node.args[0], resampled=True)
    if not isinstance(x, Layout | ParamRef | ResampledParam):
        return None
    ndim = len(x.shape)
    op = node.target.overloadpacket
    order = list(range(ndim))
    if op is aten.permute:
        order = [d % ndim for d in node.args[1]]
    elif op is aten.movedim:
        src, dst = node.args[1] % ndim, node.args[2] % ndim
        order.remove(src)
        order.insert(dst, src)
    elif op in (aten.t, aten.numpy_T):
        order.reverse()
    elif op in (aten.mT, aten.adjoint):
        if ndim >= 2:
            order[-2], order[-1] = order[-1], order[-2]
    elif ndim:
        i, j = node.args[1] % ndim, node.args[2] % ndim
        order[i], order[j] = order[j], order[i]
    if isinstance(x, ParamRef):
        long = [d for d in order if x.shape[d] != 1]
        if long == sorted(long):   # only axes of size 1 moved: the same elements in the same order (a view)
            return _param_view(ctx, node, x)
        x = as_resampled(ctx, x)   # (a weight transposed for a product is claimed there, see linear.py)
        if x is None:
            return None
    if isinstance(x, ResampledParam):
        return replace(x, shape=tuple(x.shape[d] for d in order), kept=tuple(x.kept[d] for d in order))
    return L.permute(x, order)


@builtin(aten.expand, aten.expand_as, aten.repeat_interleave)
def expand(ctx: Context, node: fx.Node):
    """Broadcasting, and repeating each slice (``repeat_interleave``: each token once per expert it is routed
    to), along axes without channels."""
    x = ctx.value(node.args[0], resampled=True)
    if isinstance(x, ParamRef | ResampledParam):
        return x  # broadcasting: the parameter keeps its own shape
    if not isinstance(x, Layout):
        return None
    shape = ctx.shape(node)
    if node.target.overloadpacket is aten.repeat_interleave:
        dim = ctx.arg(node, 2, "dim")
        if not isinstance(node.args[1], int) or dim is None or dim % x.ndim in x.feature_dims():
            return ctx.unsupported(node, f"{ctx.describe(node)} repeats a channel axis (or the flattened tensor)")
        return L.with_non_feature_size(x, dim % x.ndim, shape[dim % x.ndim])
    if len(shape) != x.ndim:
        return ctx.unsupported(node)
    out = x
    for d, (a, s) in enumerate(zip(x.shape, shape)):
        if a != s:
            if d in x.feature_dims():
                return ctx.unsupported(node, f"{ctx.describe(node)} broadcasts a channel axis")
            out = L.with_non_feature_size(out, d, s)
    return out


@builtin(aten.repeat, aten.tile)
def repeat(ctx: Context, node: fx.Node):
    """Tiling (new leading axes included; ``tile``'s shorter repeat counts apply to the last axes): along an axis
    without channels its size grows; along an axis with channels (DeBERTa v2's position keys (heads, 2 span, d)
    repeated once per sample to (batch·heads, ...)) a non-channel factor of the repeat count goes in front of
    the axis' factors: position i·n + j holds what position j held, so every copy carries the same channels."""
    x = ctx.value(node.args[0], resampled=True)
    reps = list(node.args[1])
    if isinstance(x, Layout | ParamRef | ResampledParam) and len(reps) < len(x.shape):
        reps = [1] * (len(x.shape) - len(reps)) + reps
    if isinstance(x, ParamRef | ResampledParam):   # a parameter tiled (SAM 2's window position table)
        r = as_resampled(ctx, x)
        lead = len(reps) - len(x.shape)
        if r is None or lead < 0:
            return None
        return mixed_along(replace(r, shape=(1,) * lead + r.shape, kept=(None,) * lead + r.kept), ctx.shape(node),
                           [d for d, n in enumerate(reps) if n != 1])
    if not isinstance(x, Layout):
        return None
    out = x
    for _ in range(len(reps) - x.ndim):
        out = L.unsqueeze(out, 0)
    for d, r in enumerate(reps):
        if r == 1:
            continue
        if d in out.feature_dims():
            dims = list(out.dims)
            dims[d] = ((int(r), -1),) + tuple(out.dims[d])
            out = out.derive(dims=tuple(dims))
        else:
            out = L.with_non_feature_size(out, d, out.shape[d] * r)
    return out


@builtin(aten.view_as_complex)
def as_complex(ctx: Context, node: fx.Node):
    """(..., n, 2) read as n complex numbers (rotary embeddings written as complex products, Llama 4's
    ``view_as_complex(q.reshape(..., -1, 2)) * freqs``): the real and imaginary part of a number must carry one
    transform (a real scalar or permutation of the numbers commutes with a complex product), so the two channels
    of each pair are tied and the numbers keep the pair's channels."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    last = x.ndim - 1
    real = index(ctx, node, x, last, 0)
    if last in x.feature_dims() and isinstance(real, Layout):
        ctx.tie(real, index(ctx, node, x, last, 1), f"{ctx.describe(node)} (the two parts of a complex number)")
    return real


@builtin(aten.view_as_real)
def as_real(ctx: Context, node: fx.Node):
    """n complex numbers as (..., n, 2): both parts of a number carry its channel."""
    z = ctx.value(node.args[0])
    if not isinstance(z, Layout):
        return None
    return ctx.keep(L.with_non_feature_size(L.unsqueeze(z, z.ndim), z.ndim, 2))


@builtin(aten.roll)
def roll(ctx: Context, node: fx.Node):
    """A cyclic shift along axes without channels (shifted windows) acts on every channel alike; a shift of a
    channel axis (or of the flattened tensor) is not supported."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    dims = ctx.arg(node, 2, "dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(d % x.ndim in x.feature_dims() for d in dims):
        return ctx.unsupported(node, f"{ctx.describe(node)} shifts a channel axis")
    return x


@builtin(aten.stack)
def stack(ctx: Context, node: fx.Node):
    """Values with the same channels stacked along a new axis (which holds no channels); values whose channels
    differ, at the same positions (timm's interleaved rotary embeddings, ``stack([-x[..., 1::2], x[..., ::2]],
    -1)``), along a new channel axis: a concatenation of the parts, each its own channels."""
    parts = [ctx.value(a) for a in node.args[0]]
    if not any(isinstance(v, Layout) for v in parts):
        return None
    ref = parts[0]
    if not all(isinstance(v, Layout) and L.same_structure(ref, v) for v in parts):
        return ctx.unsupported(node, f"{ctx.describe(node)} stacks values with different channels")
    dim = ctx.arg(node, 1, "dim", 0) % (ref.ndim + 1)
    if all(np.array_equal(ref.atoms, v.atoms) and np.array_equal(ref.chains, v.chains) for v in parts):
        return L.with_non_feature_size(L.unsqueeze(ref, dim), dim, len(parts))
    return L.stack_features(parts, dim)


def index(ctx: Context, node: fx.Node, x: Layout, dim: int, idx):
    """x indexed along ``dim`` by ``idx`` (an int, a slice or an array), channels kept track of."""
    dim %= x.ndim
    if dim not in x.feature_dims():
        if isinstance(idx, int):
            return ctx.keep(L.squeeze(L.with_non_feature_size(x, dim, 1), [dim]))
        # the part's own size (a split node's shape is its parts' list, not one shape)
        size = len(range(*idx.indices(x.shape[dim]))) if isinstance(idx, slice) else len(idx)
        return ctx.keep(L.with_non_feature_size(x, dim, size))
    out = L.index_feature_dim(x, dim, idx)
    if out is None:
        return ctx.unsupported(node, f"{ctx.describe(node)} indexes an axis that mixes channels with other axes")
    return ctx.keep(out)


@builtin(aten.select)
def select(ctx: Context, node: fx.Node):
    x = ctx.value(node.args[0], resampled=True)
    if isinstance(x, ParamRef | ResampledParam):   # a row of a position table (a class token's position)
        r = as_resampled(ctx, x)
        dim = node.args[1] % len(x.shape)
        return None if r is None else replace(r, shape=r.shape[:dim] + r.shape[dim + 1:],
                                              kept=r.kept[:dim] + r.kept[dim + 1:])
    if not isinstance(x, Layout):
        return None
    return index(ctx, node, x, node.args[1], node.args[2] % x.shape[node.args[1] % x.ndim])


def table_rows(ctx: Context, shape: tuple, table: ParamRef) -> Layout:
    """Rows of a table (V, C) picked by untransformed indices or a slice, or the whole table read as data (an
    embedding), as a value of ``shape`` (..., C): new channels, the table's columns (each row r -> T r)."""
    out = ctx.fresh(tuple(shape), len(shape) - 1)
    ctx.rows(table, 1, out)
    return out


def whole_table(ctx: Context, x) -> bool:
    """Is ``x`` a whole 2-D parameter (V, C), possibly unsqueezed to (1, ..., V, C), and not a buffer (a buffer
    read as data is usually a mask), so that reading its rows as data makes it an embedding
    (:func:`table_rows`)?"""
    if not isinstance(x, ParamRef) or len(x.shape) < 2 or any(s != 1 for s in x.shape[:-2]) \
            or x.name in ctx.captured.buffers:
        return False
    full = ctx.captured.tensors.get(x.name)
    return full is not None and tuple(full.shape) == tuple(x.shape[-2:])


@builtin(aten.slice)
def slice_(ctx: Context, node: fx.Node):
    """A slice along an axis without channels keeps them; along a channel axis it keeps the sliced channels.
    A 2-D parameter sliced along its rows (DeBERTa's relative-position table ``rel_embeddings.weight[a:b]``,
    read as the position projections' input) is an embedding: its columns are new channels. A parameter sliced
    to be a layer's weight or bias (``F.linear(x, w[:h], b[:h])``) is a part of it
    (:class:`~..records.SlicedParam`); sliced otherwise (a position table's rows), a resampled parameter."""
    x = ctx.value(node.args[0], resampled=True)
    if whole_table(ctx, x) and len(x.shape) == 2 and ctx.arg(node, 1, "dim", 0) % 2 == 0 \
            and not _read_as_weight(node):
        return table_rows(ctx, ctx.shape(node), x)
    part = own_parameter(ctx, x) and _read_as_weight(node)
    if not isinstance(x, Layout | ParamRef | ResampledParam):
        return None
    dim = ctx.arg(node, 1, "dim", 0) % len(x.shape)
    n = x.shape[dim]
    start, end = ctx.arg(node, 2, "start"), ctx.arg(node, 3, "end")
    sl = slice(*slice(0 if start is None else start, n if end is None else end, ctx.arg(node, 4, "step", 1)).indices(n))
    if sl == slice(0, n, 1):
        return x
    if not isinstance(x, Layout) and not part:   # part of a position table (the patches', not the class token's)
        return mixed_along(as_resampled(ctx, x), ctx.shape(node), [dim])
    if not isinstance(x, Layout):
        return _parameter_part(x, dim, sl.start, sl.stop) if sl.step == 1 and sl.stop > sl.start else None
    return index(ctx, node, x, dim, sl)


def _read_as_weight(node: fx.Node) -> bool:
    """Does every user read ``node`` as a linear layer's weight or bias (``linear``, ``addmm``'s bias, or
    transposed: ``x @ W.T``), not as data?"""
    def as_weight(user, arg) -> bool:
        op = getattr(user.target, "overloadpacket", None)
        if op in (aten.t, aten.transpose, aten.permute, aten.numpy_T, aten.mT):
            return bool(user.users) and all(
                getattr(u.target, "overloadpacket", None) in (aten.addmm, aten.mm, aten.matmul) and u.args[-1] is user
                for u in user.users)
        return op is aten.linear and arg in user.args[1:3] or op is aten.addmm and user.args[0] is arg

    return bool(node.users) and all(as_weight(user, node) for user in node.users)


def own_parameter(ctx: Context, x) -> bool:
    """Is ``x`` a parameter in its own shape (not a view), whose axes are the parameter's?"""
    full = ctx.captured.tensors.get(x.name) if isinstance(x, ParamRef) else None
    return full is not None and tuple(full.shape) == tuple(x.shape)


def as_resampled(ctx: Context, x) -> ResampledParam | None:
    """``x`` as a :class:`~..records.ResampledParam`: a parameter, in its own shape or viewed (each axis of the
    view that is an axis of the parameter -- the same size, the same number of elements before it -- is kept);
    a resampled one as it is; None for anything else."""
    if isinstance(x, ResampledParam):
        return x
    full = ctx.captured.tensors.get(x.name) if isinstance(x, ParamRef) else None
    if full is None or int(np.prod(full.shape)) != int(np.prod(x.shape)):
        return None
    own = tuple(full.shape)
    return ResampledParam((x.name,), tuple(x.shape),
                          _kept_after_reshape(own, tuple((d,) for d in range(len(own))), tuple(x.shape)))


def _kept_after_reshape(old: tuple, kept: tuple, new: tuple) -> tuple:
    """For each axis of ``new`` (a reshape of ``old``, the same elements in the same order), the entry of
    ``kept`` for the axis of ``old`` it is -- the same size and the same number of elements before it -- or
    None. Axes of size 1 keep nothing."""
    found, before = {}, 1
    for n, k in zip(old, kept):
        if k is not None and n != 1:
            found[(before, n)] = k
        before *= n
    out, before = [], 1
    for n in new:
        out.append(found.get((before, n)))
        before *= n
    return tuple(out)


def resampled_view(ctx: Context, node: fx.Node, x: ResampledParam) -> ResampledParam | None:
    """A reshape (view, flatten, unsqueeze, squeeze) of a resampled parameter; None (untransformed) when the
    node's shape holds another number of elements (a view after a broadcast)."""
    shape = ctx.shape(node)
    if shape is None or int(np.prod(shape)) != int(np.prod(x.shape)):
        return None
    return replace(x, shape=tuple(shape), kept=_kept_after_reshape(x.shape, x.kept, tuple(shape)))


def mixed_along(x: ResampledParam | None, shape, dims) -> ResampledParam | None:
    """``x`` after a linear map along ``dims`` (the same at every index of its other axes: a slice, an
    interpolation), of the node's ``shape``."""
    if x is None or shape is None or len(shape) != len(x.shape):
        return None
    return replace(x, shape=tuple(shape), kept=tuple(None if d in dims else k for d, k in enumerate(x.kept)))


def _parameter_part(x: ParamRef, dim: int, start: int, stop: int) -> SlicedParam:
    """The part ``start:stop`` of parameter ``x`` (in its own shape) along ``dim``."""
    shape = tuple(x.shape)
    return SlicedParam(x.name, shape[:dim] + (stop - start,) + shape[dim + 1:], Span(dim, start, stop, shape))


@builtin(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split)
def split(ctx: Context, node: fx.Node):
    """Parts of a hidden value along an axis; of a parameter in its own shape, the parts a layer reads as its
    weight or bias (a packed projection's query and key/value weights): parts of the parameter
    (:class:`~..records.SlicedParam`)."""
    x = ctx.value(node.args[0])
    op = node.target.overloadpacket
    param = op is not aten.unbind and own_parameter(ctx, x)
    if not isinstance(x, Layout) and not param:
        return None
    if op is aten.unbind:
        dim = ctx.arg(node, 1, "dim", 0) % x.ndim
        return [index(ctx, node, x, dim, i) for i in range(x.shape[dim])]
    dim = ctx.arg(node, 2, "dim", 0) % len(x.shape)
    n = x.shape[dim]
    size_arg = node.args[1]
    if op is aten.chunk:
        size = -(-n // size_arg)
        sizes = [min(size, n - i) for i in range(0, n, size)]
    elif op is aten.tensor_split:
        sizes = _tensor_split_sizes(n, size_arg)
        if sizes is None:
            return ctx.unsupported(node, f"{ctx.describe(node)}: split points given as a tensor, negative or "
                                         "out of order")
    elif isinstance(size_arg, int):
        sizes = [min(size_arg, n - i) for i in range(0, n, size_arg)]
    else:
        sizes = list(size_arg)
    if param:   # only the parts a layer reads as its weight or bias; the others are untransformed tensors
        read = {user.args[1] for user in node.users if user.target is operator.getitem and _read_as_weight(user)}
    out, start = [], 0
    for i, s in enumerate(sizes):
        if param:
            out.append(_parameter_part(x, dim, start, start + s) if i in read else None)
        else:
            out.append(index(ctx, node, x, dim, slice(start, start + s, 1)))
        start += s
    return out


def _tensor_split_sizes(n: int, how) -> list[int] | None:
    """The part sizes of ``torch.tensor_split`` of ``n`` entries: ``how`` sections (the first ``n % how`` one
    longer) or a list of split points; None for points that are not non-decreasing ints in [0, n]."""
    if isinstance(how, int):
        q, r = divmod(n, how)
        return [q + 1] * r + [q] * (how - r)
    if not isinstance(how, list | tuple) or not all(isinstance(i, int) for i in how):
        return None
    cuts = [0, *how, n]
    if any(b < a for a, b in zip(cuts, cuts[1:])) or cuts[-2] > n:
        return None
    return [b - a for a, b in zip(cuts, cuts[1:])]


@builtin(operator.getitem)
def getitem(ctx: Context, node: fx.Node):
    x = ctx.value(node.args[0])
    return x[node.args[1]] if isinstance(x, list | tuple) else None


@builtin(aten.cat, aten.concat)
def cat(ctx: Context, node: fx.Node):
    """Along a channel axis: the parts' channels side by side (untransformed parts are fixed channels).
    Along another axis: one transform for every part (their channels are tied position by position, as in a
    sum: CaiT's class token, updated by its own blocks, joins the patch tokens); a parameter part (a class
    token) moves with them."""
    parts = [(a, ctx.value(a)) for a in node.args[0]]
    shape = ctx.shape(node)
    dim = ctx.arg(node, 1, "dim", 0) % len(shape)
    hidden = [v for _, v in parts if isinstance(v, Layout)]
    if not hidden:
        parts = [(a, ctx.value(a, resampled=True)) for a, _ in parts if ctx.shape(a) != (0,)]
        return _concat_params(ctx, parts, shape) or merged_resampled(ctx, [v for _, v in parts], shape, (dim,))
    parts = [(a, v) for a, v in parts if isinstance(v, Layout) or (ctx.shape(a) and int(np.prod(ctx.shape(a))) > 0)]
    ref = hidden[0]
    if dim not in ref.feature_dims():
        merged = ref
        for a, v in parts:
            if isinstance(v, ParamRef):  # a class token: moves with the channels it is concatenated to
                part_shape = ctx.shape(a)
                got = param_channels(L.with_non_feature_size(ref, dim, part_shape[dim]), v, part_shape)
                if got is None:
                    return ctx.unsupported(node, f"{ctx.describe(node)} concatenates a parameter that is not "
                                                 "per-channel")
                ctx.rows(v, None, got)
            elif not isinstance(v, Layout) or not L.same_structure(ref, v):
                return ctx.unsupported(node, f"{ctx.describe(node)} concatenates values with different channels")
            elif v is not ref and not (np.array_equal(ref.atoms, v.atoms) and np.array_equal(ref.chains, v.chains)):
                ctx.tie(ref, v, f"{ctx.describe(node)}")
                merged = merged.derive(*L.merge_tied(merged, v))
        return L.with_non_feature_size(merged, dim, shape[dim])
    atoms, chains = [], []
    for a, v in parts:
        if not isinstance(v, Layout):
            s = ctx.shape(a)
            if ref.simple_dim() != dim:
                return ctx.unsupported(node, f"{ctx.describe(node)} concatenates along a mixed axis")
            atoms.append(np.full(s[dim], FIXED, np.int64))
            chains.append(np.zeros(s[dim], np.int64))
            continue
        fd = [f for _, f in v.dims[dim]]
        if len(fd) != 1 or v.fsizes[:fd[0]] != ref.fsizes[:fd[0]] or v.fsizes[fd[0] + 1:] != ref.fsizes[fd[0] + 1:]:
            return ctx.unsupported(node, f"{ctx.describe(node)} concatenates along a mixed axis")
        atoms.append(np.moveaxis(v.atoms.reshape(v.fsizes), fd[0], 0))
        chains.append(np.moveaxis(v.chains.reshape(v.fsizes), fd[0], 0))
    k = [f for _, f in ref.dims[dim]][0]
    if any(a.ndim == 1 for a in atoms) and len(ref.fsizes) > 1:
        return ctx.unsupported(node, f"{ctx.describe(node)} concatenates untransformed values along a mixed axis")
    A = np.moveaxis(np.concatenate(atoms, 0), 0, k)
    C = np.moveaxis(np.concatenate(chains, 0), 0, k)
    fsizes = tuple(A.shape)
    dims = tuple(((fsizes[k], k),) if i == dim else d for i, d in enumerate(ref.dims))
    return Layout(np.ascontiguousarray(A).reshape(-1), np.ascontiguousarray(C).reshape(-1), fsizes, dims)


_ZEROS = (aten.zeros, aten.zeros_like, aten.new_zeros)


def _concat_params(ctx: Context, parts: list, shape) -> ConcatParam | None:
    """1-D parameters and zeros side by side (a qkv bias built from a q bias, zeros and a v bias); None (an
    untransformed tensor) for anything else."""
    if len(shape) != 1 or not any(isinstance(v, ParamRef) for _, v in parts):
        return None
    out, start = [], 0
    for a, v in parts:
        s = ctx.shape(a)
        zeros = v is None and isinstance(a, fx.Node) and getattr(a.target, "overloadpacket", None) in _ZEROS
        if s is None or len(s) != 1 or not (zeros or isinstance(v, ParamRef) and len(v.shape) == 1):
            return None
        out.append((None if zeros else v, start, s[0]))
        start += s[0]
    return ConcatParam(tuple(out), tuple(shape)) if start == shape[0] else None


def merged_resampled(ctx: Context, parts: list, shape, mixed=()) -> ResampledParam | None:
    """Parameters, or resampled ones, combined linearly into a value of ``shape``: concatenated along ``mixed``
    (a class token's position and the patches' positions interpolated) or added (SAM 2's position table plus
    its window table tiled). Each part is broadcast against ``shape``; an axis is kept where every part keeps
    it at full size (a parameter in two parts must keep the same axes in both)."""
    rs = [as_resampled(ctx, v) if isinstance(v, ParamRef | ResampledParam) else None for v in parts]
    if shape is None or not rs or any(r is None or len(r.kept) > len(shape) for r in rs):
        return None
    axes: dict = {}   # parameter -> its axis at each axis of the result (None: not kept there)
    for r in rs:
        lead = len(shape) - len(r.kept)
        kept, size = (None,) * lead + tuple(r.kept), (1,) * lead + tuple(r.shape)
        for i, name in enumerate(r.names):
            own = tuple(None if d in mixed or k is None or size[d] != shape[d] else k[i] for d, k in enumerate(kept))
            if axes.setdefault(name, own) != own:
                return None
    names = tuple(axes)
    kept = tuple(None if any(axes[n][d] is None for n in names) else tuple(axes[n][d] for n in names)
                 for d in range(len(shape)))
    return ResampledParam(names, tuple(shape), kept)


def param_channels(x: Layout, p: ParamRef, out_shape) -> L.Channels | None:
    """The channel at every element of parameter ``p`` (in its flat order) when it is broadcast against x and
    varies along all of x's channel axes at full size (it may also vary along other axes, e.g. a position
    embedding (1, tokens, C)); None otherwise."""
    pshape = (1,) * (len(out_shape) - len(p.shape)) + tuple(p.shape)
    if len(pshape) != x.ndim:
        return None
    fdims = x.feature_dims()
    if any(pshape[d] != x.shape[d] for d in fdims):
        return None
    idx = L.feature_index(x, fdims)
    if idx is None:
        return None
    view_shape = [1] * x.ndim
    for d in fdims:
        view_shape[d] = x.shape[d]
    full = np.broadcast_to(idx.reshape(view_shape), pshape).reshape(-1)
    if int(np.prod(p.shape)) != len(full):
        return None
    return L.Channels(x.atoms[full], x.chains[full])


@builtin(aten.constant_pad_nd, aten.pad)
def pad(ctx: Context, node: fx.Node):
    """Zero padding: spatial axes act on every channel alike; padding the channel axis adds zero channels."""
    x = ctx.value(node.args[0])
    if not isinstance(x, Layout):
        return None
    pads = list(node.args[1])
    const = node.target.overloadpacket is aten.constant_pad_nd
    mode = "constant" if const else ctx.arg(node, 2, "mode", "constant")
    value = ctx.arg(node, 2 if const else 3, "value", 0) or 0
    out = x
    for i in range(len(pads) // 2):
        d = x.ndim - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        if (lo, hi) == (0, 0):
            continue
        if d in x.feature_dims():
            if x.simple_dim() != d or mode != "constant" or value != 0 or lo < 0 or hi < 0:
                return ctx.unsupported(node, f"{ctx.describe(node)} pads the channel axis with non-zero values")
            n = out.fsizes[0] + lo + hi
            zeros = (np.full(lo, ZERO, np.int64), np.full(hi, ZERO, np.int64))
            out = out.derive(atoms=np.concatenate([zeros[0], out.atoms, zeros[1]]),
                             chains=np.concatenate([np.zeros(lo, np.int64), out.chains, np.zeros(hi, np.int64)]),
                             fsizes=(n,), dims=tuple(((n, 0),) if j == d else dd for j, dd in enumerate(out.dims)))
        else:
            out = L.with_non_feature_size(out, d, ctx.shape(node)[d])
    if value != 0 and mode == "constant":
        ctx.require(ConstantAdd, x)
    return out
