"""Recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``, each one aten operation over a whole sequence.

A layer's hidden units are new channels, one space per layer and direction: the rows of every gate's block of
``weight_ih``, ``weight_hh`` and the biases, and the columns of ``weight_hh`` (the units read their own previous
state) move with one permutation; ``weight_ih``'s columns read the input's channels. Only permutations: the
gates are sigmoids and their products (``c = f·c + i·g``, ``h = o·tanh(c)``) scale nothing consistently. The
output holds every direction's units side by side (kept apart, as a concatenation). The initial state must be
zeros (``nn.LSTM`` makes them when none is given): a state the model passes in would have to move too.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from .. import layout as L
from ..constraints import Unit
from ..context import Context
from ..layout import Channels, Layout
from ..records import ParamRef
from ..registry import builtin

aten = torch.ops.aten

GATES = {aten.lstm: 4, aten.gru: 3, aten.rnn_tanh: 1, aten.rnn_relu: 1}
_ZEROS = {aten.zeros, aten.new_zeros, aten.zeros_like}


def _zeros(arg) -> bool:
    """Is ``arg`` (a node, or a list of them) made of zeros by a constructor?"""
    if isinstance(arg, list | tuple):
        return all(_zeros(a) for a in arg)
    return isinstance(arg, fx.Node) and getattr(arg.target, "overloadpacket", None) in _ZEROS


@builtin(aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)
def recurrent(ctx: Context, node: fx.Node):
    """``op(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)`` ->
    (output, final states...): the output (…, directions·H) carries each layer's units; the final states are
    read untransformed only when nothing reads them (else the units are pinned)."""
    x, hx, params = ctx.value(node.args[0]), node.args[1], node.args[2]
    has_biases, layers = node.args[3], node.args[4]
    gates, dirs = GATES[node.target.overloadpacket], 2 if node.args[7] else 1
    per = 4 if has_biases else 2
    weights = [ctx.value(p) for p in params]
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    states_read = any(u.users for u in node.users if u.target is operator.getitem and u.args[1] != 0)
    shape = ctx.shape(outs[0]) if outs else None
    if len(weights) != layers * dirs * per or not all(isinstance(w, ParamRef) for w in weights) or shape is None \
            or (isinstance(x, Layout) and x.feature_dims() != [x.ndim - 1]):
        return ctx.unsupported(node, f"{ctx.describe(node)}: a recurrent layer with projections, weights that "
                                     "are not parameters or an input with channels off its last axis")
    if isinstance(x, Layout):
        got = L.atoms_along(x, [x.ndim - 1])
        if got is None:
            return ctx.unsupported(node, f"{ctx.describe(node)} does not act on the channel axis of its input")
        inp = Channels(*got)
    else:
        n_in = weights[0].shape[1]
        inp = Channels.fixed(n_in)
    hidden = weights[1].shape[1]
    outside = states_read or not _zeros(hx)
    out = None
    for layer in range(layers):
        units = []
        for d in range(dirs):
            w_ih, w_hh, *biases = weights[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            h = ctx.fresh((hidden,), 0)
            ctx.require(Unit, h)
            if outside:
                ctx.pin(h, f"{ctx.describe(node)}: its initial or final states are read outside the layer")
            rows = Channels(np.tile(h.atoms, gates), np.tile(h.chains, gates))
            for p in (w_ih, w_hh, *biases):
                ctx.rows(p, 0, rows)
            ctx.columns(w_ih, 1, inp)
            ctx.columns(w_hh, 1, h)
            units.append(h)
        atoms = np.concatenate([u.atoms for u in units])
        chains = np.concatenate([u.chains for u in units])
        out = L.simple(atoms, chains, tuple(shape), len(shape) - 1)   # not kept: each direction its own space
        inp = Channels(atoms, chains)
    return [out] + [None] * (2 if gates == 4 else 1)   # the final states: untransformed (or pinned above)
