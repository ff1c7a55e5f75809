"""Hidden units along an axis without channels: the token-mixing MLP of MLP-Mixer.

A linear layer applied along an axis that holds no channels (MLP-Mixer's token mixing: the same map for
every channel, ``fc2(act(fc1(x^T)))^T`` with ``fc1`` mapping T tokens to J units) makes J new units on
that axis. They have symmetries of their own, independent of the channels' transform on the other axis:
``fc1 -> P D fc1`` (rows and bias), ``fc2 -> fc2 D^-1 P^-1`` (columns), with P·D in the activation's group.

Such units are a *side axis* of a value (:class:`Side`: the tensor dimension, atoms, chains), kept next to
its channel layout and followed through a short list of operations only: the elementwise activation
regions, copies/dropout, transposes, and the linear layer that consumes them (its input columns). Any other
operation that reads a value with a side axis, or the model's output, pins the units: a side axis can cost
a symmetry but never yield a wrong one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from . import layout as L
from .constraints import Activation
from .engine import Analysis, Binding, ParamRef, shape_of

aten = torch.ops.aten

_COPIES = {aten.alias, aten.clone, aten.contiguous, aten.detach, aten.detach_, aten.to, aten._to_copy,
           aten.dropout, aten.dropout_, aten.feature_dropout, aten.feature_dropout_, aten.alpha_dropout}
_TRANSPOSES = {aten.transpose, aten.t, aten.permute, aten.swapaxes}


@dataclass(frozen=True)
class Side:
    dim: int            # the tensor dimension holding the units
    atoms: np.ndarray   # (J,) one atom per unit
    chains: np.ndarray  # (J,) chain ids (the transform the units carry, as for channels)


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def create(an: Analysis, node: fx.Node, weight: ParamRef, bias) -> None:
    """``node`` is a linear layer along a non-channel axis: its output units (last dimension) are new."""
    shape = shape_of(node)
    n = shape[-1]
    atoms, chains = an.new_atoms(n), np.zeros(n, dtype=np.int64)
    an.keep(L.simple(atoms, chains, (n,), 0))
    an.bind(Binding(weight.name, 0, "out", atoms, chains))
    if isinstance(bias, ParamRef):
        an.bind(Binding(bias.name, 0, "out", atoms, chains))
    an.side[node] = Side(len(shape) - 1, atoms, chains)


def _pin(an: Analysis, side: Side, node: fx.Node) -> None:
    an.pin_atoms(side.atoms, f"{an.describe(node)} reads hidden units along a non-channel axis")


def pin_inputs(an: Analysis, node: fx.Node) -> None:
    """Pin the side axes of every input of ``node`` (an operation that could not be analysed)."""
    for a in node.all_input_nodes:
        if a in an.side:
            _pin(an, an.side[a], node)


def feeds_activation(an: Analysis, node: fx.Node) -> bool:
    """Is ``node`` the input of an elementwise activation region (then its units are hidden units)?"""
    return any(u in an.regions and an.regions[u]["root"] is node for u in node.users)


def follow(an: Analysis, node: fx.Node) -> None:
    """After ``node``'s rule: carry, consume or pin the side axes of its inputs."""
    if node in an.regions:
        reg = an.regions[node]
        side = an.side.get(reg["root"])
        if side is not None and node is reg["output"]:
            _through_activation(an, node, reg, side)
        return
    ins = [(a, an.side[a]) for a in node.all_input_nodes if a in an.side]
    if not ins:
        return
    op = _packet(node)
    if op is operator.getitem or node.op == "output":
        for _, side in ins:
            _pin(an, side, node)
        return
    first = node.args[0] if node.args else None
    if len(ins) == 1 and ins[0][0] is first:
        side = ins[0][1]
        if op in _COPIES:
            an.side[node] = side
            return
        if op in _TRANSPOSES and shape_of(node) is not None:
            ndim = len(shape_of(node))
            order = list(range(ndim))
            if op is aten.permute:
                order = [d % ndim for d in node.args[1]]
            elif op is not aten.t:
                i, j = node.args[1] % ndim, node.args[2] % ndim
                order[i], order[j] = order[j], order[i]
            else:
                order = [1, 0]
            an.side[node] = Side(order.index(side.dim), side.atoms, side.chains)
            return
        w = an.value(node.args[1]) if len(node.args) > 1 else None
        if op is aten.linear and isinstance(w, ParamRef) and len(w.shape) == 2 and w.shape[1] == len(side.atoms) \
                and side.dim == len(shape_of(first)) - 1:
            an.bind(Binding(w.name, 1, "in", side.atoms, side.chains))  # consumed: fc2's input columns
            return
    for _, side in ins:
        _pin(an, side, node)


def _through_activation(an: Analysis, node: fx.Node, reg: dict, side: Side) -> None:
    from .rules import _group_for

    key, group = _group_for(an, reg)
    if isinstance(group, str):
        an.pin_atoms(side.atoms, f"activation {an.describe(node)}: {group}")
        return
    if group.kind == "general_linear":
        an.side[node] = side
        return
    an.constrain(Activation, side.atoms, side.chains, key=key)
    chains = an.extend_chains(side.chains, key)
    an.keep(L.simple(side.atoms, chains, (len(side.atoms),), 0))
    an.side[node] = Side(side.dim, side.atoms, chains)
