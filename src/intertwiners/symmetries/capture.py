"""Capture: trace a model to its aten graph (pre-dispatch, fake tensors) and name what the graph holds.

:func:`capture` traces the model in eval mode (the original is untouched) with ``make_fx`` at the
pre-dispatch level on fake tensors, which is the graph ``torch.export`` (non-strict) produces without
export's passes and checks; it costs about half as much. Fused arithmetic (``addcmul``, ``addcdiv``) is traced
as the operations it fuses. The modules' attributes are put back afterwards (a forward that caches tensors on
its modules would keep the trace's fake tensors). When that trace fails, :func:`capture_exported`
(``torch.export`` itself) is tried, and its reason is reported if it fails too. Both return the aten graph,
the qualified name of every parameter/buffer placeholder and the model's tensors; :func:`owner` gives the
module that created a node. A wrapper keeps only the tensors of the output, so transformers'
``ModelOutput``s work.

A forward that branches on the values of a tensor (data-dependent control flow) cannot be traced. The one
such pattern with a data-independent twin is handled: transformers' mixture-of-experts layers loop over the
experts a batch is routed to ("eager") or multiply each expert's tokens in a grouped product ("grouped_mm",
an opaque custom operator when traced), and compute the same function by gathering each token's experts'
weights ("batched_mm"); the model is captured with that implementation (then switched back; symmetries are
checked on the model as it is). Anything else is refused with a ValueError that names the cause and the ways
around it.
"""

from __future__ import annotations

import contextlib
import io
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from ..features import eval_mode
from .module_state import module_state_restored

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


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


@dataclass(frozen=True)
class Captured:
    """The exported aten graph; ``params``: placeholder name -> qualified parameter/buffer name (a tied
    parameter under its first name); ``inputs``: user input placeholder names; ``tensors``: qualified
    name -> parameter/buffer of the model."""
    graph: fx.Graph
    params: dict[str, str]
    inputs: list[str]
    tensors: dict[str, torch.Tensor]
    buffers: frozenset = frozenset()

    @property
    def unread(self) -> list[str]:
        """The floating parameters the graph never reads (unused, or read only on a path the eval-mode capture
        does not take, e.g. the learned mask embedding transformers' speech models insert in train mode)."""
        users = {n.name: bool(n.users) for n in self.graph.nodes if n.op == "placeholder"}
        return sorted({name for ph, name in self.params.items()
                       if not users.get(ph, True) and name not in self.buffers
                       and self.tensors[name].is_floating_point()})

    @property
    def lowest_cast(self) -> torch.dtype | None:
        """The lowest floating precision the graph casts to (float32/float16/bfloat16; transformers' RMSNorm
        casts to float32 even in a float64 model), None when it casts to none. A transformed copy then
        agrees with the model to that precision only."""
        found = {a for n in self.graph.nodes for a in list(n.args) + list(n.kwargs.values())
                 if isinstance(a, torch.dtype) and a in LOW_PRECISION}
        return max(found, key=lambda d: LOW_PRECISION.index(d)) if found else None


@contextmanager
def _no_stack_traces():
    """Tracing without recording a Python stack trace per node (a tenth of the cost; nothing reads them)."""
    old = fx.config.do_not_emit_stack_traces
    fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx.config.do_not_emit_stack_traces = old


def _named_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(qualified name -> parameter/buffer, every name -> the first name of its tensor). A tied parameter
    (GPT-2's wte and lm_head) gets its first name in the model, as named_parameters() gives it."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    first: dict[int, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        first.setdefault(id(t), name)
    return tensors, {name: first.get(id(t), name) for name, t in tensors.items()}


def capture(model: nn.Module, args) -> Captured:
    """Trace ``model`` (eval mode) on ``args`` (a tuple, or a dict of keyword inputs); :func:`capture_exported`
    when the trace fails. ValueError with the exporter's reason when both fail. The model's modules keep the
    attributes they had (:func:`module_state_restored`). transformers' mixture-of-experts layers are captured
    in their gathered form (:func:`_gathered_experts`), and without their key/value cache (:func:`_without_cache`)."""
    with module_state_restored(model), _gathered_experts(model), _without_cache(model):
        try:
            return _capture_traced(model, args)
        except Exception:  # noqa: BLE001 - torch.export gets its chance and gives the reason
            return capture_exported(model, args)


def _decompositions() -> dict:
    """Fused arithmetic traced as the operations it fuses, which have rules: ``addcmul(b, a, x, value=c)`` as
    ``b + c * a * x`` (timm's ``Affine`` of ResMLP), ``addcdiv`` likewise with a division."""
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    return get_decompositions([aten.addcmul, aten.addcdiv])


def _capture_traced(model: nn.Module, args) -> Captured:
    """The pre-dispatch aten graph of ``model`` on fake tensors (parameters and buffers are its first
    placeholders, each tensor once, then the inputs), with each node's module stack."""
    wrapper = _Wrap(model, list(args) if isinstance(args, dict) else None)
    params = dict(wrapper.named_parameters())
    buffers = dict(wrapper.named_buffers())
    names = list(params) + list(buffers)
    n = len(names)

    def stateless(*flat):
        return functional_call(wrapper, dict(zip(names, flat[:n])), tuple(flat[n:]))

    stateless._orig_mod = wrapper  # the root that make_fx names module paths from ("m.layer1.0.conv1")
    flat = [*params.values(), *buffers.values(), *input_tensors(args)]
    with torch.no_grad(), eval_mode(model), _no_stack_traces():
        gm = make_fx(stateless, decomposition_table=_decompositions(), tracing_mode="fake", pre_dispatch=True,
                     record_module_stack=True, _allow_non_fake_inputs=True)(*flat)
    if any(_data_dependent_shape(node) for node in gm.graph.nodes):
        with torch.no_grad(), eval_mode(model), contextlib.suppress(Exception):
            _record_concrete_shapes(gm, flat)   # if the graph cannot run, rules reading those shapes pin
    placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    tensors, first = _named_tensors(model)
    qualified = [first.get(name[2:], name[2:]) for name in names]
    buffer_names = frozenset(qualified[len(params):])
    return Captured(gm.graph, dict(zip(placeholders, qualified)), placeholders[n:], tensors, buffer_names)


def _export(model: nn.Module, args):
    """``torch.export`` of the model; the partial graph the exporter prints to stderr when it fails (hundreds of
    kilobytes for a detection model) is dropped, everything else it writes there is passed on."""
    wrapper = _Wrap(model, list(args) if isinstance(args, dict) else None)
    written = io.StringIO()
    try:
        with torch.no_grad(), eval_mode(model), _no_stack_traces(), contextlib.redirect_stderr(written):
            return torch.export.export(wrapper, tuple(input_tensors(args)), strict=False)
    except Exception as err:
        partial = getattr(err, "partial_fx_graph", None)
        if partial is not None:
            written = io.StringIO(written.getvalue().replace(f"{partial}\n", ""))
        raise
    finally:
        sys.stderr.write(written.getvalue())


def _data_dependent(err: BaseException) -> bool:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    while err is not None:
        if isinstance(err, GuardOnDataDependentSymNode):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def _without_cache(model: nn.Module):
    """transformers' key/value cache switched off while the block runs (``config.use_cache``, on by default in
    every causal language model), then back: the cache's update between the projections and the attention hides
    the heads from the rules (each attention was pinned), and the logits are the same without it. A transformed
    model's cache holds its own transformed keys and values."""
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "use_cache", None) is True]
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


@contextlib.contextmanager
def _gathered_experts(model: nn.Module):
    """transformers' mixture-of-experts layers switched to the data-independent gather of each token's experts'
    weights ("batched_mm", the same function) while the block runs, from the loop over routed experts ("eager")
    or the grouped product ("grouped_mm"), then back. A model without experts, or one that cannot switch (an
    implementation fixed at load time), is left as it is."""
    before = None
    if callable(getattr(model, "get_experts_implementation", None)) and \
            callable(getattr(model, "set_experts_implementation", None)):
        with contextlib.suppress(Exception):
            before = model.get_experts_implementation()
    if not isinstance(before, dict) or all(v == "batched_mm" for v in before.values()):
        yield
        return
    try:
        model.set_experts_implementation({k: "batched_mm" for k in before})
    except Exception:  # noqa: BLE001 - captured as it is; an opaque expert operator pins what it touches
        yield
        return
    try:
        yield
    finally:
        model.set_experts_implementation(before)


def capture_exported(model: nn.Module, args) -> Captured:
    """Export ``model`` (eval mode, non-strict) on ``args``; ValueError with the exporter's reason on failure
    (for data-dependent control flow: the cause and the ways around it)."""
    name = type(model).__name__
    try:
        ep = _export(model, args)
    except Exception as err:
        first = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if not _data_dependent(err):
            raise ValueError(f"symmetry_spec: torch.export could not capture {name} on the example input: "
                             f"{first}") from err
        raise ValueError(
            f"symmetry_spec: torch.export could not capture {name}: its forward branches on the values of a "
            f"tensor (data-dependent control flow, e.g. a mixture-of-experts layer that loops over the experts "
            f"a batch is routed to; {first}). Write that part without data-dependent branches (compute every "
            f"expert and weight the outputs, or gather each token's experts' weights as transformers' "
            f"experts_implementation='batched_mm' does), or make it a torch.library custom operator and give "
            f"it a rule with register_rule") from err
    sig = ep.graph_signature
    tensors, first = _named_tensors(model)
    params = {}
    for ph, name in list(sig.inputs_to_parameters.items()) + list(sig.inputs_to_buffers.items()):
        name = name[2:] if name.startswith("m.") else name
        params[ph] = first.get(name, name)
    buffers = frozenset(params[ph] for ph in sig.inputs_to_buffers)
    return Captured(ep.graph, params, list(sig.user_inputs), tensors, buffers)


def owner(node: fx.Node) -> tuple[str, type | None]:
    """(qualified name, class) of the innermost module whose forward created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, cls = list(stack.values())[-1]
    path = path[2:] if path.startswith("m.") else ("" if path in ("m", "L['self'].m") else path)
    return path, cls


def shape_of(node) -> tuple | None:
    """The shape of a node's tensor output (None for non-tensors): the traced shape, or for a size that depends
    on the values (``hidden[eos_mask]``) the one the example input gave (:func:`_record_concrete_shapes`)."""
    if not isinstance(node, fx.Node):
        return None
    if CONCRETE in node.meta:
        return node.meta[CONCRETE]
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


CONCRETE = "intertwiners_shape"
"""node.meta key of the shape a node's output had on the example input, where the traced one depends on values."""


def _data_dependent_shape(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape)


def _record_concrete_shapes(gm: fx.GraphModule, flat: list) -> None:
    """Run the traced graph once on the real tensors and keep, for every node whose traced shape depends on the
    values of a tensor (an unbacked size: boolean-mask indexing, ``nonzero``), the shape its output had. The
    rules see those shapes; channels never sit on such an axis (its size counts selected tokens)."""
    shapes = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if _data_dependent_shape(n) and isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    Recorder(gm).run(*flat)
    for node, shape in shapes.items():
        node.meta[CONCRETE] = shape
