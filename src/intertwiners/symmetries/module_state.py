"""The state a module keeps besides its parameters, buffers and children: caches a forward fills.

Some forwards keep tensors on their modules -- timm's LeViT gathers its attention biases from a parameter
into a dict in eval mode and reuses them. Two facts follow for anything that reads or changes parameters:
a trace must not see such a cache (it would read the cached tensor as a constant and miss the parameter
behind it, and would leave its own fake tensors there), and a model whose parameters were transformed must
not keep one (it was computed from the old parameters). :func:`module_state_restored` puts every module's
attributes back after a block; :func:`clear_caches` asks the modules to drop their caches the way their
authors wrote it, in ``train(True)`` (as timm's modules do), and leaves every module's mode as it was;
:func:`copy_model` deep-copies a model whose modules hold tensors made with autograd on (which
``copy.deepcopy`` refuses).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

_MODULE_TABLES = frozenset({"_parameters", "_buffers", "_modules"})


def _contents(value):
    """A shallow copy of a dict/list/set attribute (to put its contents back), None for anything else."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list | set):
        return type(value)(value)
    return None


def _same_contents(value, saved) -> bool:
    if isinstance(value, dict):
        return value.keys() == saved.keys() and all(value[k] is saved[k] for k in saved)
    if isinstance(value, list):
        return len(value) == len(saved) and all(a is b for a, b in zip(value, saved))
    return value == saved


@contextmanager
def module_state_restored(model: nn.Module):
    """Every submodule's attributes (other than its parameters, buffers and children, which the capture passes
    explicitly) as they were before the block: an attribute the forward set is removed, one it replaced is put
    back, and a dict, list or set it filled or emptied in place gets its contents back (same object). A forward
    traced on fake tensors that stores a tensor on its module -- timm's LeViT caches its attention biases,
    gathered from a parameter, in a dict in eval mode -- would otherwise leave a fake tensor there, and the
    next forward or copy of the model would fail on it. The parameters and buffers themselves are put back too:
    ``functional_call`` swaps them in and out by name, and a module reachable under two names (timm's CoaT
    shares one relative-position module between a stage and its blocks) got a traced fake tensor back."""
    saved = [(m, {k: (v, _contents(v)) for k, v in vars(m).items() if k not in _MODULE_TABLES},
              dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield model
    finally:
        for m, attrs, params, buffers in saved:
            state = vars(m)
            for k in [k for k in state if k not in attrs and k not in _MODULE_TABLES]:
                del state[k]
            for k, (value, contents) in attrs.items():
                state[k] = value
                if contents is not None and not _same_contents(value, contents):
                    value.clear()
                    value.update(contents) if isinstance(value, dict | set) else value.extend(contents)
            for table, before in ((m._parameters, params), (m._buffers, buffers)):
                if not _same_contents(table, before):
                    table.clear()
                    table.update(before)


def clear_caches(model: nn.Module) -> None:
    """Call ``model.train(True)`` -- where modules that cache tensors derived from their parameters drop
    them -- then put back every module's ``training`` flag as it was (set directly: no ``train(False)``
    side effects). Nothing else changes."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(True)
    for m, mode in modes:
        m.training = mode


def copy_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, where a tensor a forward left on a module with autograd on (an output
    kept for inspection, a cache; not a leaf, which deepcopy refuses) is copied detached."""
    memo = dict(memo or {})
    for m in model.modules():
        for key, value in vars(m).items():
            if key in _MODULE_TABLES:
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) \
                else (value,)
            for t in items:
                if isinstance(t, torch.Tensor) and t.grad_fn is not None and id(t) not in memo:
                    memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)
