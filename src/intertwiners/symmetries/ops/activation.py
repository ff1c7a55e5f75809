"""Activations: chains of elementwise operations on one hidden value, each one activation sigma.

A maximal set of elementwise operations on one hidden value with constant operands (``relu``,
``0.5*x*(1+tanh(...))``, ``x*sigmoid(x)``, in-place variants) is one *region*: one activation whose
intertwiner group is derived like any callable's (:func:`intertwiners.groups.intertwiner_group`). The
region's output carries phi_sigma(A) (its chain gets the activation's key), its input is an activation
site. The same elementwise operation on a parameter (``1 + w``) is a :class:`DerivedParam` instead.
Both are *claims* (:func:`~intertwiners.symmetries.registry.claim`): they take nodes by their
neighbourhood, before the per-operation rules (``add``, ``mul``, ... in :mod:`.arithmetic`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ... import groups as G
from ...activations import ACTIVATION_MODULES
from ..capture import owner, shape_of
from ..context import Context
from ..layout import Layout
from ..records import DerivedParam, ParamRef
from ..registry import claim, has_user_rule

aten = torch.ops.aten

UNARY = {aten.relu, aten.relu_, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.gelu, aten.gelu_,
         aten.silu, aten.silu_, aten.elu, aten.elu_, aten.leaky_relu, aten.leaky_relu_, aten.hardtanh,
         aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_, aten.softplus,
         aten.abs, aten.exp, aten.erf, aten.mish, aten.celu, aten.selu, aten.relu6, aten.pow, aten.square,
         aten.clamp, aten.clamp_min, aten.clamp_max, aten.log_sigmoid, aten.sin, aten.cos, aten.neg,
         aten.reciprocal, aten.sqrt, aten.rsqrt, aten.log}
BINARY = {aten.mul, aten.mul_, aten.add, aten.add_, aten.sub, aten.sub_, aten.div, aten.div_, aten.rsub,
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


def packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def is_scalar(a) -> bool:
    return isinstance(a, int | float) and not isinstance(a, bool)


def _constant_operands(node: fx.Node, tensor) -> bool:
    return all(is_scalar(a) or a is None or isinstance(a, str | bool) for a in node.args if a is not tensor) \
        and not any(isinstance(v, fx.Node) for v in node.kwargs.values())


@dataclass(frozen=True, eq=False)
class Region:
    """One activation: ``members`` (elementwise nodes in graph order) computing ``output`` from ``root``."""
    root: fx.Node
    members: tuple
    output: fx.Node


# ---------------------------------------------------------------------------------------------------------
# Finding regions
# ---------------------------------------------------------------------------------------------------------

def find_regions(ctx: Context) -> dict[fx.Node, Region]:
    """node -> region for every member of a valid elementwise region of the graph."""
    root_of: dict[fx.Node, fx.Node] = {}
    members: dict[fx.Node, list[fx.Node]] = {}
    params = ctx.captured.params
    for node in ctx.graph.nodes:
        if node.op != "call_function" or has_user_rule(node):
            continue
        p = packet(node)
        if p not in UNARY and p not in BINARY:
            continue
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        others = [a for a in node.args if not isinstance(a, fx.Node)]
        if not tensor_args or any(not (is_scalar(a) or a is None or isinstance(a, str | bool)) for a in others):
            continue
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            continue
        roots = {root_of.get(a, a) for a in tensor_args}
        if len(roots) != 1:
            continue
        root = roots.pop()
        if root.op == "placeholder" and root.name in params:
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
                args = [a for a in m.args if isinstance(a, fx.Node)]
                if len(args) == 1:
                    regions[m] = Region(args[0], (m,), m)
            continue
        reg = Region(root, tuple(ms), ms[-1])
        for m in ms:
            regions[m] = reg
    return regions


def regions(ctx: Context) -> dict[fx.Node, Region]:
    """The regions of ``ctx``'s graph (found once per analysis)."""
    if "activation.regions" not in ctx.scratch:
        ctx.scratch["activation.regions"] = find_regions(ctx)
    return ctx.scratch["activation.regions"]


def feeds_activation(ctx: Context, node: fx.Node) -> bool:
    """Is ``node`` the input of an activation region (then a layer's output units are hidden units)?"""
    regs = regions(ctx)
    return any(u in regs and regs[u].root is node for u in node.users)


def feeds_only_gate(ctx: Context, node: fx.Node) -> bool:
    """Is ``node`` read only by an activation whose output is read only by products with another value
    (the gate branch of a gated MLP, act(W_gate x) * (W_up x))? Then the gate branch is only permuted
    and the other branch carries the scaling (the product has the same permutation and the other's scale)."""
    regs = regions(ctx)
    users = list(node.users)
    if not users or users[0] not in regs:
        return False
    reg = regs[users[0]]
    if reg.root is not node or any(u not in reg.members for u in users):
        return False
    products = list(reg.output.users)
    for u in products:
        if packet(u) is not aten.mul:
            return False
        others = [a for a in u.args if isinstance(a, fx.Node) and a is not reg.output]
        if len(others) != 1 or (others[0].op == "placeholder" and others[0].name in ctx.captured.params) \
                or others[0] in reg.members:
            return False
    return bool(products)


# ---------------------------------------------------------------------------------------------------------
# The claim: derived parameters, then regions
# ---------------------------------------------------------------------------------------------------------

@claim
def elementwise(ctx: Context, node: fx.Node):
    """``f(w)`` of a parameter is a derived parameter; a member of a region is part of an activation."""
    if node.op != "call_function":
        return None
    if _derived(ctx, node) is not None:
        return derived_param
    if node in regions(ctx):
        return region_rule
    return None


def _derived(ctx: Context, node: fx.Node) -> DerivedParam | None:
    p = packet(node)
    if p not in UNARY and p not in BINARY:
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensors) != 1 or not _constant_operands(node, tensors[0]):
        return None
    w = ctx.value(tensors[0])
    if not isinstance(w, ParamRef | DerivedParam) or shape_of(node) != tuple(w.shape):
        return None
    # c·w and w/c scale with w (a scaling of the result is one of w); 1 + w, exp(w) do not
    scales = p in (aten.mul, aten.mul_) or (p in (aten.div, aten.div_) and node.args[0] is tensors[0])
    return DerivedParam(w.name, tuple(w.shape), scales and (isinstance(w, ParamRef) or w.scales))


def derived_param(ctx: Context, node: fx.Node) -> DerivedParam:
    """``1 + w``, ``exp(w)``: an elementwise function of one parameter, with constants."""
    return _derived(ctx, node)


def region_rule(ctx: Context, node: fx.Node):
    """The region's output carries phi_sigma(A); its input is an activation site."""
    reg = regions(ctx)[node]
    if node is not reg.output:
        return None  # an inner member: only the output is a value others read
    x = ctx.value(reg.root)
    if not isinstance(x, Layout):
        return None
    site = _site_name(ctx, reg)
    first = reg.members[0]
    if (str(packet(first)).endswith("_") or str(first.target).split(".")[-2].endswith("_")) \
            and len(reg.root.users) > 1:
        if site is not None:
            ctx.record_site(site, x)
        ctx.pin(x, f"an in-place activation {ctx.describe(first)} overwrites a value that other operations "
                   "also read")
        ctx.pin_side(x, node)
        return None
    key = _group_key(ctx, reg)
    if site is not None:
        ctx.record_site(site, x, None if key.startswith("!") else key)
    if key.startswith("!"):
        ctx.pin(x, f"activation {ctx.describe(node)}: {key[1:]}")
        ctx.pin_side(x, node)
        return None
    return ctx.through_activation(node, x, key)


region_rule.side_aware = True


# ---------------------------------------------------------------------------------------------------------
# The group and the site of a region
# ---------------------------------------------------------------------------------------------------------

def _signature(reg: Region) -> tuple:
    idx = {reg.root: -1}
    sig = []
    for i, m in enumerate(reg.members):
        idx[m] = i
        sig.append((str(m.target), tuple(("n", idx[a]) if isinstance(a, fx.Node) else a for a in m.args),
                    tuple(sorted((k, str(v)) for k, v in m.kwargs.items()))))
    return tuple(sig)


def _named(reg: Region) -> str | None:
    """The Table 1 name of a one-operation region ('relu', 'leaky_relu:0.2', ...), when it has one."""
    if len(reg.members) != 1:
        return None
    m = reg.members[0]
    name = _NAMES.get(packet(m))
    extra = list(m.args[1:])
    if name in ("relu", "sigmoid", "tanh", "silu", "abs") and not extra and not m.kwargs:
        return name
    if name == "gelu" and m.kwargs.get("approximate", "none") == "none" and not extra:
        return "gelu"
    if name == "leaky_relu":
        slope = extra[0] if extra else m.kwargs.get("negative_slope", 0.01)
        return f"leaky_relu:{float(slope)}"
    return None


def _region_callable(reg: Region):
    def sigma(t):
        env = {reg.root: t}
        for m in reg.members:
            args = [env[a] if isinstance(a, fx.Node) else a for a in m.args]
            kwargs = {k: (env[v] if isinstance(v, fx.Node) else v) for k, v in m.kwargs.items()}
            if str(packet(m)).endswith("_") or getattr(m.target, "__name__", "").endswith("_"):
                args[0] = args[0].clone()
            env[m] = m.target(*args, **kwargs)
        return env[reg.members[-1]]
    return sigma


def _exact_or_derived(reg: Region):
    """One built-in activation call: its module's exact rule (groups.functional_group) when available;
    otherwise (or for a chain of operations) the group derived from the region as a callable."""
    ms = reg.members
    if len(ms) == 1 and packet(ms[0]) in _NAMES:
        try:
            return G.functional_group(_NAMES[packet(ms[0])], *ms[0].args[1:], **ms[0].kwargs)
        except ValueError:
            pass
    return G.intertwiner_group(_region_callable(reg))


def _readable(reg: Region) -> str:
    ops = [str(packet(m)).split(".")[-1] for m in reg.members]
    return "∘".join(ops[::-1]) if len(ops) <= 4 else f"{ops[-1]}∘…∘{ops[0]} ({len(ops)} ops)"


_GROUP_CACHE: dict = {}   # region signature -> (readable name, group or the reason there is none)


def _group_key(ctx: Context, reg: Region) -> str:
    """The key of the region's group in the analysis, or ``"!reason"`` when it has none."""
    named = _named(reg)
    sig = named or _signature(reg)
    if sig not in _GROUP_CACHE:
        try:
            group = G.intertwiner_group(named) if named else _exact_or_derived(reg)
        except G.NotFiniteError:
            # undefined on part of the line (rsqrt(v + eps) of a per-head norm's mean square): a function of
            # each element alone commutes with permutations of them whatever its domain
            group = G.kind_group("permutation", f"{_readable(reg)} (not finite on part of the line)")
        except Exception as err:  # noqa: BLE001 - any failure to classify sigma pins the space
            group = f"no intertwiner group: {err}"
        _GROUP_CACHE[sig] = (named or _readable(reg), group)
    name, group = _GROUP_CACHE[sig]
    return "!" + group if isinstance(group, str) else ctx.register_group(name, group)


def _site_name(ctx: Context, reg: Region) -> str | None:
    """The activation site of a region: its module's name for an activation module, ``enclosing:function``
    for a functional activation, None for arithmetic without an activation function."""
    path, _ = owner(reg.output)
    try:
        mod = ctx.model.get_submodule(path) if path else ctx.model
    except AttributeError:
        mod = None
    own = len({owner(m)[0] for m in reg.members}) == 1
    if path and own and (isinstance(mod, ACTIVATION_MODULES) or type(mod).__name__.endswith("Activation")):
        return ctx.site_name(path)
    fn = [_NAMES[packet(m)] for m in reg.members if packet(m) in _NAMES]
    fn = [f for f in fn if f in _SITE_FUNCTIONS]
    return ctx.site_name(f"{path}:{fn[-1]}") if fn else None
