"""The pass: walk a captured graph once, run each node's rule, and gather what they found.

For every node, :func:`~intertwiners.symmetries.registry.rule_for` picks the rule (a claim such as an
activation region, a user's rule, or the built-in rule for its operation); the rule turns its inputs'
values into its output's (:mod:`~intertwiners.symmetries.context`). A node without a rule that reads a
hidden value pins its channels; a rule that raises pins them with the error; side axes (MLP-Mixer's
token units) survive only rules that carry them. The families' finishers then settle what they kept
across nodes, and parameters used more than once (tied weights, a module called twice) are tied. The
result is one frozen :class:`~intertwiners.symmetries.records.Analysis`.
"""

from __future__ import annotations

from collections import defaultdict

import torch.fx as fx
from torch import nn

from . import ops  # noqa: F401 - registers the built-in rules
from .capture import Captured, shape_of
from .constraints import Signed
from .context import Context
from .layout import FIXED, Channels, Layout
from .records import (
    PARAMETER_VALUES,
    Analysis,
    ConcatParam,
    DerivedParam,
    GatheredParam,
    NormedWeight,
    ParamRef,
    ParamUse,
    ResampledParam,
    SlicedParam,
    StandardizedWeight,
)
from .registry import FINISHERS, rule_for


def analyse(cap: Captured, model: nn.Module) -> Analysis:
    """Run every node's rule on ``cap``'s graph (``model`` names activation modules for sites)."""
    ctx = Context(cap, model)
    unclaimed: dict[fx.Node, dict[str, ParamRef]] = {}
    for node in cap.graph.nodes:
        if node.op == "placeholder":
            name = cap.params.get(node.name)
            ctx.env[node] = ParamRef(name, shape_of(node) or ()) if name is not None else None
        elif node.op == "get_attr":
            ctx.env[node] = None
        elif node.op == "output":
            for lay in ctx.hidden_inputs(node):
                ctx.mark_output(lay)
            # a parameter returned (or a view of it, `model.embed.weight.t()`) is read untransformed
            _track_parameter_reads(ctx, node, None, len(ctx.uses), unclaimed)
        else:
            ctx.env[node] = _run(ctx, node, unclaimed)
    _keep_unclaimed_parameters(ctx, unclaimed)
    for finish in FINISHERS:
        finish(ctx)
    _tie_shared_parameters(ctx)
    return ctx.result(cap.lowest_cast)


def _run(ctx: Context, node: fx.Node, unclaimed: dict):
    rule = rule_for(ctx, node)
    inputs = ctx.hidden_inputs(node)
    carries_sides = getattr(rule, "side_aware", False)
    if not carries_sides:
        _pin_sides(ctx, node, inputs)
    before = len(ctx.uses)
    if rule is None:
        out = ctx.unsupported(node) if inputs else None
    else:
        try:
            out = rule(ctx, node)
            bad = _invalid(out)
            if bad is not None:
                raise TypeError(f"the rule returned {bad} (expected a Layout, a ParamRef, None or a list of these)")
        except Exception as err:  # noqa: BLE001 - never crash on a model: pin what could not be followed
            out = ctx.unsupported(node, f"{ctx.describe(node)} could not be analysed: {type(err).__name__}: {err}")
        else:
            out = _settle(ctx, out, carries_sides)
    _track_parameter_reads(ctx, node, out, before, unclaimed)
    return out


def _param_values(ctx: Context, args) -> list[ParamRef]:
    """The parameters behind the node's arguments (a derived, concatenated, gathered, sliced, normalised or
    resampled parameter stands for the parameters it is made of, whole)."""
    found = []
    for a in _nodes(args):
        v = ctx.env.get(a)
        if isinstance(v, ParamRef):
            found.append(v)
        elif isinstance(v, DerivedParam | GatheredParam):
            found.append(ParamRef(v.name, v.shape))
        elif isinstance(v, SlicedParam):
            found.append(ParamRef(v.name, v.span.full))
        elif isinstance(v, ConcatParam):
            found += [part[0] for part in v.parts if part[0] is not None]
        elif isinstance(v, NormedWeight):
            found += [v.v, v.g]
        elif isinstance(v, StandardizedWeight):
            found += [ParamRef(p.name, p.shape) for p in (v.w, v.gain, v.bias) if p is not None]
        elif isinstance(v, ResampledParam):
            found += [ParamRef(n, tuple(ctx.captured.tensors[n].shape)) for n in v.names]
    return found


def _track_parameter_reads(ctx: Context, node: fx.Node, out, before: int, unclaimed: dict) -> None:
    """Which parameters ``node`` reads without its rule recording how they move (``unclaimed``, node -> name ->
    ParamRef). A rule may record the use of a parameter read by its input's node instead (a product with
    ``W.T`` records W's columns where the transpose recorded nothing): the uses this node's rule recorded
    claim those reads of its inputs. A node that passes a parameter on as a parameter value (a view, a
    derived, concatenated, gathered or normalised parameter) leaves it to its users."""
    args = list(node.args) + list(node.kwargs.values())
    claimed = {u.param for u in ctx.uses[before:]}
    for a in _nodes(args):
        for name in claimed & set(unclaimed.get(a, ())):
            del unclaimed[a][name]
    if _carries_parameter(out) or _reads_only_metadata(node):
        return
    reads = {p.name: p for p in _param_values(ctx, args) if p.name not in claimed}
    if reads:
        unclaimed[node] = reads


def _reads_only_metadata(node: fx.Node) -> bool:
    """``zeros_like(w)``, ``w.new_zeros(...)``, ``w.size()``...: the shape, dtype or device of ``w``, not its
    values."""
    name = getattr(getattr(node.target, "overloadpacket", node.target), "__name__", str(node.target))
    return name.endswith("_like") or name.startswith("new_") or name in ("size", "sym_size", "stride", "dim",
                                                                           "numel", "sym_numel")


def _nodes(args) -> list[fx.Node]:
    found = []
    for a in args:
        if isinstance(a, list | tuple):
            found += _nodes(a)
        elif isinstance(a, fx.Node):
            found.append(a)
    return found


def _keep_unclaimed_parameters(ctx: Context, unclaimed: dict) -> None:
    """A parameter read where no rule recorded how it moves (e.g. ``(w ** 3).sum()`` added to the output) is
    read untransformed: record that use on every axis, so that no other use of it can move it."""
    for reads in unclaimed.values():
        for p in reads.values():
            for d, n in enumerate(p.shape):
                ctx.rows(p, d, Channels.fixed(n))


def _carries_parameter(out) -> bool:
    if isinstance(out, list | tuple):
        return any(_carries_parameter(o) for o in out)
    return isinstance(out, PARAMETER_VALUES)


def _pin_sides(ctx: Context, node: fx.Node, inputs: list[Layout]) -> None:
    for lay in inputs:
        if lay.side is not None:
            ctx.pin_side(lay, node)


def _invalid(out) -> str | None:
    if out is None or isinstance(out, (Layout, *PARAMETER_VALUES)):
        return None
    if isinstance(out, list | tuple):
        return next((b for b in map(_invalid, out) if b is not None), None)
    return type(out).__name__


def _settle(ctx: Context, out, carries_sides: bool):
    """Register the hidden values a rule returned (without side axes unless the rule carries them)."""
    if isinstance(out, list | tuple):
        return type(out)(_settle(ctx, o, carries_sides) for o in out)
    if isinstance(out, Layout):
        if out.side is not None and not carries_sides:
            out = out.derive(side=None)
        return ctx.keep(out)
    return out


def _tie_shared_parameters(ctx: Context) -> None:
    """A parameter used by several operations must move the same way in each (tied weights, a module
    called twice): tie the channels of its uses position by position. Uses of disjoint parts of it (the
    query and key/value slices of a packed projection, the blocks of a grouped convolution) are independent;
    uses of parts that overlap without being the same part cannot be matched and pin their channels."""
    by_param: dict[tuple, list[ParamUse]] = defaultdict(list)
    for u in ctx.uses:
        by_param[(u.param, u.dim)].append(u)
    rows: dict[str, set] = defaultdict(set)
    for u in ctx.uses:
        if u.role == "rows":
            rows[u.param].add(u.dim)
    for param, ds in rows.items():
        if None in ds and len(ds) > 1:
            # its rows moved whole (flattened: added to a hidden value, as Perceiver's latents are to the
            # cross-attention output) and along an axis (made into a hidden value): two motions that cannot be matched
            for dim in ds:
                for u in by_param.pop((param, dim), []):
                    ctx.pin(u.channels, f"parameter '{param}' is used more than once, whole and along an axis")
    for (param, _), us in by_param.items():
        parts: dict = defaultdict(list)   # span (None: whole) -> its uses
        for u in us:
            parts[u.span].append(u)
        spans = list(parts)
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a is None or b is None or a.overlaps(b):
                    for u in parts[a] + parts[b]:
                        ctx.pin(u.channels, f"parameter '{param}' is read in parts that overlap")
        for same in parts.values():
            _tie_uses(ctx, param, same)


def _tie_uses(ctx: Context, param: str, us: list[ParamUse]) -> None:
    """Uses of one part of ``param`` along one axis: the same transform position by position."""
    first = us[0]
    for u in us[1:]:
        reason = f"parameter '{param}' is used more than once (it shares its weights)"
        a1, a2 = first.channels.atoms, u.channels.atoms
        if len(a1) != len(a2):
            ctx.pin(first.channels, reason)
            ctx.pin(u.channels, reason)
            continue
        if (a1 == FIXED).any() or (a2 == FIXED).any():
            # an untransformed use (e.g. the first call of a re-used layer on the input) pins the others
            ctx.pin(first.channels, reason + " and one use is untransformed")
            ctx.pin(u.channels, reason + " and one use is untransformed")
            continue
        ctx.tie(first.channels, u.channels, reason)
        if u.role != first.role:
            # W T1^T = W T2^-1 (an embedding tied to an unembedding): T orthogonal
            ctx.require(Signed, first.channels)
            ctx.require(Signed, u.channels)
