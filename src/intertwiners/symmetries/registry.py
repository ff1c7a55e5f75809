"""The one registry of rules: aten operation (overload packet) -> ``rule(ctx, node) -> value``.

Built-in rules register here from their family's module under :mod:`~intertwiners.symmetries.ops`
(:func:`builtin`); users register theirs with :func:`register_rule`, which takes precedence over a built-in
rule for the same operation (and keeps that operation out of the activation regions). *Patterns* are the
built-in analyses that claim nodes by their neighbourhood rather than by their operation (a chain of
elementwise operations is one activation; ``1 + w`` is a function of a parameter): each returns
``{node: rule}`` for the nodes it claims, before per-operation dispatch. *Finishers* run once after the
last node: a family that keeps state across nodes (written-out attention's pending scores) settles it there.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch.fx as fx

RULES: dict = {}        # built-in rules
USER_RULES: dict = {}   # rules registered with register_rule (take precedence)
CLAIMS: list = []       # claim(ctx, node) -> rule | None, asked in order before the per-operation rules
FINISHERS: list = []    # finish(ctx), run in order after the last node


def op_key(target):
    """The registry key of a node target or an operation: its overload packet (``aten.add`` for
    ``aten.add.Tensor``); ``operator.getitem`` as is."""
    if target is operator.getitem:
        return target
    inner = getattr(target, "_opoverload", None)   # a torch.library.custom_op definition
    if inner is not None:
        target = inner
    return getattr(target, "overloadpacket", target)


def builtin(*ops, side_aware: bool = False):
    """Decorator registering a built-in rule for ``ops``; ``side_aware``: it carries side axes (MLP-Mixer's
    token units, :class:`~intertwiners.symmetries.layout.Side`) itself. Every other rule's inputs lose theirs
    (pinned): a side axis can cost a symmetry, never yield a wrong one."""
    def register(fn):
        for op in ops:
            RULES[op_key(op)] = fn
        fn.side_aware = side_aware
        return fn
    return register


def claim(fn):
    """Decorator registering a built-in claim ``fn(ctx, node) -> rule | None``."""
    CLAIMS.append(fn)
    return fn


def finisher(fn):
    """Decorator registering a built-in ``fn(ctx)`` run once after the last node of the graph."""
    FINISHERS.append(fn)
    return fn


def _check_op(op):
    key = op_key(op)
    if not (hasattr(key, "overloads") and hasattr(key, "_qualified_op_name")):
        raise ValueError(f"register_rule needs an operator such as torch.ops.aten.roll or torch.ops.mylib.myop "
                         f"(an overload packet or one of its overloads), got {op!r}")
    return key


def register_rule(op, fn: Callable | None = None):
    """Register ``fn(ctx, node) -> value`` as the rule for operation ``op`` (e.g. ``torch.ops.aten.roll``, or a
    custom operator ``torch.ops.mylib.myop`` defined with ``torch.library``); every overload of ``op`` uses
    it. Works as a decorator (``@register_rule(op)``). A rule registered here replaces the built-in rule for
    that operation until :func:`unregister_rule`. See docs/symmetries.md for the rule contract."""
    key = _check_op(op)
    if fn is None:
        return lambda f: register_rule(op, f)
    if not callable(fn):
        raise ValueError(f"a rule must be callable as rule(ctx, node), got {type(fn).__name__}")
    USER_RULES[key] = fn
    return fn


def unregister_rule(op) -> None:
    """Remove the rule registered with :func:`register_rule` for ``op`` (a built-in rule applies again)."""
    USER_RULES.pop(_check_op(op), None)


def rule_for(ctx, node: fx.Node):
    """The rule for ``node``: a claim's, else the rule for its operation (a user's before a built-in one),
    else None."""
    for c in CLAIMS:
        fn = c(ctx, node)
        if fn is not None:
            return fn
    key = op_key(node.target)
    return USER_RULES.get(key) or RULES.get(key)


def has_user_rule(node: fx.Node) -> bool:
    return op_key(node.target) in USER_RULES
