"""One rule per operation family: how channels flow through it and what it requires of the transform.

A rule is ``rule(an, node) -> output value`` (a :class:`Layout` for a hidden value, ``None`` for an
untransformed tensor); it reads its inputs' layouts from ``an.env`` and records ties, constraints and
parameter bindings on the :class:`~intertwiners.symmetries.engine.Analysis`. Rules are registered per aten
operation with :func:`rule`; supporting a new operation means adding one rule (and its test).

Elementwise activations are found as *regions*: a maximal set of elementwise operations on one hidden
value with constant operands (``0.5*x*(1+tanh(...))``, ``x*sigmoid(x)``, a single ``relu``) is one
activation sigma whose group is derived like any callable's (:func:`intertwiners.groups.intertwiner_group`).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from .. import groups as G
from ..activations import ACTIVATION_MODULES
from . import layout as L
from . import side
from .constraints import ONE, Activation, ConstantAdd, Monomial, PositiveScales, Signed, Unit
from .engine import NON_TENSOR, Analysis, AttentionRecord, Binding, DerivedParam, ParamRef, owner, shape_of
from .layout import FIXED, ZERO, Layout

aten = torch.ops.aten
RULES: dict = {}


def rule(*ops):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def dispatch(an: Analysis, node: fx.Node):
    derived = derived_param(an, node)  # before regions: ``1 + w.float()`` is a function of a parameter
    if derived is not None:
        return derived
    if node in an.regions:
        return region_rule(an, node)
    target = node.target
    key = target if target is operator.getitem else getattr(target, "overloadpacket", target)
    fn = RULES.get(key)
    inputs = an.hidden_inputs(node)
    if fn is None:
        if not inputs:
            return None if shape_of(node) is not None else NON_TENSOR
        return an.unknown(node)
    return fn(an, node)


def derived_param(an: Analysis, node: fx.Node) -> DerivedParam | None:
    """``f(w)`` for an elementwise operation on one parameter (or derived parameter) with scalar operands
    and the parameter's shape (``1 + w``, ``exp(w)``); None for anything else."""
    p = getattr(node.target, "overloadpacket", None)
    if p not in _UNARY and p not in _BINARY:
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensors) != 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    w = an.value(tensors[0])
    if not isinstance(w, ParamRef | DerivedParam) or shape_of(node) != tuple(w.shape):
        return None
    if any(not (_scalar(a) or a is None or isinstance(a, str | bool)) for a in node.args if a is not tensors[0]):
        return None
    return DerivedParam(w.name, tuple(w.shape))


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_hidden(v) -> bool:
    return isinstance(v, Layout)


# ---------------------------------------------------------------------------------------------------------
# Values that are not hidden: shapes, constants, parameters
# ---------------------------------------------------------------------------------------------------------

@rule(aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata, aten._assert_scalar,
      aten.sym_constrain_range_for_size)
def non_tensor(an, node):
    return NON_TENSOR


@rule(aten.alias, aten.clone, aten.contiguous, aten.detach, aten.detach_, aten.lift_fresh_copy, aten.to,
      aten._to_copy, aten.type_as, aten.dropout, aten.dropout_, aten.feature_dropout,
      aten.feature_dropout_, aten.alpha_dropout, aten.native_dropout)
def passthrough(an, node):
    """Identity on values (copies, dtype changes; dropout, which is off in the captured eval-mode graph)."""
    x = an.value(node.args[0])
    if isinstance(x, ParamRef):
        return x
    if _is_hidden(x):
        if node.target.overloadpacket is aten.native_dropout:
            return an.unknown(node, "native dropout returns a mask")
        return x
    return None


# ---------------------------------------------------------------------------------------------------------
# Producers: linear maps with a weight (new channels)
# ---------------------------------------------------------------------------------------------------------

def _feeds_only_norm(node: fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and getattr(users[0].target, "overloadpacket", None) is aten.batch_norm \
        and isinstance(users[0].args[1], fx.Node)


def _feeds_only_gate(an: Analysis, node: fx.Node) -> bool:
    """Is ``node`` read only by an activation whose output is read only by products with another value
    (the gate branch of a gated MLP, act(W_gate x) * (W_up x))? Then the gate branch is only permuted
    and the other branch carries the scaling (the product has the same permutation and the other's scale)."""
    users = list(node.users)
    if not users or users[0] not in an.regions:
        return False
    reg = an.regions[users[0]]
    if reg["root"] is not node or any(u not in reg["members"] for u in users):
        return False
    products = list(reg["output"].users)
    for u in products:
        if _packet(u) is not aten.mul:
            return False
        others = [a for a in u.args if isinstance(a, fx.Node) and a is not reg["output"]]
        if len(others) != 1 or (others[0].op == "placeholder" and others[0].name in an.cap.params) \
                or others[0] in reg["members"]:
            return False
    return bool(products)


def _producer(an: Analysis, node: fx.Node, x, weight: ParamRef, bias, out_dim: int, w_out: int, w_in: int,
              in_dim: int | None, groups: int = 1):
    shape = shape_of(node)
    chain = an.chain_id((ONE,)) if _feeds_only_norm(node) or _feeds_only_gate(an, node) else 0
    n_in = weight.shape[w_in] * groups
    if _is_hidden(x):
        got = L.atoms_along(x, [in_dim])
        if got is None or len(got[0]) != n_in:
            return an.unknown(node, f"{an.describe(node)} does not act on the channel axis of its input")
        in_atoms, in_chains = got
    else:
        in_atoms, in_chains = np.full(n_in, FIXED, np.int64), np.zeros(n_in, np.int64)
    if groups > 1:
        # grouped convolution: channels stay within their group (one block per group, both sides)
        ci, co = n_in // groups, shape[out_dim] // groups
        for g in range(groups):
            block = in_atoms[g * ci:(g + 1) * ci]
            an.keep(L.simple(block, in_chains[g * ci:(g + 1) * ci], (len(block),), 0))
    out = an.fresh(shape, out_dim, chain)
    if groups > 1:
        for g in range(groups):
            an.keep(L.simple(out.atoms[g * co:(g + 1) * co], out.chains[g * co:(g + 1) * co], (co,), 0))
    an.bind(Binding(weight.name, w_out, "out", out.atoms, out.chains))
    an.bind(Binding(weight.name, w_in, "in", in_atoms, in_chains, groups=groups))
    if isinstance(bias, ParamRef):
        an.bind(Binding(bias.name, 0, "out", out.atoms, out.chains))
    elif bias is not None:
        return an.unknown(node, f"{an.describe(node)} has a bias that is not a parameter")
    return out


@rule(aten.linear)
def linear(an, node):
    """y = x W^T + b: rows of W (and b) follow the new channels, columns the input's."""
    x, w, b = an.value(node.args[0]), an.value(node.args[1]), an.value(_arg(node, 2, "bias"))
    if not isinstance(w, ParamRef) or len(w.shape) != 2:
        return an.unknown(node, f"{an.describe(node)} with a weight that is not a parameter")
    ndim = len(shape_of(node))
    if _is_hidden(x) and (x.ndim - 1) not in x.feature_dims():
        # token mixing (MLP-Mixer): the same map for every channel; its bias is the same for every channel.
        # Units it makes for an activation are hidden units of their own (a side axis, see side.py)
        if b is not None:
            an.constrain(ConstantAdd, x.atoms, x.chains)
        if side.feeds_activation(an, node):
            side.create(an, node, w, b)
        return an.keep(L.with_non_feature_size(x, x.ndim - 1, shape_of(node)[-1]))
    return _producer(an, node, x, w, b, ndim - 1, 0, 1, (x.ndim - 1) if _is_hidden(x) else None)


@rule(aten.addmm)
def addmm(an, node):
    """transformers' Conv1D: b + x @ W with W of shape (in, out)."""
    b, x, w = (an.value(a) for a in node.args[:3])
    if not isinstance(w, ParamRef) or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return an.unknown(node, f"{an.describe(node)} with a weight that is not a parameter")
    return _producer(an, node, x, w, b, 1, 1, 0, 1 if _is_hidden(x) else None)


@rule(aten.matmul, aten.mm)
def matmul(an, node):
    """x @ W with W a parameter (in, out); products of two hidden values: written-out attention."""
    x, w = an.value(node.args[0]), an.value(node.args[1])
    if _is_hidden(x) and _is_hidden(w):
        return attention_product(an, node, x, w)
    if not isinstance(w, ParamRef) or len(w.shape) != 2:
        return an.unknown(node, f"{an.describe(node)}: a product of hidden values (or a non-parameter "
                                "weight) is not supported")
    ndim = len(shape_of(node))
    return _producer(an, node, x, w, None, ndim - 1, 1, 0, (x.ndim - 1) if _is_hidden(x) else None)


@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
def conv(an, node):
    """Convolutions: out channels new; depthwise convolutions keep each channel's identity (a per-channel
    filter, permuted with the channel; its scale carried through), grouped ones split channels into blocks."""
    x, w = an.value(node.args[0]), an.value(node.args[1])
    b = an.value(_arg(node, 2, "bias"))
    if node.target.overloadpacket is aten.convolution:
        if node.args[6]:
            return an.unknown(node, f"{an.describe(node)} is a transposed convolution")
        groups = node.args[8]
    else:
        groups = _arg(node, 6, "groups", 1)
    if not isinstance(w, ParamRef):
        return an.unknown(node, f"{an.describe(node)} with a weight that is not a parameter")
    shape = shape_of(node)
    c_in = w.shape[1] * groups
    if groups > 1 and w.shape[1] == 1 and _is_hidden(x):
        return depthwise(an, node, x, w, b, groups, shape)
    if groups > 1 and not _is_hidden(x):
        return an.unknown(node, f"{an.describe(node)}: grouped convolution of an untransformed input")
    del c_in
    return _producer(an, node, x, w, b, 1, 0, 1, 1 if _is_hidden(x) else None, groups)


def depthwise(an, node, x, w, b, groups, shape):
    if x.simple_dim() != 1:
        return an.unknown(node, f"{an.describe(node)} does not act on the channel axis")
    mult = w.shape[0] // groups
    atoms, chains = np.repeat(x.atoms, mult), np.repeat(x.chains, mult)
    an.constrain(Monomial, x.atoms, x.chains)
    out = an.keep(L.simple(np.where(atoms == ZERO, FIXED, atoms), chains, shape, 1))
    an.bind(Binding(w.name, 0, "scale", out.atoms, out.chains, atoms, chains))
    if isinstance(b, ParamRef):
        an.bind(Binding(b.name, 0, "out", out.atoms, out.chains))
    return out


@rule(aten.embedding)
def embedding(an, node):
    """A lookup table (V, C): its columns are the new channels (row v -> T row v)."""
    w = an.value(node.args[0])
    if not isinstance(w, ParamRef) or _is_hidden(an.value(node.args[1])):
        return an.unknown(node, f"{an.describe(node)} with hidden indices or a non-parameter table")
    shape = shape_of(node)
    out = an.fresh(shape, len(shape) - 1)
    an.bind(Binding(w.name, 1, "out", out.atoms, out.chains))
    return out


# ---------------------------------------------------------------------------------------------------------
# Normalisations
# ---------------------------------------------------------------------------------------------------------

def _norm_output(an, x: Layout, affine: bool) -> Layout:
    one = an.chain_id((ONE,))
    chains = np.zeros_like(x.chains) if affine and bool(np.all(x.chains == one)) else x.chains
    return an.keep(x.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms), chains=chains))


@rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
      aten.native_batch_norm, aten.instance_norm)
def batch_norm(an, node):
    """BN'(P s x) = P t BN(x) (train and eval mode) with gamma' = P t/s gamma, beta' = P t beta,
    running_mean' = P s mean, running_var' = P var; s must be ±1 (BN divides by sqrt(var + eps))."""
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    if node.target.overloadpacket is aten.instance_norm:
        return an.unknown(node, f"{an.describe(node)}: instance norm is not supported")
    w, b, mean, var = (an.value(a) for a in node.args[1:5])
    if x.simple_dim() != 1:
        return an.unknown(node, f"{an.describe(node)} does not act on the channel axis")
    an.constrain(Signed, x.atoms, x.chains)
    out = _norm_output(an, x, isinstance(w, ParamRef))
    if isinstance(w, ParamRef):
        an.bind(Binding(w.name, 0, "scale", out.atoms, out.chains, x.atoms, x.chains))
    if isinstance(b, ParamRef):
        an.bind(Binding(b.name, 0, "out", out.atoms, out.chains))
    if isinstance(mean, ParamRef):
        an.bind(Binding(mean.name, 0, "out", x.atoms, x.chains))
    if isinstance(var, ParamRef):
        an.bind(Binding(var.name, 0, "perm", x.atoms, x.chains))
    if node.target.overloadpacket is not aten.batch_norm:
        return an.unknown(node, f"{an.describe(node)} returns several values")
    return out


@rule(aten.layer_norm, aten.native_layer_norm)
def layer_norm(an, node):
    """LayerNorm over the channel axis commutes with permutations (gamma, beta permuted; the output may
    carry a scaling that gamma and beta absorb)."""
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    ns = list(node.args[1])
    w, b = an.value(_arg(node, 2, "weight")), an.value(_arg(node, 3, "bias"))
    nd = x.ndim
    last = list(range(nd - len(ns), nd))
    if len(ns) != 1 or x.simple_dim() != nd - 1:
        return an.unknown(node, f"{an.describe(node)} does not normalise exactly the channel axis")
    del last
    an.constrain(Unit, x.atoms, x.chains)
    out = _norm_output(an, x, isinstance(w, ParamRef))
    if isinstance(w, ParamRef):
        an.bind(Binding(w.name, 0, "scale", out.atoms, out.chains, x.atoms, x.chains))
    if isinstance(b, ParamRef):
        an.bind(Binding(b.name, 0, "out", out.atoms, out.chains))
    if node.target.overloadpacket is aten.native_layer_norm:
        return an.unknown(node, f"{an.describe(node)} returns several values")
    return out


@rule(aten.group_norm, aten.native_group_norm)
def group_norm(an, node):
    return an.unknown(node, f"{an.describe(node)}: GroupNorm is not supported")


# ---------------------------------------------------------------------------------------------------------
# Moving channels around: views, transposes, slices, concatenation
# ---------------------------------------------------------------------------------------------------------

def _param_view(an, node, x: ParamRef):
    return ParamRef(x.name, shape_of(node) or x.shape)


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)
def view(an, node):
    x = an.value(node.args[0])
    shape = shape_of(node)
    if isinstance(x, ParamRef):
        return _param_view(an, node, x)
    if not _is_hidden(x):
        return None
    out = L.reshape(x, shape)
    if out is None:
        return an.unknown(node, f"{an.describe(node)} reshapes {x.shape} -> {shape} across channels")
    return an.keep(out)


@rule(aten.unsqueeze)
def unsqueeze(an, node):
    x = an.value(node.args[0])
    if isinstance(x, ParamRef):
        return _param_view(an, node, x)
    if not _is_hidden(x):
        return None
    return an.keep(L.unsqueeze(x, node.args[1] % (x.ndim + 1)))


@rule(aten.squeeze)
def squeeze(an, node):
    x = an.value(node.args[0])
    if isinstance(x, ParamRef):
        return _param_view(an, node, x)
    if not _is_hidden(x):
        return None
    dims = node.args[1] if len(node.args) > 1 else list(range(x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % x.ndim for d in dims if x.shape[d % x.ndim] == 1]
    return an.keep(L.squeeze(x, dims))


@rule(aten.transpose, aten.t, aten.permute, aten.swapaxes, aten.movedim)
def transpose(an, node):
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None if not isinstance(x, ParamRef) else an.unknown(node, "a transposed parameter")
    op = node.target.overloadpacket
    order = list(range(x.ndim))
    if op is aten.permute:
        order = [d % x.ndim for d in node.args[1]]
    elif op is aten.movedim:
        src, dst = node.args[1] % x.ndim, node.args[2] % x.ndim
        order.remove(src)
        order.insert(dst, src)
    else:
        i, j = (node.args[1] % x.ndim, node.args[2] % x.ndim) if op is not aten.t else (0, 1)
        order[i], order[j] = order[j], order[i]
    return an.keep(L.permute(x, order))


@rule(aten.expand, aten.expand_as, aten.repeat_interleave)
def expand(an, node):
    x = an.value(node.args[0])
    if isinstance(x, ParamRef):
        return x  # broadcasting: the parameter keeps its own shape
    if not _is_hidden(x):
        return None
    shape = shape_of(node)
    if node.target.overloadpacket is aten.repeat_interleave or len(shape) != x.ndim:
        return an.unknown(node, f"{an.describe(node)} is not supported")
    out = x
    for d, (a, s) in enumerate(zip(x.shape, shape)):
        if a != s:
            if d in x.feature_dims():
                return an.unknown(node, f"{an.describe(node)} broadcasts a channel axis")
            out = L.with_non_feature_size(out, d, s)
    return an.keep(out)


def _index(an, node, x: Layout, dim: int, index):
    dim %= x.ndim
    if dim not in x.feature_dims():
        if isinstance(index, int):
            return an.keep(L.squeeze(L.with_non_feature_size(x, dim, 1), [dim]))
        return an.keep(L.with_non_feature_size(x, dim, shape_of(node)[dim]))
    out = L.index_feature_dim(x, dim, index)
    if out is None:
        return an.unknown(node, f"{an.describe(node)} indexes an axis that mixes channels with other axes")
    return an.keep(out)


@rule(aten.select)
def select(an, node):
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    return _index(an, node, x, node.args[1], node.args[2] % x.shape[node.args[1] % x.ndim])


def _slice_of(x: Layout, dim: int, start, end, step) -> slice:
    n = x.shape[dim % x.ndim]
    start = 0 if start is None else start
    end = n if end is None else end
    return slice(*slice(start, end, step).indices(n))


@rule(aten.slice)
def slice_(an, node):
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    dim = _arg(node, 1, "dim", 0)
    sl = _slice_of(x, dim, _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
    if sl == slice(0, x.shape[dim % x.ndim], 1):
        return x
    return _index(an, node, x, dim, sl)


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split)
def split(an, node):
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    op = node.target.overloadpacket
    if op is aten.unbind:
        dim = _arg(node, 1, "dim", 0) % x.ndim
        return [_index(an, node, x, dim, i) for i in range(x.shape[dim])]
    dim = _arg(node, 2, "dim", 0) % x.ndim
    n = x.shape[dim]
    arg = node.args[1]
    if op is aten.chunk:
        size = -(-n // arg)
        sizes = [min(size, n - i) for i in range(0, n, size)]
    elif op is aten.tensor_split:
        return an.unknown(node, f"{an.describe(node)} is not supported")
    elif isinstance(arg, int):
        sizes = [min(arg, n - i) for i in range(0, n, arg)]
    else:
        sizes = list(arg)
    out, start = [], 0
    for s in sizes:
        out.append(_index(an, node, x, dim, slice(start, start + s, 1)))
        start += s
    return out


@rule(operator.getitem)
def getitem(an, node):
    x = an.value(node.args[0])
    if isinstance(x, list | tuple):
        return x[node.args[1]]
    return None if x is None else NON_TENSOR


@rule(aten.cat, aten.concat)
def cat(an, node):
    parts = [(a, an.value(a)) for a in node.args[0]]
    shape = shape_of(node)
    dim = _arg(node, 1, "dim", 0) % len(shape)
    hidden = [v for _, v in parts if _is_hidden(v)]
    parts = [(a, v) for a, v in parts if _is_hidden(v) or (shape_of(a) and int(np.prod(shape_of(a))) > 0)]
    ref = hidden[0]
    if dim not in ref.feature_dims():
        for a, v in parts:
            if isinstance(v, ParamRef):  # a class token: moves with the channels it is concatenated to
                part_shape = shape_of(a)
                got = param_atoms(L.with_non_feature_size(ref, dim, part_shape[dim]), v, part_shape)
                if got is None:
                    return an.unknown(node, f"{an.describe(node)} concatenates a parameter that is not per-channel")
                an.bind(Binding(v.name, None, "out", got[0], got[1]))
            elif not _is_hidden(v) or not L.same_structure(ref, v) or not np.array_equal(ref.atoms, v.atoms):
                return an.unknown(node, f"{an.describe(node)} concatenates values with different channels")
        return an.keep(L.with_non_feature_size(ref, dim, shape[dim]))
    # along a channel axis: the axis must be one feature factor in every part
    atoms, chains = [], []
    for a, v in parts:
        if not _is_hidden(v):
            s = shape_of(a)
            if ref.simple_dim() != dim:
                return an.unknown(node, f"{an.describe(node)} concatenates along a mixed axis")
            atoms.append(np.full(s[dim], FIXED, np.int64))
            chains.append(np.zeros(s[dim], np.int64))
            continue
        fd = [f for _, f in v.dims[dim]]
        if len(fd) != 1 or v.fsizes[:fd[0]] != ref.fsizes[:fd[0]] or v.fsizes[fd[0] + 1:] != ref.fsizes[fd[0] + 1:]:
            return an.unknown(node, f"{an.describe(node)} concatenates along a mixed axis")
        k = fd[0]
        atoms.append(np.moveaxis(v.atoms.reshape(v.fsizes), k, 0))
        chains.append(np.moveaxis(v.chains.reshape(v.fsizes), k, 0))
    k = [f for _, f in ref.dims[dim]][0]
    if any(a.ndim == 1 for a in atoms) and len(ref.fsizes) > 1:
        return an.unknown(node, f"{an.describe(node)} concatenates untransformed values along a mixed axis")
    A = np.moveaxis(np.concatenate(atoms, 0), 0, k)
    C = np.moveaxis(np.concatenate(chains, 0), 0, k)
    fsizes = tuple(A.shape)
    dims = tuple(((fsizes[k], k),) if i == dim else d for i, d in enumerate(ref.dims))
    return an.keep(Layout(np.ascontiguousarray(A).reshape(-1), np.ascontiguousarray(C).reshape(-1), fsizes, dims))


@rule(aten.constant_pad_nd, aten.pad)
def pad(an, node):
    """Zero padding: spatial axes act on every channel alike; padding the channel axis adds zero channels."""
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    pads = list(node.args[1])
    mode = _arg(node, 2, "mode", "constant") if node.target.overloadpacket is aten.pad else "constant"
    value = _arg(node, 2 if node.target.overloadpacket is aten.constant_pad_nd else 3, "value", 0) or 0
    out = x
    for i in range(len(pads) // 2):
        d = x.ndim - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        if (lo, hi) == (0, 0):
            continue
        if d in x.feature_dims():
            if x.simple_dim() != d or mode != "constant" or value != 0 or lo < 0 or hi < 0:
                return an.unknown(node, f"{an.describe(node)} pads the channel axis with non-zero values")
            out = out.derive(atoms=np.concatenate([np.full(lo, ZERO, np.int64), out.atoms,
                                                   np.full(hi, ZERO, np.int64)]),
                             chains=np.concatenate([np.zeros(lo, np.int64), out.chains, np.zeros(hi, np.int64)]),
                             fsizes=(out.fsizes[0] + lo + hi,),
                             dims=tuple(((out.fsizes[0] + lo + hi, 0),) if j == d else dd
                                        for j, dd in enumerate(out.dims)))
        else:
            out = L.with_non_feature_size(out, d, shape_of(node)[d])
    if value != 0 and mode == "constant":
        an.constrain(ConstantAdd, x.atoms, x.chains)
    return an.keep(out)


# ---------------------------------------------------------------------------------------------------------
# Spatial operations and reductions
# ---------------------------------------------------------------------------------------------------------

@rule(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
      aten.adaptive_max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
      aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
      aten.reflection_pad1d, aten.reflection_pad2d, aten.replication_pad1d, aten.replication_pad2d,
      aten.max_pool2d_with_indices)
def spatial(an, node):
    """Pooling, upsampling, reflection padding: the same on every channel (max pooling: positive scalings)."""
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    shape = shape_of(node)
    op = node.target.overloadpacket
    if shape is None or x.simple_dim() != 1 or op in (aten.max_pool2d_with_indices, aten.adaptive_max_pool2d) \
            and shape is None:
        return an.unknown(node, f"{an.describe(node)} needs channels on axis 1")
    if "max" in str(op):
        an.constrain(PositiveScales, x.atoms, x.chains)
    out = x
    for d in range(2, len(shape)):
        out = L.with_non_feature_size(out, d, shape[d])
    return an.keep(out)


@rule(aten.mean, aten.sum, aten.amax, aten.var, aten.std)
def reduce(an, node):
    """Over non-channel axes: channels pass; over all channel axes: the result is untransformed, and the sum
    must not see a scaling (permutations only)."""
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    dims = _arg(node, 1, "dim")
    if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
        dims = list(range(x.ndim))
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else list(dims))}
    keep = bool(_arg(node, 2, "keepdim", False)) or node.kwargs.get("keepdim", False)
    if node.target.overloadpacket in (aten.var, aten.std):
        keep = node.kwargs.get("keepdim", False)
    fdims = set(x.feature_dims())
    if fdims <= dims:
        an.constrain(Unit, x.atoms, x.chains)
        return None
    if fdims & dims:
        return an.unknown(node, f"{an.describe(node)} reduces over part of the channel axes")
    out = x
    for d in sorted(dims):
        out = L.with_non_feature_size(out, d, 1)
    if not keep:
        out = L.squeeze(out, sorted(dims))
    return an.keep(out)


# ---------------------------------------------------------------------------------------------------------
# Arithmetic outside activations: residual additions, products with per-channel tensors, gating
# ---------------------------------------------------------------------------------------------------------

def param_atoms(x: Layout, p: ParamRef, out_shape) -> tuple[np.ndarray, np.ndarray] | None:
    """(atoms, chains) of every element of parameter ``p`` (in its flat order) when it is broadcast against x
    and varies along all of x's channel axes at full size (it may also vary along other axes, e.g. a
    position embedding (1, tokens, C)); None otherwise."""
    pshape = (1,) * (len(out_shape) - len(p.shape)) + tuple(p.shape)
    if len(pshape) != x.ndim:
        return None
    fdims = x.feature_dims()
    if any(pshape[d] != x.shape[d] for d in fdims):
        return None
    idx = L.feature_index(x, fdims)
    if idx is None:
        return None
    view = [1] * x.ndim
    for d in fdims:
        view[d] = x.shape[d]
    full = np.broadcast_to(idx.reshape(view), pshape).reshape(-1)
    if int(np.prod(p.shape)) != len(full):
        return None
    return x.atoms[full], x.chains[full]


def _broadcast_param(x: Layout, p: ParamRef, out_shape) -> list[int] | None:
    """The tensor dims along which parameter ``p`` (broadcast to the output) varies, if they are exactly
    the dims that hold x's channels."""
    pshape = (1,) * (len(out_shape) - len(p.shape)) + tuple(p.shape)
    varying = [d for d, s in enumerate(pshape) if s != 1]
    if set(varying) != set(x.feature_dims()) or any(pshape[d] != x.shape[d] for d in varying):
        return None
    return varying


def _constant_along_channels(an, arg, x: Layout, out_shape) -> bool:
    s = shape_of(arg) if isinstance(arg, fx.Node) else ()
    if s is None:
        return False
    s = (1,) * (len(out_shape) - len(s)) + tuple(s)
    return all(s[d] == 1 for d in x.feature_dims())


@rule(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub)
def add(an, node):
    a, b = an.value(node.args[0]), an.value(node.args[1])
    alpha = node.kwargs.get("alpha", 1)
    shape = shape_of(node)
    if _is_hidden(a) and _is_hidden(b):
        if not L.same_structure(a, b) or alpha == 0:
            return an.unknown(node, f"{an.describe(node)} adds values with different channel layouts")
        an.union_arrays(a.atoms, b.atoms, 0, f"{an.describe(node)}")
        an.adds.append((a.atoms, a.chains, b.atoms, b.chains))
        atoms = np.where(a.atoms >= 0, a.atoms, np.where(b.atoms >= 0, b.atoms, np.where(
            (a.atoms == FIXED) | (b.atoms == FIXED), FIXED, ZERO)))
        chains = np.where(a.atoms >= 0, a.chains, b.chains)
        base = a if a.shape == tuple(shape) else b
        return an.keep(base.derive(atoms=atoms, chains=chains))
    x, other, other_node = (a, b, node.args[1]) if _is_hidden(a) else (b, a, node.args[0])
    if not _is_hidden(x):
        return None
    if isinstance(other, ParamRef) and _constant_along_channels(an, other_node, x, shape):
        other = None  # a parameter/buffer that is the same for every channel (an attention mask): a constant
    if isinstance(other, ParamRef):
        got = param_atoms(x, other, shape)
        if got is None or node.target.overloadpacket is aten.rsub:
            return an.unknown(node, f"{an.describe(node)} adds a parameter that is not per-channel")
        an.bind(Binding(other.name, None, "out", got[0], got[1]))
        return an.keep(x.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms)))
    if isinstance(other, int | float):
        if other != 0:
            an.constrain(ConstantAdd, x.atoms, x.chains)
        return x if other == 0 else an.keep(x.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms)))
    if other is None and _constant_along_channels(an, other_node, x, shape):
        an.constrain(ConstantAdd, x.atoms, x.chains)
        out = x if x.shape == tuple(shape) else _broadcast(x, shape)
        return an.keep(out.derive(atoms=np.where(x.atoms == ZERO, FIXED, x.atoms)))
    return an.unknown(node, f"{an.describe(node)} adds an untransformed tensor that varies across channels")


def _broadcast(x: Layout, shape) -> Layout:
    out = x
    while out.ndim < len(shape):
        out = L.unsqueeze(out, 0)
    for d, s in enumerate(shape):
        if out.shape[d] != s:
            out = L.with_non_feature_size(out, d, s)
    return out


@rule(aten.mul, aten.mul_, aten.div, aten.div_)
def mul(an, node):
    a, b = an.value(node.args[0]), an.value(node.args[1])
    shape = shape_of(node)
    div = node.target.overloadpacket in (aten.div, aten.div_)
    if _is_hidden(a) and _is_hidden(b):
        if div:
            return an.unknown(node, f"{an.describe(node)} divides two hidden values")
        return gate(an, node, a, b, shape)
    x, other, other_node = (a, b, node.args[1]) if _is_hidden(a) else (b, a, node.args[0])
    if not _is_hidden(x):
        return None
    if div and x is not a:
        return an.unknown(node, f"{an.describe(node)} divides by a hidden value")
    out = x if x.shape == tuple(shape) else _broadcast(x, shape)
    if isinstance(other, int | float):
        return x if other != 0 else an.unknown(node, "multiplication by zero")
    if isinstance(other, ParamRef | DerivedParam) and _constant_along_channels(an, other_node, x, shape):
        return an.keep(out)  # a scalar (or per-token) parameter/buffer: commutes with any linear map
    if isinstance(other, ParamRef | DerivedParam):
        got = param_atoms(x, other, shape)
        if got is None or div:
            return an.unknown(node, f"{an.describe(node)} multiplies by a parameter that is not per-channel")
        an.constrain(Monomial, x.atoms, x.chains)
        an.bind(Binding(other.name, None, "scale", got[0], got[1], got[0], got[1]))
        return an.keep(out)
    if other is None and _constant_along_channels(an, other_node, x, shape):
        return an.keep(out)  # a per-token/per-pixel factor (RMSNorm's 1/rms) commutes with any linear map
    if other is None and not div:
        coarse = coarsen(an, x, other_node, shape)
        if coarse is not None:
            return an.keep(coarse if coarse.shape == tuple(shape) else _broadcast(coarse, shape))
    return an.unknown(node, f"{an.describe(node)} multiplies by a tensor that varies across channels")


def coarsen(an, x: Layout, other_node, shape) -> Layout | None:
    """x * c with c untransformed and varying along some channel axes V (rotary embeddings: cos/sin vary along
    the head width, not across heads): the transform must act alike at every V coordinate. Tie the channels
    that differ only in their V coordinates (then a space element acts per remaining coordinate, e.g. one
    scalar per head, and commutes with c)."""
    s = shape_of(other_node)
    if s is None:
        return None
    s = (1,) * (len(shape) - len(s)) + tuple(s)
    varying = set()
    for d in x.feature_dims():
        if s[d] > 1:
            facs = [f for _, f in x.dims[d]]
            if len(facs) != 1:
                return None
            varying.add(facs[0])
    if not varying:
        return None
    if len(varying) == len(x.fsizes):   # c varies along every channel: only a scalar multiple of I commutes
        an.union_arrays(x.atoms, np.full_like(x.atoms, x.atoms[0]), 0,
                        f"{an.describe(other_node)} (channels tied by a factor that varies along all of them)")
        return x
    A = x.atoms.reshape(x.fsizes)
    idx = tuple(slice(0, 1) if f in varying else slice(None) for f in range(len(x.fsizes)))
    base = np.broadcast_to(A[idx], A.shape)
    an.union_arrays(A.reshape(-1), base.reshape(-1), 0, f"{an.describe(other_node)} (channels tied by a factor "
                                                        "that varies along them)")
    return x


def gate(an, node, a: Layout, b: Layout, shape):
    """x * g with both hidden (gated MLPs, squeeze-excitation): one permutation for both; the gate must carry
    no scaling, the product carries x's transform."""
    if not L.same_structure(a, b):
        return an.unknown(node, f"{an.describe(node)} multiplies hidden values with different channel layouts")
    na, nb = int(np.prod(a.shape)), int(np.prod(b.shape))
    a_one, b_one = (bool(np.all([an.chains[int(c)][:1] == (ONE,) for c in np.unique(v.chains)])) for v in (a, b))
    if na != nb:
        x, g = (a, b) if na > nb else (b, a)
    elif a_one != b_one:  # the unscaled gate branch (see _feeds_only_gate) is g
        x, g = (b, a) if a_one else (a, b)
    else:
        x, g = (a, b) if len(an.chains[int(b.chains[0])]) >= len(an.chains[int(a.chains[0])]) else (b, a)
    an.union_arrays(x.atoms, g.atoms, 0, f"{an.describe(node)} (product of two hidden values)")
    an.constrain(Unit, g.atoms, g.chains)
    an.constrain(Monomial, x.atoms, x.chains)
    out = x if x.shape == tuple(shape) else _broadcast(x, shape)
    return an.keep(out.derive(atoms=np.where((x.atoms == ZERO) | (g.atoms == ZERO), ZERO,
                                             np.where(x.atoms >= 0, x.atoms, g.atoms))))


@rule(aten.where)
def where(an, node):
    """where(mask, x, c) with a mask and a value c that are the same for every channel (a causal mask written
    with ``torch.where``): channels pass; c is not scaled, so permutations only."""
    if len(node.args) != 3:
        return an.unknown(node)
    cond, a, b = (an.value(v) for v in node.args)
    shape = shape_of(node)
    if _is_hidden(cond) or (_is_hidden(a) == _is_hidden(b)) or shape is None:
        return an.unknown(node, f"{an.describe(node)}: a selection between values with channels")
    x, other = (a, node.args[2]) if _is_hidden(a) else (b, node.args[1])
    for arg in (node.args[0], other):
        if isinstance(arg, fx.Node) and not _constant_along_channels(an, arg, x, shape):
            return an.unknown(node, f"{an.describe(node)}: a mask or value that varies across channels")
    an.constrain(Unit, x.atoms, x.chains)
    return an.keep(x if x.shape == tuple(shape) else _broadcast(x, shape))


@rule(aten.neg)
def neg(an, node):
    x = an.value(node.args[0])
    return x if _is_hidden(x) else None


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------

def _whole_heads(an, node, table: np.ndarray) -> None:
    """Partial rotary embeddings (GPT-NeoX, Phi) tie the rotated channels of a head but not the others: tie
    the whole head then (one scalar per head on queries/keys, a subgroup of the true blockdiag(c·I, GL))."""
    for row in table:
        row = row[row >= 0]
        if len(row) > 1 and 1 < len({an.find(int(a))[0] for a in row}) < len(row):
            an.union_arrays(row, np.full_like(row, row[0]), 0, f"{an.describe(node)} (partially rotated head)")


def _tie_queries_keys(an, node, qa, qc, ka, kc, repeat: bool):
    """Tie query and key channels per head with a dual transform (W_Q -> A W_Q, W_K -> A^-T W_K); keys of
    fewer heads are repeated when ``repeat`` (grouped-query attention). (queries, keys) tables, or the reason
    they cannot be tied."""
    _whole_heads(an, node, qa)
    _whole_heads(an, node, ka)
    if repeat and ka.shape[0] != qa.shape[0] and ka.shape[0] and qa.shape[0] % ka.shape[0] == 0:
        ka, kc = (np.repeat(t, qa.shape[0] // ka.shape[0], 0) for t in (ka, kc))
    if ka.shape != qa.shape:
        return "unexpected head shapes"
    if not np.array_equal(qc, kc):
        return "queries and keys carry different transforms"
    an.union_arrays(qa.reshape(-1), ka.reshape(-1), 1, f"{an.describe(node)}")
    return qa, ka


def _record_attention(an, node, qa, ka, va, heads=None) -> None:
    an.attention.append(AttentionRecord(node.name, qa, ka, va, len({tuple(r) for r in va.tolist()}), heads))


@rule(aten.scaled_dot_product_attention)
def attention(an, node):
    """softmax(q k^T / s + mask) v per head: (q, k) -> (A q, A^-T k) and v -> B v per head, heads permuted
    together. Keys are tied to queries with a dual transform; the output carries the values' transform."""
    q, k, v = (an.value(a) for a in node.args[:3])
    mask = an.value(_arg(node, 3, "attn_mask"))
    if _is_hidden(v) and not _is_hidden(mask) and q is None and k is None:
        got = L.atoms_along(v, [v.ndim - 3, v.ndim - 1])
        if got is None:
            return an.unknown(node, f"{an.describe(node)}: channels outside the head and head-width axes")
        va = got[0]
        H = (shape_of(node) or v.shape)[-3]
        if va.shape[0] != H:
            va = np.repeat(va, H // va.shape[0], 0)
        _record_attention(an, node, None, None, va)
        return an.keep(L.with_non_feature_size(v, v.ndim - 2, shape_of(node)[-2]))
    if _is_hidden(mask) or not all(_is_hidden(t) for t in (q, k, v)):
        return an.unknown(node, f"{an.describe(node)}: queries, keys and values must all be hidden values "
                                "(and the mask untransformed)")
    tables = []
    for t in (q, k, v):
        got = L.atoms_along(t, [t.ndim - 3, t.ndim - 1])
        if got is None:
            return an.unknown(node, f"{an.describe(node)}: channels outside the head and head-width axes")
        tables.append(got)
    (qa, qc), (ka, kc), (va, _) = tables
    gqa = node.kwargs.get("enable_gqa", False)
    if gqa and va.shape[0] != qa.shape[0]:
        va = np.repeat(va, qa.shape[0] // va.shape[0], 0)
    if va.shape[0] != qa.shape[0]:
        return an.unknown(node, f"{an.describe(node)}: unexpected head shapes")
    tied = _tie_queries_keys(an, node, qa, qc, ka, kc, repeat=gqa)
    if isinstance(tied, str):
        return an.unknown(node, f"{an.describe(node)}: {tied}")
    _record_attention(an, node, tied[0], tied[1], va)
    shape = shape_of(node)
    out = v
    if v.shape != tuple(shape):
        out = L.with_non_feature_size(v, v.ndim - 2, shape[-2])
        if out.shape != tuple(shape):
            return an.unknown(node, f"{an.describe(node)}: unexpected output shape")
    return an.keep(out)


def attention_product(an, node, a: Layout, b: Layout):
    """Attention written out, ``softmax(q @ k^T * s + mask) @ v`` on (..., heads, tokens, width) values.

    ``q @ k^T`` contracts the head width of queries and keys: they are tied with a dual transform per head
    (as for scaled_dot_product_attention) and the scores get fresh *head atoms* on their head axis.
    ``p @ v`` with ``p`` holding such head atoms records the attention block (queries, keys, values and
    the head atoms, which resolve checks: nothing else may read the scores)."""
    nd = a.ndim
    shape = shape_of(node)
    if nd < 3 or b.ndim != nd or shape is None:
        return an.unknown(node, f"{an.describe(node)}: a product of hidden values that is not attention")
    fa, fb = set(a.feature_dims()), set(b.feature_dims())
    if nd - 1 in fa and nd - 2 not in fa and nd - 2 in fb and nd - 1 not in fb:       # q @ k^T
        q, k = L.atoms_along(a, [nd - 3, nd - 1]), L.atoms_along(b, [nd - 3, nd - 2])
        if q is None or k is None:
            return an.unknown(node, f"{an.describe(node)}: channels outside the head and head-width axes")
        tied = _tie_queries_keys(an, node, q[0], q[1], k[0], k[1], repeat=True)
        if isinstance(tied, str):
            return an.unknown(node, f"{an.describe(node)}: {tied}")
        heads = an.new_atoms(tied[0].shape[0])
        an.scores[int(heads[0])] = tied
        return an.keep(L.simple(heads, np.zeros(len(heads), np.int64), shape, nd - 3))
    if fa == {nd - 3} and a.simple_dim() == nd - 3 and int(a.atoms[0]) in an.scores \
            and nd - 1 in fb and nd - 2 not in fb:                                         # p @ v
        qa, ka = an.scores.pop(int(a.atoms[0]))
        got = L.atoms_along(b, [nd - 3, nd - 1])
        if got is None:
            return an.unknown(node, f"{an.describe(node)}: channels outside the head and head-width axes")
        va = got[0]
        H = qa.shape[0]
        if va.shape[0] != H and va.shape[0] and H % va.shape[0] == 0:
            va = np.repeat(va, H // va.shape[0], 0)
        if va.shape[0] != H or len(a.atoms) != H:
            return an.unknown(node, f"{an.describe(node)}: unexpected head shapes")
        _record_attention(an, node, qa, ka, va, heads=a.atoms)
        return an.keep(L.with_non_feature_size(b, nd - 2, shape[nd - 2]))
    return an.unknown(node, f"{an.describe(node)}: a product of hidden values that is not attention")


@rule(aten.softmax, aten._softmax, aten._safe_softmax, aten.log_softmax, aten._log_softmax)
def softmax(an, node):
    """Along an axis without channels (attention scores over tokens): commutes with permutations only."""
    x = an.value(node.args[0])
    if not _is_hidden(x):
        return None
    if node.args[1] % x.ndim in x.feature_dims():
        return an.unknown(node, f"{an.describe(node)}: a softmax across channels")
    an.constrain(Unit, x.atoms, x.chains)
    return x


# ---------------------------------------------------------------------------------------------------------
# Activations: regions of elementwise operations
# ---------------------------------------------------------------------------------------------------------

_UNARY = {aten.relu, aten.relu_, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.gelu, aten.gelu_,
          aten.silu, aten.silu_, aten.elu, aten.elu_, aten.leaky_relu, aten.leaky_relu_, aten.hardtanh,
          aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.softplus,
          aten.abs, aten.exp, aten.erf, aten.mish, aten.celu, aten.selu, aten.relu6, aten.pow, aten.square,
          aten.clamp, aten.clamp_min, aten.clamp_max, aten.log_sigmoid, aten.sin, aten.cos, aten.neg,
          aten.reciprocal, aten.sqrt, aten.rsqrt, aten.log, aten.tanh_}
_BINARY = {aten.mul, aten.mul_, aten.add, aten.add_, aten.sub, aten.sub_, aten.div, aten.div_, aten.rsub,
           aten.pow}
_NAMES = {aten.relu: "relu", aten.relu_: "relu", aten.sigmoid: "sigmoid", aten.sigmoid_: "sigmoid",
          aten.tanh: "tanh", aten.tanh_: "tanh", aten.gelu: "gelu", aten.gelu_: "gelu", aten.silu: "silu",
          aten.silu_: "silu", aten.elu: "elu", aten.elu_: "elu", aten.leaky_relu: "leaky_relu",
          aten.leaky_relu_: "leaky_relu", aten.softplus: "softplus", aten.abs: "abs", aten.hardtanh: "hardtanh",
          aten.hardtanh_: "hardtanh", aten.hardswish: "hardswish", aten.hardswish_: "hardswish",
          aten.hardsigmoid: "hardsigmoid", aten.hardsigmoid_: "hardsigmoid", aten.mish: "mish",
          aten.celu: "celu", aten.selu: "selu", aten.relu6: "relu6"}
# functional activations that the site scheme lists (same names as intertwiners.activations)
_SITE_FUNCTIONS = {"relu", "sigmoid", "tanh", "leaky_relu", "gelu", "silu", "elu", "softplus", "abs"}


def _packet(node):
    return getattr(node.target, "overloadpacket", None)


def _scalar(a) -> bool:
    return isinstance(a, int | float) and not isinstance(a, bool)


def find_regions(an: Analysis) -> dict:
    """node -> region (a dict with root, members, output) for every member of a valid elementwise region."""
    root_of: dict[fx.Node, fx.Node] = {}
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in an.cap.graph.nodes:
        if node.op != "call_function":
            continue
        p = _packet(node)
        if p not in _UNARY and p not in _BINARY:
            continue
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        others = [a for a in node.args if not isinstance(a, fx.Node)]
        if not tensor_args or any(not (_scalar(a) or a is None or isinstance(a, str | bool)) for a in others):
            continue
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            continue
        roots = {root_of.get(a, a) for a in tensor_args}
        if len(roots) != 1:
            continue
        root = roots.pop()
        if root.op == "placeholder" and root.name in an.cap.params:
            continue
        root_of[node] = root
        members.setdefault(root, []).append(node)
    regions = {}
    for root, ms in members.items():
        mset = set(ms)
        outputs = [m for m in ms if any(u not in mset for u in m.users) or not m.users]
        if len(outputs) != 1 or outputs[0] is not ms[-1]:
            # not one function of the root: fall back to single-node regions where possible
            for m in ms:
                if len([a for a in m.args if isinstance(a, fx.Node)]) == 1:
                    regions[m] = dict(root=[a for a in m.args if isinstance(a, fx.Node)][0], members=[m], output=m)
            continue
        reg = dict(root=root, members=ms, output=ms[-1])
        for m in ms:
            regions[m] = reg
    return regions


def _region_callable(reg):
    root, ms = reg["root"], reg["members"]

    def sigma(t):
        env = {root: t}
        for m in ms:
            args = [env[a] if isinstance(a, fx.Node) else a for a in m.args]
            kwargs = {k: (env[v] if isinstance(v, fx.Node) else v) for k, v in m.kwargs.items()}
            target = m.target
            if str(_packet(m)).endswith("_") or getattr(target, "__name__", "").endswith("_"):
                args[0] = args[0].clone()
            env[m] = target(*args, **kwargs)
        return env[ms[-1]]
    return sigma


def _signature(reg) -> tuple:
    idx = {reg["root"]: -1}
    sig = []
    for i, m in enumerate(reg["members"]):
        idx[m] = i
        sig.append((str(m.target), tuple(("n", idx[a]) if isinstance(a, fx.Node) else a for a in m.args),
                    tuple(sorted((k, str(v)) for k, v in m.kwargs.items()))))
    return tuple(sig)


def _named(reg) -> str | None:
    """The Table 1 name of a one-operation region ('relu', 'leaky_relu:0.2', ...), when it has one."""
    ms = reg["members"]
    if len(ms) != 1:
        return None
    m = ms[0]
    name = _NAMES.get(_packet(m))
    extra = [a for a in m.args[1:]]
    if name in ("relu", "sigmoid", "tanh", "silu", "abs") and not extra and not m.kwargs:
        return name
    if name == "gelu" and m.kwargs.get("approximate", "none") == "none" and not extra:
        return "gelu"
    if name == "leaky_relu":
        slope = extra[0] if extra else m.kwargs.get("negative_slope", 0.01)
        return f"leaky_relu:{float(slope)}"
    return None


def _site_name(an: Analysis, reg) -> str | None:
    """The activation site of a region: its module's name for an activation module, ``enclosing:function``
    for a functional activation, None for arithmetic without an activation function."""
    out = reg["output"]
    path, _ = owner(out)
    try:
        mod = an.model.get_submodule(path) if path else an.model
    except AttributeError:
        mod = None
    own = len({owner(m)[0] for m in reg["members"]}) == 1
    if path and own and (isinstance(mod, ACTIVATION_MODULES) or type(mod).__name__.endswith("Activation")):
        base = path
    else:
        fn = [_NAMES[_packet(m)] for m in reg["members"] if _packet(m) in _NAMES]
        fn = [f for f in fn if f in _SITE_FUNCTIONS]
        if not fn:
            return None
        base = f"{path}:{fn[-1]}"
    k = an.site_counts[base]
    an.site_counts[base] += 1
    return base if k == 0 else f"{base}#{k}"


def region_rule(an: Analysis, node: fx.Node):
    reg = an.regions[node]
    if node is not reg["output"]:
        return NON_TENSOR  # an inner member: only the output is a value others read
    x = an.value(reg["root"])
    if not _is_hidden(x):
        return None
    site = _site_name(an, reg)
    if site is not None:
        an.sites.append((site, x))
    first = reg["members"][0]
    if (str(_packet(first)).endswith("_") or str(first.target).split(".")[-2].endswith("_")) \
            and len(reg["root"].users) > 1:
        an.pin(x, f"an in-place activation {an.describe(first)} overwrites a value that other operations also read")
        return None
    key, group = _group_for(an, reg)
    if isinstance(group, str):
        an.pin(x, f"activation {an.describe(node)}: {group}")
        return None
    out_shape = shape_of(node)
    if group.kind == "general_linear":  # sigma(x) = a·x commutes with every linear map: nothing changes
        return x if x.shape == tuple(out_shape) else an.keep(_broadcast(x, out_shape))
    an.constrain(Activation, x.atoms, x.chains, key=key)
    zero_stays = group.sigma0 is not None and group.sigma0 == 0.0
    atoms = x.atoms if zero_stays else np.where(x.atoms == ZERO, FIXED, x.atoms)
    base = x if x.shape == tuple(out_shape) else _broadcast(x, out_shape)
    return an.keep(base.derive(atoms=atoms, chains=an.extend_chains(x.chains, key)))


_GROUP_CACHE: dict = {}


def _group_for(an: Analysis, reg):
    named = _named(reg)
    sig = named or _signature(reg)
    cache = an.__dict__.setdefault("_region_groups", {})
    if sig in cache:
        return cache[sig]
    if sig in _GROUP_CACHE:
        key_name, group = _GROUP_CACHE[sig]
    else:
        try:
            group = G.intertwiner_group(named) if named else _exact_or_derived(reg)
        except Exception as err:
            group = f"no intertwiner group: {err}"
        key_name = named or _readable(reg)
        _GROUP_CACHE[sig] = (key_name, group)
    key = key_name
    k = 1
    while key in an.groups and an.groups[key] is not group:
        key, k = f"{key_name}#{k}", k + 1
    if not isinstance(group, str):
        an.groups[key] = group
    cache[sig] = (key, group)
    return key, group


def _exact_or_derived(reg):
    """One built-in activation call: its module's exact rule (groups.functional_group) when available;
    otherwise (or for a chain of operations) the group derived from the region as a callable."""
    ms = reg["members"]
    exact = getattr(G, "functional_group", None)
    if exact is not None and len(ms) == 1 and _packet(ms[0]) in _NAMES:
        try:
            return exact(_NAMES[_packet(ms[0])], *ms[0].args[1:], **ms[0].kwargs)
        except ValueError:
            pass
    return G.intertwiner_group(_region_callable(reg))


def _readable(reg) -> str:
    ops = [str(_packet(m)).split(".")[-1] for m in reg["members"]]
    return "∘".join(ops[::-1]) if len(ops) <= 4 else f"{ops[-1]}∘…∘{ops[0]} ({len(ops)} ops)"
