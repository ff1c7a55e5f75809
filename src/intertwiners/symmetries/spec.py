"""Finding the weight-space symmetries of a model by tracing it (paper §3.2, Proposition 3.4, Remark 3.6).

:func:`symmetry_spec` traces a model with torch.fx and follows the channel axis of every hidden value:

1. **Channels.** Every producing linear operation (``nn.Linear``, ``nn.Conv1d/2d/3d`` with ``groups=1``)
   creates fresh channel *atoms*, one per output channel. Operations that act on each channel alike
   (activations, batch norm, pooling, dropout, identity, spatial slicing and padding) pass the atoms on;
   ``torch.cat`` along channels concatenates them, channel slicing slices them, zero channel padding (the
   ResNet option-A shortcut) inserts known-zero channels, and flattening into a ``Linear`` repeats each
   channel over its spatial block (feature ``c*H*W + k`` belongs to channel ``c``).
2. **Ties.** A residual ``add`` joins the atoms it adds position by position (union-find, Remark 3.6:
   spaces joined by residual connections get the same group element). Adding a known-zero channel ties
   nothing.
3. **Spaces.** Channels (atom classes) that occur in exactly the same set of hidden values form one
   *space*: so a slice, a concatenation or a zero-padded embedding splits a producer's output into
   independent spaces. Each space gets one element A = P·D (or a dense A for GL spaces).
4. **Groups.** Every operation on a space constrains A: an activation sigma needs A (as seen at its
   input) in G_sigma; max-pooling commutes only with positive scalings; batch norm absorbs any scaling of
   its output but only sign flips of its input (it normalises scale away, up to its eps); a residual add
   needs both operands transformed alike (e.g. a pre-activation value A and a post-activation value
   phi(A) must agree). The space's group is the largest of the six kinds of
   :mod:`intertwiners.groups` that satisfies every constraint.

Anything else that touches a hidden value — an unknown module or function, LayerNorm, a grouped
convolution, a shared (re-used) weight, a value multiplied by a tensor — *pins* the spaces of its
inputs (identity element, reason in ``spec.pinned``) and its output is treated as untransformed. The
model's input and output are never transformed.

Chains. Within one space, a value carries the transform P·diag(c(s)) where (P, s) is the space's element
and ``c`` a *chain* of scale maps: ``()`` at a pre-activation, ``(G_relu,)`` after a ReLU, and
``("one",)`` at the output of a convolution that feeds only a batch norm (the convolution is permuted,
the batch norm's affine parameters carry the scaling, so outputs agree in train mode too).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import groups as G
from .._util import as_tensor
from ..activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS
from ..features import eval_mode
from ..tracing import activation_kind, find_sites, trace

ZERO = -1    # a channel known to be zero (from zero channel padding)
FIXED = -2   # a channel that is never transformed (derived from the input, or pinned)
ONE = "one"  # chain entry: the scale is replaced by 1 (a convolution that feeds only a batch norm)

_CANDIDATE_KINDS = ("general_linear", "scaled_permutation", "unit_row_sum", "positive_scaled_permutation",
                    "signed_permutation", "permutation")
_TEST_SCALES = {
    "permutation": [1.0, 1.0],
    "signed_permutation": [1.0, -1.0, -1.0, 1.0],
    "positive_scaled_permutation": [0.5, 2.0, 3.7, 1.0],
    "scaled_permutation": [-2.0, -0.5, 0.5, 3.7, -1.0, 1.0],
}

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)
_CHANNEL_WISE_SPATIAL = (nn.Upsample, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
                         nn.ReplicationPad2d, nn.ZeroPad2d)
_ELEMENTWISE_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

_ADD_FUNCS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_MAX_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d}
_SPATIAL_FUNCS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                  F.adaptive_avg_pool3d, F.interpolate}
_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_FUNCS = {torch.flatten, torch.reshape}
_PASS_METHODS = {"contiguous", "clone", "float", "double", "half", "to"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze"}


# ----------------------------------------------------------------------------------------------------
# Public data structures
# ----------------------------------------------------------------------------------------------------

@dataclass
class Space:
    """One hidden channel space and its symmetry group.

    ``size`` channels; ``group`` the intertwiner group acting on it (its ``phi`` is the one of the
    first activation applied to the space, when there is one); ``sites`` the activation sites whose
    input contains the space; ``producers`` the modules whose output rows it transforms, ``consumers``
    the modules whose input columns it transforms.
    """

    name: str
    size: int
    group: G.IntertwinerGroup
    sites: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    ties: int = 0  # number of residual additions inside this space

    @property
    def kind(self) -> str:
        return self.group.kind

    @property
    def is_monomial(self) -> bool:
        return self.group.is_monomial

    def __repr__(self) -> str:
        return (f"Space({self.name!r}, size={self.size}, kind={self.kind!r}, sites={self.sites}, "
                f"ties={self.ties})")


@dataclass
class Segment:
    """Where one space sits in a hidden value: ``positions[j]`` holds index j of the space."""

    space: str
    positions: np.ndarray
    chain: tuple


@dataclass
class ValueLayout:
    """The channels of one hidden value as seen by a module: its length and the spaces in it."""

    length: int
    segments: list[Segment]


@dataclass
class ModuleAction:
    """How a transform reaches one module: ``kind`` is 'linear' (Linear/Conv) or 'batch_norm'."""

    module: str
    kind: str
    inputs: ValueLayout | None
    outputs: ValueLayout | None


@dataclass
class SymmetrySpec:
    """The weight-space symmetries of one model: ``spaces`` (name -> :class:`Space`), ``pinned``
    (name -> reason for hidden spaces fixed to the identity), ``pinned_sizes``, ``sites`` (all activation
    sites) and, internally, ``actions``: how each module's parameters transform."""

    spaces: dict[str, Space]
    pinned: dict[str, str]
    pinned_sizes: dict[str, int]
    sites: list[str]
    actions: list[ModuleAction]
    model_type: str = ""
    groups: dict = field(default_factory=dict, repr=False)  # chain entries -> activation groups

    def summary(self) -> str:
        """A readable table of spaces and pinned spaces."""
        lines = [f"{self.model_type}: {len(self.spaces)} spaces, {len(self.pinned)} pinned"]
        for s in self.spaces.values():
            extra = f", tied by {s.ties} residual add(s)" if s.ties else ""
            lines.append(f"  {s.name:<32} n={s.size:<5} {s.kind:<28} sites={s.sites}{extra}")
        for name, reason in self.pinned.items():
            lines.append(f"  {name:<32} n={self.pinned_sizes.get(name, '?'):<5} PINNED: {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------------------------------
# Phase 1: propagate channel atoms through the graph
# ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Layout:
    """Channel atoms of a hidden value: ``atoms[c]`` (>= 0, or ZERO/FIXED), ``chains[c]`` chain ids,
    the channel ``axis`` of the ``ndim``-dimensional tensor and ``repeat`` (features c*repeat + k belong
    to channel c after a flatten)."""

    atoms: np.ndarray
    chains: np.ndarray
    axis: int
    ndim: int
    repeat: int = 1

    def derive(self, atoms=None, chains=None, ndim=None, repeat=None) -> _Layout:
        return _Layout(self.atoms if atoms is None else atoms, self.chains if chains is None else chains,
                       self.axis, self.ndim if ndim is None else ndim, self.repeat if repeat is None else repeat)


class _NonTensor:
    pass


NON_TENSOR = _NonTensor()


class _Analysis:
    """Runs phase 1 over a traced, shape-propagated graph."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, opaque_types: tuple = ()):
        self.gm = gm
        self.model = model
        self.opaque_types = opaque_types
        self.parent: list[int] = []
        self.pins: dict[int, list[str]] = defaultdict(list)   # atom -> reasons
        self.output_atoms: set[int] = set()
        self.chains: list[tuple] = [()]
        self.chain_ids: dict[tuple, int] = {(): 0}
        self.group_keys: dict[int, G.IntertwinerGroup] = {}
        self.layouts: list[_Layout] = []                        # every hidden value, in graph order
        self.constraints: list[tuple] = []                      # (kind, layout, extra)
        self.adds: list[tuple[_Layout, _Layout]] = []
        self.records: list[tuple] = []                          # (module, kind, in_layout, out_layout)
        self.site_layouts: dict[fx.Node, _Layout] = {}
        self.env: dict[fx.Node, object] = {}
        self.calls = defaultdict(int)
        self._count_calls()
        self.shared = self._shared_parameter_modules()

    # -- atoms and chains --------------------------------------------------------------------------
    def new_atoms(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

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

    def pin(self, layout: _Layout, reason: str) -> None:
        for a in np.unique(layout.atoms[layout.atoms >= 0]):
            self.pins[int(a)].append(reason)

    def make_layout(self, atoms: np.ndarray, axis: int, ndim: int, chain: int = 0) -> _Layout:
        lay = _Layout(atoms, np.full(len(atoms), chain, dtype=np.int64), axis, ndim)
        self.layouts.append(lay)
        return lay

    def keep(self, lay: _Layout) -> _Layout:
        self.layouts.append(lay)
        return lay

    # -- graph helpers -----------------------------------------------------------------------------
    def _count_calls(self):
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] += 1

    def _shared_parameter_modules(self) -> set[str]:
        owners: dict[int, list[str]] = defaultdict(list)
        for name, mod in self.gm.named_modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)].append(name)
        return {n for names in owners.values() if len(names) > 1 for n in names}

    @staticmethod
    def shape(node) -> tuple | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape)

    def value(self, arg):
        if isinstance(arg, fx.Node):
            return self.env.get(arg, None)
        return arg

    def hidden_inputs(self, node: fx.Node) -> list[_Layout]:
        return [v for v in (self.env.get(a) for a in node.all_input_nodes) if isinstance(v, _Layout)]

    def unknown(self, node: fx.Node, reason: str):
        """Pin every hidden input of ``node``; its output is untransformed (a module's output is recorded
        as a pinned space, so that ``spec.pinned`` lists it)."""
        for lay in self.hidden_inputs(node):
            self.pin(lay, reason)
        shape = self.shape(node)
        if shape is None:
            return NON_TENSOR
        if node.op == "call_module" and len(shape) >= 2 and not any(u.op == "output" for u in node.users):
            out = self.make_layout(self.new_atoms(shape[1]), 1, len(shape))
            self.pin(out, f"output of {reason}")
            return out
        return None

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.gm.get_submodule(node.target)).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"{node.op} '{target}' (node {node.name})"

    # -- the pass ----------------------------------------------------------------------------------
    def run(self):
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" or node.op == "get_attr":
                out = None
            elif node.op == "output":
                for lay in self.hidden_inputs(node):
                    for a in np.unique(lay.atoms[lay.atoms >= 0]):
                        self.output_atoms.add(int(a))
                    self.pin(lay, "the model's output")
                continue
            else:
                try:
                    out = self.visit(node)
                except Exception as err:  # never crash on a model: pin what we could not follow
                    out = self.unknown(node, f"{self.describe(node)} could not be analysed: {err}")
            self.env[node] = out
        return self

    def visit(self, node: fx.Node):
        inputs = self.hidden_inputs(node)
        if node.op == "call_module":
            return self.visit_module(node, inputs)
        if node.op == "call_function":
            return self.visit_function(node, inputs)
        if node.op == "call_method":
            return self.visit_method(node, inputs)
        return self.unknown(node, f"unsupported node {node.op}")

    # modules
    def visit_module(self, node: fx.Node, inputs: list[_Layout]):
        mod = self.gm.get_submodule(node.target)
        name = str(node.target)
        shape = self.shape(node)
        x = self.value(node.args[0]) if node.args else None
        has_params = any(True for _ in mod.parameters(recurse=False))
        if has_params and (self.calls[name] > 1 or name in self.shared):
            return self.unknown(node, f"{self.describe(node)} shares its weights (called more than once or "
                                      "shared parameters)")
        if isinstance(mod, _PRODUCERS):
            return self.visit_producer(node, mod, x, shape)
        if isinstance(mod, _BATCH_NORMS):
            return self.visit_batch_norm(node, mod, x)
        if isinstance(mod, self.opaque_types):
            return self.unknown(node, f"{self.describe(node)} could not be traced into")
        if not inputs:
            return None if shape is not None else NON_TENSOR
        if len(inputs) != 1 or len(node.args) != 1 or node.kwargs:
            return self.unknown(node, f"{self.describe(node)} has several inputs")
        if activation_kind(self.gm, node) is not None:
            return self.visit_activation(node, x, self.module_group(mod))
        if isinstance(mod, _ELEMENTWISE_IDENTITY):
            return x.derive(ndim=len(shape))
        if isinstance(mod, _MAX_POOLS):
            if getattr(mod, "return_indices", False):
                return self.unknown(node, f"{self.describe(node)} returns indices")
            return self.spatial(node, x, shape, maxpool=True)
        if isinstance(mod, _AVG_POOLS + _CHANNEL_WISE_SPATIAL):
            return self.spatial(node, x, shape)
        if isinstance(mod, nn.Flatten):
            return self.reshape(node, x, shape)
        return self.unknown(node, f"{self.describe(node)} is not supported")

    def in_place(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return bool(getattr(self.gm.get_submodule(node.target), "inplace", False))
        if node.op == "call_method":
            return str(node.target).endswith("_")
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") or bool(node.kwargs.get("inplace")) or any(a is True for a in node.args[1:])

    def module_group(self, mod: nn.Module):
        if isinstance(mod, nn.PReLU) and mod.num_parameters != 1:
            return "PReLU with one slope per channel is not the same function on every channel"
        try:
            return G.intertwiner_group(mod)
        except Exception as err:
            return f"no intertwiner group for {type(mod).__name__}: {err}"

    def visit_producer(self, node, mod, x, shape):
        conv = not isinstance(mod, nn.Linear)
        if conv and (mod.groups != 1 or getattr(mod, "transposed", False)):
            return self.unknown(node, f"{self.describe(node)} is a grouped/depthwise convolution "
                                      f"(groups={mod.groups}); its channels are pinned")
        if not isinstance(mod.weight, nn.Parameter) or (hasattr(mod, "parametrizations")
                                                         and "weight" in mod.parametrizations):
            return self.unknown(node, f"{self.describe(node)} has a parametrised weight")
        if len(node.args) != 1 or node.kwargs or shape is None:
            return self.unknown(node, f"{self.describe(node)} is called with extra arguments")
        ndim = len(shape)
        axis = 1 if conv else ndim - 1
        if isinstance(x, _Layout):
            ok = (x.axis == 1 and x.repeat == 1) if conv else (x.axis == x.ndim - 1)
            if not ok:
                return self.unknown(node, f"{self.describe(node)} does not act on the channel axis of its "
                                          "input")
        elif x is not None:
            return self.unknown(node, f"{self.describe(node)} has an unexpected input")
        n_out = shape[axis]
        chain = 0
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = self.gm.get_submodule(users[0].target)
            if isinstance(bn, _BATCH_NORMS) and bn.affine and axis == 1 and self.calls[users[0].target] == 1:
                chain = self.chain_id((ONE,))
        out = self.make_layout(self.new_atoms(n_out), axis, ndim, chain)
        self.records.append((str(node.target), "linear", x if isinstance(x, _Layout) else None, out))
        return out

    def visit_batch_norm(self, node, mod, x):
        if not isinstance(x, _Layout):
            return None if x is None else self.unknown(node, "batch norm of a non-tensor")
        if x.axis != 1 or x.repeat != 1 or len(node.args) != 1 or node.kwargs:
            return self.unknown(node, f"{self.describe(node)} does not act on the channel axis")
        producer_chain = bool(mod.affine) and bool(np.all(x.chains == self.chain_id((ONE,))))
        self.constraints.append(("signed", x, None))
        atoms = np.where(x.atoms == ZERO, FIXED, x.atoms)
        chains = np.zeros_like(x.chains) if producer_chain else x.chains
        out = self.keep(x.derive(atoms=atoms, chains=chains))
        self.records.append((str(node.target), "batch_norm", x, out))
        return out

    def visit_activation(self, node, x, group):
        if not isinstance(x, _Layout):
            return None
        self.site_layouts[node] = x
        if self.in_place(node) and isinstance(node.args[0], fx.Node) and len(node.args[0].users) > 1:
            group = "an in-place activation overwrites a value that other operations also read"
        if isinstance(group, str):
            self.pin(x, f"activation {self.describe(node)}: {group}")
            return None
        key = id(group)
        self.group_keys.setdefault(key, group)
        self.constraints.append(("act", x, key))
        zero_stays = group.sigma0 is not None and group.sigma0 == 0.0
        atoms = x.atoms if zero_stays else np.where(x.atoms == ZERO, FIXED, x.atoms)
        return self.keep(x.derive(atoms=atoms, chains=self.extend_chains(x.chains, key)))

    def spatial(self, node, x, shape, maxpool=False):
        if x.axis != 1 or x.repeat != 1 or shape is None or len(shape) < 2:
            return self.unknown(node, f"{self.describe(node)} needs channels on axis 1")
        if maxpool:
            self.constraints.append(("maxpool", x, None))
        return x if len(shape) == x.ndim else x.derive(ndim=len(shape))

    def reshape(self, node, x, shape):
        in_shape = self.shape(node.args[0])
        if shape is None or in_shape is None:
            return self.unknown(node, f"{self.describe(node)}: unknown shapes")
        if tuple(shape) == tuple(in_shape):
            return x
        if x.axis == 1 and len(shape) == 2 and shape[0] == in_shape[0] and x.ndim == len(in_shape):
            spatial = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
            if shape[1] == in_shape[1] * spatial:
                return self.keep(x.derive(ndim=2, repeat=x.repeat * spatial))
        return self.unknown(node, f"{self.describe(node)} reshapes {in_shape} -> {shape} across channels")

    # functions
    def visit_function(self, node: fx.Node, inputs: list[_Layout]):
        target = node.target
        shape = self.shape(node)
        if target is getattr:
            return NON_TENSOR
        if not inputs:
            return None if shape is not None else NON_TENSOR
        if target in ACTIVATION_FUNCTIONS:
            group = self.function_group(node, ACTIVATION_FUNCTIONS[target])
            return self.visit_activation(node, self.value(node.args[0]), group)
        if target in _ADD_FUNCS:
            return self.add(node, self.value(node.args[0]), self.value(node.args[1]) if len(node.args) > 1
                            else node.kwargs.get("other"), shape)
        if target in _MUL_FUNCS:
            return self.scalar_mul(node, shape)
        if target in (operator.neg, torch.neg):
            return self.value(node.args[0])
        if target in _CAT_FUNCS:
            return self.cat(node, shape)
        if target is operator.getitem:
            return self.getitem(node, shape)
        if target in _RESHAPE_FUNCS:
            return self.reshape(node, self.value(node.args[0]), shape)
        if target is F.pad:
            return self.pad(node, shape)
        x = self.value(node.args[0]) if node.args else None
        if target in _MAX_POOL_FUNCS and isinstance(x, _Layout) and len(inputs) == 1:
            if node.kwargs.get("return_indices") or (len(node.args) > 6 and node.args[6]):
                return self.unknown(node, "max pooling with indices")
            return self.spatial(node, x, shape, maxpool=True)
        if target in _SPATIAL_FUNCS and isinstance(x, _Layout) and len(inputs) == 1:
            return self.spatial(node, x, shape)
        if target in _DROPOUT_FUNCS and isinstance(x, _Layout) and len(inputs) == 1:
            return x
        if target in (torch.mean, torch.sum) and isinstance(x, _Layout) and len(inputs) == 1:
            return self.reduce(node, x, shape)
        return self.unknown(node, f"{self.describe(node)} is not supported")

    def function_group(self, node: fx.Node, kind: str):
        extra = [a for a in node.args[1:]]
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        if kind == "leaky_relu":
            slope = kwargs.pop("negative_slope", extra.pop(0) if extra else 0.01)
            if extra and isinstance(extra[0], bool):
                extra = []
            if extra or kwargs or not isinstance(slope, int | float):
                return f"{self.describe(node)} has arguments the analysis does not understand"
            return self.cached_named_group(f"leaky_relu:{float(slope)}")
        if kind == "relu" and extra and isinstance(extra[0], bool):
            extra = []
        if extra or kwargs:
            return f"{self.describe(node)} has arguments the analysis does not understand"
        return self.cached_named_group(kind)

    _named_cache: dict[str, G.IntertwinerGroup] = {}

    def cached_named_group(self, name: str):
        if name not in self._named_cache:
            try:
                self._named_cache[name] = G.intertwiner_group(name)
            except Exception as err:
                return f"no intertwiner group for {name}: {err}"
        return self._named_cache[name]

    def visit_method(self, node: fx.Node, inputs: list[_Layout]):
        name = node.target
        shape = self.shape(node)
        if name in ("size", "dim", "numel"):
            return NON_TENSOR
        if not inputs:
            return None if shape is not None else NON_TENSOR
        if shape is None:
            return self.unknown(node, f"{self.describe(node)} returns a non-tensor")
        x = self.value(node.args[0])
        if not isinstance(x, _Layout):
            return self.unknown(node, f"{self.describe(node)} mixes hidden values into an untransformed one")
        if name in ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
            return self.visit_activation(node, x, self.cached_named_group(ACTIVATION_METHODS[name]))
        if name in ("add", "add_", "sub", "sub_"):
            other = self.value(node.args[1]) if len(node.args) > 1 else node.kwargs.get("other")
            return self.add(node, x, other, shape)
        if name in ("mul", "mul_", "div", "div_"):
            return self.scalar_mul(node, shape)
        if name == "neg":
            return x
        if name in _PASS_METHODS:
            if any(isinstance(a, fx.Node) for a in node.args[1:]) or tuple(shape) != tuple(self.shape(
                    node.args[0]) or ()):
                return self.unknown(node, f"{self.describe(node)} with these arguments")
            return x
        if name in _RESHAPE_METHODS:
            return self.reshape(node, x, shape)
        if name in ("mean", "sum") and len(inputs) == 1:
            return self.reduce(node, x, shape)
        return self.unknown(node, f"{self.describe(node)} is not supported")

    # structural operations
    def add(self, node, a, b, shape):
        if isinstance(b, int | float) and isinstance(a, _Layout):
            if b == 0:
                return a
            self.constraints.append(("const_add", a, None))
            return a
        if isinstance(a, int | float) and isinstance(b, _Layout):
            if a == 0:
                return b
            self.constraints.append(("const_add", b, None))
            return b
        alpha = node.kwargs.get("alpha", 1)
        if not isinstance(alpha, int | float) or set(node.kwargs) - {"alpha"}:
            return self.unknown(node, f"{self.describe(node)} with non-numeric arguments")
        sa = self.shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        sb = self.shape(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
        if sa is None or sb is None or tuple(sa) != tuple(sb) or tuple(sa) != tuple(shape):
            return self.unknown(node, f"{self.describe(node)} broadcasts (shapes {sa} and {sb})")
        if a is None or b is None:
            lay = a if b is None else b
            self.pin(lay, f"{self.describe(node)} adds it to a value that is never transformed (e.g. the "
                          "input)")
            return lay
        if not isinstance(a, _Layout) or not isinstance(b, _Layout):
            return self.unknown(node, f"{self.describe(node)} has unexpected operands")
        if (a.axis, a.repeat, len(a.atoms)) != (b.axis, b.repeat, len(b.atoms)):
            return self.unknown(node, f"{self.describe(node)} adds values with different channel layouts")
        self.adds.append((a, b))
        both = (a.atoms >= 0) & (b.atoms >= 0)
        for i in np.nonzero(both)[0]:
            self.union(int(a.atoms[i]), int(b.atoms[i]))
        for lay, other in ((a, b), (b, a)):
            fixed_partner = (lay.atoms >= 0) & (other.atoms == FIXED)
            if fixed_partner.any():
                for atom in np.unique(lay.atoms[fixed_partner]):
                    self.pins[int(atom)].append(f"{self.describe(node)} adds it to untransformed channels")
        atoms = np.where(a.atoms >= 0, a.atoms, np.where(b.atoms >= 0, b.atoms,
                                                         np.where((a.atoms == FIXED) | (b.atoms == FIXED),
                                                                  FIXED, ZERO)))
        chains = np.where(a.atoms >= 0, a.chains, b.chains)
        return self.keep(a.derive(atoms=atoms, chains=chains))

    def scalar_mul(self, node, shape):
        args = [self.value(a) for a in node.args]
        layouts = [a for a in args if isinstance(a, _Layout)]
        others = [a for a in args if not isinstance(a, _Layout)]
        if len(layouts) == 1 and len(args) == 2 and not node.kwargs and all(
                isinstance(o, int | float) and o != 0 for o in others):
            if node.target in (operator.truediv, operator.itruediv, torch.div) and args[0] is not layouts[0]:
                return self.unknown(node, f"{self.describe(node)} divides by a hidden value")
            return layouts[0]
        return self.unknown(node, f"{self.describe(node)} multiplies a hidden value by a tensor")

    def reduce(self, node, x, shape):
        """mean/sum over axes other than the batch and channel axes: acts on each channel alike."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or x.repeat != 1 or set(node.kwargs) - {"dim", "keepdim"} or shape is None:
            return self.unknown(node, f"{self.describe(node)} reduces over every axis or a flattened value")
        dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else list(dims))}
        if 0 in dims or x.axis in dims:
            return self.unknown(node, f"{self.describe(node)} reduces over the channel or batch axis")
        if len(shape) == x.ndim:
            return x
        axis = x.axis - sum(1 for d in dims if d < x.axis)
        return self.keep(_Layout(x.atoms, x.chains, axis, len(shape)))

    def cat(self, node, shape):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, list | tuple) or not isinstance(dim, int) or shape is None:
            return self.unknown(node, f"{self.describe(node)} with unexpected arguments")
        ndim = len(shape)
        parts = []
        for t in tensors:
            v = self.value(t)
            s = self.shape(t)
            if s is None:
                return self.unknown(node, f"{self.describe(node)}: unknown part shape")
            if v is None:
                v = _Layout(np.full(s[dim % ndim], FIXED, dtype=np.int64), np.zeros(s[dim % ndim], np.int64),
                            dim % ndim, ndim)
            if not isinstance(v, _Layout) or v.repeat != 1 or v.axis != dim % ndim:
                return self.unknown(node, f"{self.describe(node)} concatenates along a non-channel axis")
            parts.append(v)
        lay = _Layout(np.concatenate([p.atoms for p in parts]), np.concatenate([p.chains for p in parts]),
                      dim % ndim, ndim)
        return self.keep(lay)

    def getitem(self, node, shape):
        x = self.value(node.args[0])
        idx = node.args[1]
        if not isinstance(x, _Layout) or shape is None:
            return self.unknown(node, f"{self.describe(node)} indexes a hidden value")
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis or i is None or not isinstance(i, slice) for i in idx) or x.repeat != 1:
            return self.unknown(node, f"{self.describe(node)} indexes in a way the analysis does not follow")
        if len(idx) <= x.axis:
            return x
        if any(not isinstance(v, int | None) for s in idx for v in (s.start, s.stop, s.step)):
            return self.unknown(node, f"{self.describe(node)} slices with tensor bounds")
        if any(s != slice(None) for s in idx[:x.axis]):
            return self.unknown(node, f"{self.describe(node)} slices the batch axis")
        chan = idx[x.axis]
        if chan == slice(None):
            return x
        return self.keep(x.derive(atoms=x.atoms[chan].copy(), chains=x.chains[chan].copy()))

    def pad(self, node, shape):
        x = self.value(node.args[0])
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        val = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if not isinstance(x, _Layout) or not isinstance(pads, list | tuple) or x.repeat != 1:
            return self.unknown(node, f"{self.describe(node)} pads a hidden value in an unsupported way")
        if not all(isinstance(p, int) for p in pads) or len(pads) % 2:
            return self.unknown(node, f"{self.describe(node)} has non-constant padding")
        # pads: (last_lo, last_hi, second_last_lo, ...)
        per_dim = {x.ndim - 1 - i: (pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)}
        if any(d < x.axis and p != (0, 0) for d, p in per_dim.items()) or x.axis != 1:
            return self.unknown(node, f"{self.describe(node)} pads the batch axis")
        lo, hi = per_dim.get(1, (0, 0))
        zero_fill = mode == "constant" and (val is None or val == 0)
        if not zero_fill:
            if mode != "constant" and (lo, hi) == (0, 0):
                return x  # reflect/replicate padding of spatial axes acts on each channel alike
            return self.unknown(node, f"{self.describe(node)} pads with a non-zero value or mode {mode}")
        if (lo, hi) == (0, 0):
            return x
        if lo < 0 or hi < 0:
            return self.unknown(node, f"{self.describe(node)} crops channels with negative padding")
        atoms = np.concatenate([np.full(lo, ZERO, np.int64), x.atoms, np.full(hi, ZERO, np.int64)])
        chains = np.concatenate([np.zeros(lo, np.int64), x.chains, np.zeros(hi, np.int64)])
        return self.keep(x.derive(atoms=atoms, chains=chains))


# ----------------------------------------------------------------------------------------------------
# Phase 2: atoms -> spaces, constraints -> groups
# ----------------------------------------------------------------------------------------------------

def eval_chain(chain: tuple, scale: torch.Tensor, groups: dict[int, G.IntertwinerGroup]) -> torch.Tensor:
    """The scales c(s) a value carries when its space has element P·diag(s) (see module docstring)."""
    for entry in chain:
        scale = torch.ones_like(scale) if entry == ONE else groups[entry].scale_map(scale)
    return scale


def _chain_is_linear(chain: tuple, groups) -> bool:
    return all(entry != ONE and not groups[entry].is_monomial for entry in chain)


def _holds(kind: str, constraint: tuple, chains: list[tuple], groups) -> bool:
    """Does every element of ``kind`` satisfy ``constraint`` (checked on test scales for monomial kinds)?"""
    what = constraint[0]
    involved = [chains[c] for c in constraint[1:3] if isinstance(c, int | np.integer)] \
        if what == "eq" else [chains[constraint[1]]]
    if kind in ("general_linear", "unit_row_sum"):
        if not all(_chain_is_linear(c, groups) for c in involved):
            return False
        if what == "act":
            return G.kind_leq(kind, groups[constraint[2]].kind)
        if what == "eq":
            return True
        if what == "const_add":
            return kind == "unit_row_sum"
        return False  # maxpool, signed (batch norm)
    s = torch.tensor(_TEST_SCALES[kind], dtype=torch.float64)
    try:
        values = [eval_chain(c, s, groups) for c in involved]
    except ValueError:
        return False
    v = values[0]
    if what == "act":
        return groups[constraint[2]].allows_scale(v)
    if what == "eq":
        return bool(torch.allclose(values[0], values[1], rtol=1e-12, atol=1e-12))
    if what == "maxpool":
        return bool((v > 0).all())
    if what == "signed":
        return bool(((v.abs() - 1).abs() < 1e-12).all())
    if what == "const_add":
        return bool(((v - 1).abs() < 1e-12).all())
    return False


def choose_group(n: int, constraints: set[tuple], chains: list[tuple], groups) -> G.IntertwinerGroup | str:
    """The largest kind satisfying every constraint, as a group (phi of the space's first activation);
    or a reason string when only the identity is left."""
    acts = sorted({c[2] for c in constraints if c[0] == "act" and chains[c[1]] == ()})
    for key in {c[2] for c in constraints if c[0] == "act"}:
        try:
            groups[key].check_size(n)
        except ValueError as err:
            return str(err)
    for kind in _CANDIDATE_KINDS:
        if all(_holds(kind, c, chains, groups) for c in constraints):
            if acts:
                base = groups[acts[0]]
                return G.intersection(base, G.kind_group(kind)) if base.kind != kind else base
            return G.kind_group(kind, "linear" if kind == "general_linear" else kind)
    return "no group kind satisfies every operation on it (even permutations are excluded)"


def _ranges(positions: np.ndarray) -> str:
    pos = np.sort(positions)
    parts, start = [], pos[0]
    for i in range(1, len(pos) + 1):
        if i == len(pos) or pos[i] != pos[i - 1] + 1:
            parts.append(f"{start}:{pos[i - 1] + 1}")
            if i < len(pos):
                start = pos[i]
    return ",".join(parts)


def _resolve(an: _Analysis):
    n_atoms = len(an.parent)
    roots = np.array([an.find(a) for a in range(n_atoms)], dtype=np.int64) if n_atoms else np.zeros(0, np.int64)

    def classes_of(atoms):
        out = atoms.copy()
        m = atoms >= 0
        out[m] = roots[atoms[m]]
        return out

    # distinct atom arrays, in graph order
    distinct: list[np.ndarray] = []
    seen: dict[int, int] = {}
    for lay in an.layouts:
        key = id(lay.atoms)
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(classes_of(lay.atoms))

    class_pins: dict[int, list[str]] = defaultdict(list)
    for atom, reasons in an.pins.items():
        class_pins[int(roots[atom])].extend(reasons)
    output_classes = {int(roots[a]) for a in an.output_atoms}

    pairs_c, pairs_l = [], []
    for i, cls in enumerate(distinct):
        c = cls[cls >= 0]
        u, counts = np.unique(c, return_counts=True)
        for dup in u[counts > 1]:
            class_pins[int(dup)].append("a channel occurs twice in one value (e.g. x[:, :k] + x[:, k:])")
        pairs_c.append(u)
        pairs_l.append(np.full(len(u), i, dtype=np.int64))
    if pairs_c:
        all_c, all_l = np.concatenate(pairs_c), np.concatenate(pairs_l)
    else:
        all_c = all_l = np.zeros(0, np.int64)
    # signature of a class = the set of values holding it; hashed as a sum of random 64-bit labels
    labels = np.random.default_rng(0).integers(1, 2**63 - 1, size=max(len(distinct), 1), dtype=np.int64)
    labels = labels.astype(np.uint64)
    order = np.lexsort((all_l, all_c))
    all_c, all_l = all_c[order], all_l[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(all_c)) + 1]) if len(all_c) else np.zeros(0, np.int64)
    class_ids = all_c[starts]
    with np.errstate(over="ignore"):
        sig_hash = np.add.reduceat(labels[all_l], starts) if len(starts) else np.zeros(0, np.uint64)
    first_layout = all_l[starts]  # all_l is sorted within each class
    sig_count = np.diff(np.concatenate([starts, [len(all_c)]]))

    # position of each class in the first value that holds it (its canonical index order)
    pos_in_first = np.zeros(n_atoms, dtype=np.int64)
    first_of = np.full(n_atoms, -1, dtype=np.int64)
    first_of[class_ids] = first_layout
    for i, cls in enumerate(distinct):
        p = np.flatnonzero(cls >= 0)
        mine = p[first_of[cls[p]] == i]
        pos_in_first[cls[mine][::-1]] = mine[::-1]  # the first occurrence wins

    # spaces: classes with the same signature, ordered by (first value, position in it)
    key = np.stack([first_layout, pos_in_first[class_ids]], 1) if len(class_ids) else np.zeros((0, 2), np.int64)
    order = np.lexsort((key[:, 1], key[:, 0]))
    space_of = np.full(n_atoms, -1, dtype=np.int64)
    index_of = np.full(n_atoms, -1, dtype=np.int64)
    spaces: list[dict] = []
    sig_to_space: dict[tuple, int] = {}
    members: list[list[int]] = []
    for k in order.tolist():
        sig = (int(sig_hash[k]), int(sig_count[k]), int(first_layout[k]))
        sid = sig_to_space.setdefault(sig, len(sig_to_space))
        if sid == len(members):
            members.append([])
        members[sid].append(int(class_ids[k]))
    for sid, ordered in enumerate(members):
        space_of[ordered] = sid
        index_of[ordered] = np.arange(len(ordered))
        reasons = [r for c in ordered for r in class_pins.get(c, [])]
        spaces.append(dict(classes=ordered, size=len(ordered), first=first_of[ordered[0]], reasons=reasons,
                           output=any(c in output_classes for c in ordered), constraints=set(), sites=[],
                           producers=[], consumers=[], ties=0))

    n_chains = len(an.chains)
    pair_cache: dict[tuple[int, int], np.ndarray] = {}

    def space_chain_pairs(lay: _Layout) -> np.ndarray:
        """The distinct (space, chain) pairs of a value, as an (k, 2) array."""
        key = (id(lay.atoms), id(lay.chains))
        if key not in pair_cache:
            cls = classes_of(lay.atoms)
            m = cls >= 0
            codes = np.unique(space_of[cls[m]] * n_chains + lay.chains[m])
            pair_cache[key] = np.stack([codes // n_chains, codes % n_chains], 1)
        return pair_cache[key]

    # one chain per space per value
    for lay in an.layouts:
        pairs = space_chain_pairs(lay)
        if len(pairs) > 1:
            sids, counts = np.unique(pairs[:, 0], return_counts=True)
            for sid in sids[counts > 1]:
                spaces[sid]["reasons"].append("its channels carry different transforms in one value")
    for kind, lay, extra in an.constraints:
        for sid, chain in space_chain_pairs(lay).tolist():
            spaces[sid]["constraints"].add((kind, chain, extra))
    for a, b in an.adds:
        ca, cb = classes_of(a.atoms), classes_of(b.atoms)
        both = (ca >= 0) & (cb >= 0)
        if not both.any():
            continue
        codes = np.unique((space_of[ca[both]] * n_chains + a.chains[both]) * n_chains + b.chains[both])
        for code in codes.tolist():
            sid, x, y = code // (n_chains * n_chains), (code // n_chains) % n_chains, code % n_chains
            spaces[sid]["ties"] += 1
            if x != y:
                spaces[sid]["constraints"].add(("eq", int(min(x, y)), int(max(x, y))))
    return roots, classes_of, distinct, spaces, space_of, index_of


def build_spec(an: _Analysis, model_type: str = "") -> SymmetrySpec:
    roots, classes_of, distinct, spaces, space_of, index_of = _resolve(an)
    groups = an.group_keys

    # sites, producers, consumers (for names and documentation)
    sites = find_sites(an.gm)
    for site in sites:
        lay = an.site_layouts.get(site.node)
        if lay is None:
            continue
        cls = classes_of(lay.atoms)
        for sid in dict.fromkeys(space_of[cls[cls >= 0]].tolist()):
            spaces[sid]["sites"].append(site.name)
    for module, kind, x, out in an.records:
        for lay, role in ((out, "producers"), (x, "consumers")):
            if lay is None or (kind == "batch_norm" and role == "consumers"):
                continue
            cls = classes_of(lay.atoms)
            for sid in dict.fromkeys(space_of[cls[cls >= 0]].tolist()):
                spaces[sid][role].append(module)

    # names: the first site (or producer) that holds the space, with a channel range if it holds more
    names: list[str] = []
    used: set[str] = set()
    for sid, sp in enumerate(spaces):
        base, holder = None, None
        if sp["sites"]:
            base = sp["sites"][0]
            holder = next(an.site_layouts[s.node] for s in sites if s.name == base)
        elif sp["producers"]:
            base = sp["producers"][0]
            holder = next(o for m, _, _, o in an.records if m == base)
        if base is None:
            base = f"space{sid}"
        if holder is not None:
            cls = classes_of(holder.atoms)
            inside = space_of[np.where(cls >= 0, cls, 0)] == sid
            inside &= cls >= 0
            if inside.sum() != len(cls):
                base = f"{base}[{_ranges(np.flatnonzero(inside))}]"
        name, k = base, 1
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        names.append(name)

    result_spaces: dict[str, Space] = {}
    pinned: dict[str, str] = {}
    pinned_sizes: dict[str, int] = {}
    active = np.zeros(len(spaces), dtype=bool)
    for sid, sp in enumerate(spaces):
        name = names[sid]
        reasons = list(dict.fromkeys(sp["reasons"]))
        if sp["output"]:
            reasons = [r for r in reasons if r != "the model's output"]
            if not reasons:
                continue  # the output space: never transformed, not a hidden space
            reasons.append("it reaches the model's output")
        if not reasons:
            group = choose_group(sp["size"], sp["constraints"], an.chains, groups)
            if isinstance(group, str):
                reasons = [group]
        if reasons:
            pinned[name] = "; ".join(reasons)
            pinned_sizes[name] = sp["size"]
            continue
        active[sid] = True
        result_spaces[name] = Space(name, sp["size"], group, sp["sites"], sp["producers"], sp["consumers"],
                                    sp["ties"])

    def value_layout(lay: _Layout | None) -> ValueLayout | None:
        if lay is None:
            return None
        cls = classes_of(lay.atoms)
        segments = []
        m = cls >= 0
        sids = space_of[cls[m]]
        for sid in dict.fromkeys(sids.tolist()):
            if not active[sid]:
                continue
            pos = np.flatnonzero(m)[sids == sid]
            positions = np.empty(len(pos), dtype=np.int64)
            positions[index_of[cls[pos]]] = pos
            segments.append(Segment(names[sid], positions, an.chains[int(lay.chains[pos[0]])]))
        return ValueLayout(len(lay.atoms), segments)

    actions = []
    for module, kind, x, out in an.records:
        actions.append(ModuleAction(module, kind, value_layout(x), value_layout(out)))
    return SymmetrySpec(result_spaces, pinned, pinned_sizes, [s.name for s in sites], actions, model_type, groups)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def _trace_with_fallback(model: nn.Module, leaf_types: tuple) -> tuple[fx.GraphModule, tuple]:
    try:
        return trace(model, leaf_types), ()
    except ValueError as first:
        custom = tuple({type(m) for m in model.modules() if m is not model
                        and not type(m).__module__.startswith("torch.")})
        try:
            return trace(model, leaf_types + custom), custom
        except ValueError:
            raise first from None


def symmetry_spec(model: nn.Module, example_input, *, leaf_types: tuple[type[nn.Module], ...] = ()
                  ) -> SymmetrySpec:
    """The weight-space symmetries of ``model``, found by tracing it with torch.fx (paper §3.2).

    ``example_input``: one input batch (tensor or array), used to propagate shapes (the model runs once,
    in eval mode, without autograd; it is not modified). ``leaf_types``: extra module types to treat as
    opaque (their spaces get pinned). Returns a :class:`SymmetrySpec`: ``spec.spaces`` (name ->
    :class:`Space` with ``.size``, ``.group``, ``.sites``) and ``spec.pinned`` (name -> reason).
    Raises ValueError only when the model cannot be traced at all.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"symmetry_spec needs an nn.Module, got {type(model).__name__}")
    gm, opaque = _trace_with_fallback(model, tuple(leaf_types))
    p = next(iter(model.parameters()), None)
    x = as_tensor(example_input, name="example_input")
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    try:
        with torch.no_grad(), eval_mode(gm):
            ShapeProp(gm).propagate(x)
    except Exception as err:
        raise ValueError(f"symmetry_spec: running {type(model).__name__} on the example input failed: "
                         f"{err}") from err
    an = _Analysis(gm, model, tuple(leaf_types) + opaque).run()
    return build_spec(an, type(model).__name__)
