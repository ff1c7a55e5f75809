"""Tracing models with torch.fx and naming their activation sites.

Site names (stable, documented in docs/sites.md):

* an activation **module** is named by its qualified module name, e.g. ``"layer1.0.relu1"``; if the same
  module object is called more than once in a forward, its later calls are ``"<name>#1"``, ``"<name>#2"``...
* a **functional** activation (``F.relu(x)``, ``torch.sigmoid(x)``, ``x.relu()``) is named
  ``"<enclosing module>:<function>"``, e.g. ``"layer1.0:relu"``; ``":relu"`` at the top level; repeated
  calls in the same module are ``"layer1.0:relu#1"``, ... in forward order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES


class SiteTracer(fx.Tracer):
    """An fx tracer that keeps activation modules (and ``leaf_types``) as leaves."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = ()):
        super().__init__()
        self.leaf_types = tuple(ACTIVATION_MODULES) + tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaf_types: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; raise ValueError with the tracer's reason if it cannot be traced."""
    tracer = SiteTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as err:
        raise ValueError(f"torch.fx could not trace {type(model).__name__}: {err}. Models with data-dependent "
                         "control flow cannot be traced; activation modules can still be used as sites") from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def enclosing_module(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward created ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if node.op == "call_module" and path == node.target:
        # a leaf module's own entry: its parent is the enclosing module
        path = list(stack.values())[-2][0] if len(stack) > 1 else ""
    return path


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The activation name of ``node`` ('relu', ...) for an activation module/function/method, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, ACTIVATION_MODULES):
            return type(mod).__name__.lower()
    elif node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


@dataclass(frozen=True)
class Site:
    name: str
    node: fx.Node
    kind: str          # activation name, e.g. "relu"
    functional: bool   # True for F.relu / torch.relu / x.relu()


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every activation site of a traced model, in forward (graph) order, with its stable name."""
    calls: dict[str, int] = defaultdict(int)
    sites = []
    for node in gm.graph.nodes:
        kind = activation_kind(gm, node)
        if kind is None:
            continue
        if node.op == "call_module":
            base, functional = str(node.target), False
        else:
            base, functional = f"{enclosing_module(node)}:{kind}", True
        k = calls[base]
        calls[base] += 1
        sites.append(Site(base if k == 0 else f"{base}#{k}", node, kind, functional))
    return sites


def site_map(gm: fx.GraphModule) -> dict[str, Site]:
    return {s.name: s for s in find_sites(gm)}


def check_sites(requested: list[str] | tuple[str, ...] | str, available: list[str]) -> list[str]:
    """Validate site names, raising ValueError that lists the available ones."""
    if isinstance(requested, str):
        requested = [requested]
    missing = [s for s in requested if s not in available]
    if missing:
        raise ValueError(f"unknown activation site(s) {missing}; this model has: {available}")
    if not requested:
        raise ValueError("no activation sites requested")
    return list(requested)


def truncated_module(gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule that returns a tuple with the values of ``nodes`` (cloned) and computes nothing after them."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    wanted = set(nodes)
    remaining = len(wanted)
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node in wanted:
            remaining -= 1
            if remaining == 0:
                break
    outs = tuple(graph.call_method("clone", (env[n],)) for n in nodes)
    graph.output(outs)
    return _compact(fx.GraphModule(gm, graph))


def _compact(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def split_at(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a traced model at ``node`` into ``front`` (input -> value of node) and ``back`` (node value -> output).

    Raises ValueError if a later part of the graph needs any value computed before ``node`` other than
    ``node`` itself (e.g. a site inside a residual block, whose skip connection bypasses it).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    before = [n for n in gm.graph.nodes if order[n] <= order[node]]
    for n in gm.graph.nodes:
        if order[n] > order[node]:
            for a in n.all_input_nodes:
                if order[a] < order[node] and a.op != "get_attr":
                    raise ValueError(f"cannot split at {node.name}: {n.name} after it also uses {a.name} "
                                     "from before it (a residual connection bypasses this site)")
    front = truncated_module(gm, [node])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {node: graph.placeholder("h")}
    for n in gm.graph.nodes:
        if n in before:
            if n.op == "get_attr":
                env[n] = graph.node_copy(n, lambda m: env[m])
            continue
        env[n] = graph.node_copy(n, lambda m: env[m])
    back = _compact(fx.GraphModule(gm, graph))

    class _Front(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    return _Front(front), back


