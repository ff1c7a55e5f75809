"""Capture a model with ``torch.export`` (non-strict, aten level) and follow its channels through the graph.

:func:`capture` exports the model in eval mode (the original is untouched) and returns the aten graph, the
qualified name of every parameter/buffer placeholder and the module that owns every node.
:class:`Analysis` walks the graph once; for every node the rule registered for its operation
(:mod:`intertwiners.symmetries.rules`) turns the layouts of its inputs into the layout of its output and
records atoms ties, constraints and parameter bindings. An operation without a rule that touches a hidden
value pins that value's channels (with the reason), so an unknown operation never yields a wrong symmetry.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..features import eval_mode
from .constraints import Constraint
from .layout import FIXED, ZERO, Layout


class NonTensor:
    """A value that is not a tensor (shapes, lists of sizes)."""


NON_TENSOR = NonTensor()


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer (``name``), possibly viewed/unsqueezed (element order unchanged)."""
    name: str
    shape: tuple


@dataclass(frozen=True)
class DerivedParam:
    """An elementwise function of one parameter with constants (Gemma's RMSNorm gain ``1 + w``). Only a
    per-channel product may use it (it permutes ``name``, and permuting w permutes f(w)); every other rule
    sees an untransformed tensor."""
    name: str
    shape: tuple


@dataclass
class Binding:
    """How one parameter moves: along ``dim`` (None: the flattened tensor) in ``role``.

    roles: ``out`` (t -> T t, T the transform of ``atoms``), ``in`` (w -> w T^-1), ``scale`` (a per-channel
    multiplier, w -> P diag(t/s) w with s from ``in_atoms`` and t from ``atoms``), ``perm`` (permuted only).
    ``groups`` > 1: a grouped convolution's input role (each block of output rows reads its own block).
    """
    param: str
    dim: int | None
    role: str
    atoms: np.ndarray
    chains: np.ndarray
    in_atoms: np.ndarray | None = None
    in_chains: np.ndarray | None = None
    groups: int = 1


@dataclass
class AttentionRecord:
    node: str
    q: np.ndarray   # (H, dk) atoms of the queries per head
    k: np.ndarray   # (H, dk) atoms of the keys (a key/value head repeated for grouped-query attention)
    v: np.ndarray   # (H, dv)
    kv_heads: int
    heads: np.ndarray | None = None  # (H,) atoms of the head axis of written-out scores (softmax(q k^T) v)


def call_model(model: nn.Module, inputs):
    """``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict of keyword inputs (a tokenizer's output)."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def map_inputs(inputs, fn):
    """``fn`` applied to every tensor of a tuple or dict of inputs (same container type)."""
    if isinstance(inputs, dict):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(a) for a in inputs)


def input_tensors(inputs) -> list:
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


class _Wrap(nn.Module):
    def __init__(self, model, keys=None):
        super().__init__()
        self.m = model
        self.keys = keys

    def forward(self, *args):
        out = self.m(*args) if self.keys is None else self.m(**dict(zip(self.keys, args)))
        return tuple(tensors_of(out))


def tensors_of(y) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list, dict or transformers ModelOutput), in order."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in tensors_of(v)]
    if isinstance(y, list | tuple):
        return [t for v in y for t in tensors_of(v)]
    return []


@dataclass
class Captured:
    graph: fx.Graph
    params: dict[str, str]            # placeholder name -> qualified parameter/buffer name
    inputs: list[str]                 # user input placeholder names
    tensors: dict[str, torch.Tensor]  # qualified name -> parameter/buffer of the model


def capture(model: nn.Module, args: tuple) -> Captured:
    """Export ``model`` (eval mode, non-strict) on ``args``; ValueError with the exporter's reason on failure."""
    wrapper = _Wrap(model, list(args) if isinstance(args, dict) else None)
    try:
        with torch.no_grad(), eval_mode(model):
            ep = torch.export.export(wrapper, tuple(input_tensors(args)), strict=False)
    except Exception as err:
        raise ValueError(f"symmetry_spec: torch.export could not capture {type(model).__name__} on the example "
                         f"input: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    sig = ep.graph_signature
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    # a tied parameter (GPT-2's wte and lm_head) gets its first name in the model, as named_parameters() gives it
    first = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        first.setdefault(id(t), name)
    params = {}
    for ph, name in list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items()):
        name = name[2:] if name.startswith("m.") else name
        params[ph] = first.get(id(tensors[name]), name) if name in tensors else name
    return Captured(ep.graph, params, list(sig.user_inputs), tensors)


def owner(node: fx.Node) -> tuple[str, type | None]:
    """(qualified name, class) of the innermost module whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, cls = list(stack.values())[-1]
    path = path[2:] if path.startswith("m.") else ("" if path in ("m", "L['self'].m") else path)
    return path, cls


def shape_of(node) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


class Analysis:
    """One pass over a captured graph: layouts, atom ties, constraints, parameter bindings."""

    def __init__(self, cap: Captured, model: nn.Module):
        self.cap = cap
        self.model = model
        self.parent: list[int] = []
        self.parity: list[int] = []
        self.pins: dict[int, list[str]] = defaultdict(list)
        self.output_atoms: set[int] = set()
        self.chains: list[tuple] = [()]
        self.chain_ids: dict[tuple, int] = {(): 0}
        self.groups: dict = {}
        self.layouts: list[Layout] = []
        self.constraints: list[tuple[type, Layout | tuple, dict]] = []
        self.adds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.bindings: list[Binding] = []
        self.attention: list[AttentionRecord] = []
        self.sites: list[tuple[str, Layout]] = []
        self.env: dict[fx.Node, object] = {}
        self.site_counts: dict[str, int] = defaultdict(int)
        self.regions: dict = {}
        self.scores: dict = {}  # first head atom of a q k^T product -> (q table, k table), see rules.attention_product
        self.side: dict = {}  # node -> side.Side: hidden units along a non-channel axis (MLP-Mixer tokens)

    # -- atoms ------------------------------------------------------------------------------------------
    def new_atoms(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.parity.extend([0] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> tuple[int, int]:
        p = 0
        path = []
        while self.parent[a] != a:
            path.append(a)
            p ^= self.parity[a]
            a = self.parent[a]
        root = a
        # path compression with parities
        acc = p
        for node in path:
            old = self.parity[node]
            self.parent[node] = root
            self.parity[node] = acc
            acc ^= old
        return root, p

    def union(self, a: int, b: int, dual: int = 0, reason: str = "") -> None:
        """Join atoms a and b; with ``dual`` the transform of b is the inverse transpose of a's."""
        ra, pa = self.find(a)
        rb, pb = self.find(b)
        if ra == rb:
            if pa ^ pb != dual:
                self.pins[ra].append(f"{reason}: a channel would need A = A^-T")
            return
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.parity[hi] = pa ^ pb ^ dual

    def union_arrays(self, a: np.ndarray, b: np.ndarray, dual: int = 0, reason: str = "") -> None:
        both = (a >= 0) & (b >= 0)
        for x, y in zip(a[both].tolist(), b[both].tolist()):
            self.union(x, y, dual, reason)
        for mine, other in ((a, b), (b, a)):
            bad = (mine >= 0) & (other == FIXED)
            for atom in np.unique(mine[bad]).tolist():
                self.pins[atom].append(f"{reason}: it meets untransformed channels")

    # -- chains and bookkeeping --------------------------------------------------------------------------
    def chain_id(self, chain: tuple) -> int:
        if chain not in self.chain_ids:
            self.chain_ids[chain] = len(self.chains)
            self.chains.append(chain)
        return self.chain_ids[chain]

    def extend_chains(self, chains: np.ndarray, entry) -> np.ndarray:
        out = chains.copy()
        for cid in np.unique(chains):
            out[chains == cid] = self.chain_id(self.chains[int(cid)] + (entry,))
        return out

    def pin_atoms(self, atoms: np.ndarray, reason: str) -> None:
        for a in np.unique(atoms[atoms >= 0]).tolist():
            self.pins[a].append(reason)

    def pin(self, lay: Layout, reason: str) -> None:
        self.pin_atoms(lay.atoms, reason)

    def keep(self, lay: Layout) -> Layout:
        self.layouts.append(lay)
        return lay

    def constrain(self, kind: type, atoms: np.ndarray, chains: np.ndarray, **extra) -> None:
        self.constraints.append((kind, (atoms, chains), extra))

    def bind(self, b: Binding) -> None:
        self.bindings.append(b)

    def fresh(self, shape: tuple, dim: int, chain: int = 0) -> Layout:
        from .layout import simple
        n = shape[dim]
        return self.keep(simple(self.new_atoms(n), np.full(n, chain, dtype=np.int64), shape, dim))

    def value(self, arg):
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def hidden_inputs(self, node: fx.Node) -> list[Layout]:
        out = []
        for a in node.all_input_nodes:
            v = self.env.get(a)
            if isinstance(v, Layout):
                out.append(v)
            elif isinstance(v, list | tuple):
                out.extend(x for x in v if isinstance(x, Layout))
        return out

    def describe(self, node: fx.Node) -> str:
        path, cls = owner(node)
        cls = getattr(cls, "__name__", str(cls).split(".")[-1]) if cls is not None else None
        where = f" in {path or 'the model'}" + (f" ({cls})" if cls else "")
        name = getattr(node.target, "__name__", str(node.target))
        return f"'{name}'{where}"

    def unknown(self, node: fx.Node, reason: str | None = None):
        """Pin every hidden input of ``node``; its output is an untransformed value."""
        why = reason or f"operation {self.describe(node)} is not supported"
        for lay in self.hidden_inputs(node):
            self.pin(lay, why)
        return None if shape_of(node) is not None else NON_TENSOR

    # -- the pass -----------------------------------------------------------------------------------------
    def run(self) -> Analysis:
        from . import side
        from .rules import dispatch, find_regions
        self.regions = find_regions(self)
        for node in self.cap.graph.nodes:
            if node.op == "placeholder":
                name = self.cap.params.get(node.name)
                if name is not None:
                    self.env[node] = ParamRef(name, shape_of(node) or ())
                else:
                    self.env[node] = None if shape_of(node) is not None else NON_TENSOR
                continue
            if node.op == "get_attr":
                self.env[node] = None
                continue
            if node.op == "output":
                side.follow(self, node)
                for lay in self.hidden_inputs(node):
                    self.output_atoms.update(int(a) for a in np.unique(lay.atoms[lay.atoms >= 0]))
                    self.pin(lay, "the model's output")
                continue
            try:
                out = dispatch(self, node)
                side.follow(self, node)
            except Exception as err:  # never crash on a model: pin what could not be followed
                out = self.unknown(node, f"{self.describe(node)} could not be analysed: {type(err).__name__}: "
                                         f"{err}")
                self.side.pop(node, None)
                side.pin_inputs(self, node)
            self.env[node] = out
        self._tie_shared_parameters()
        return self

    def _tie_shared_parameters(self) -> None:
        """A parameter used by several operations must move the same way in each (tied weights, a module
        called twice): tie the atoms of its bindings position by position."""
        by_param: dict[tuple, list[Binding]] = defaultdict(list)
        for b in self.bindings:
            by_param[(b.param, b.dim)].append(b)
        for (param, _), bs in by_param.items():
            if len(bs) < 2:
                continue
            first = bs[0]
            for b in bs[1:]:
                reason = f"parameter '{param}' is used more than once (it shares its weights)"
                if len(b.atoms) != len(first.atoms):
                    self.pin_atoms(first.atoms, reason)
                    self.pin_atoms(b.atoms, reason)
                    continue
                a1, a2 = first.atoms, b.atoms
                # an untransformed use (e.g. the first call of a re-used layer on the input) pins the others
                fixed1, fixed2 = a1 == FIXED, a2 == FIXED
                if fixed1.any() or fixed2.any():
                    self.pin_atoms(a1, reason + " and one use is untransformed")
                    self.pin_atoms(a2, reason + " and one use is untransformed")
                    continue
                self.union_arrays(a1, a2, 0, reason)
                self.adds.append((a1, first.chains, a2, b.chains))
                if b.role != first.role:
                    # W T1^T = W T2^-1 (an embedding tied to an unembedding): T orthogonal
                    self.constraints.append((_signed(), (a1, first.chains), {}))
                    self.constraints.append((_signed(), (a2, b.chains), {}))


def _signed():
    from .constraints import Signed
    return Signed


def fixed_layout_like(lay: Layout) -> Layout:
    return lay.derive(atoms=np.full(len(lay.atoms), FIXED, dtype=np.int64))


__all__ = ["FIXED", "NON_TENSOR", "ZERO", "Analysis", "AttentionRecord", "Binding", "Captured", "Constraint",
           "DerivedParam", "call_model", "input_tensors", "map_inputs",
           "ParamRef", "capture", "field", "owner", "shape_of", "tensors_of"]
