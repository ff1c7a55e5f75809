"""Finding the weight-space symmetries of a model (paper §3.2, Proposition 3.4, Remark 3.6).

:func:`symmetry_spec` captures the model with ``torch.export`` (non-strict, aten level;
:mod:`~intertwiners.symmetries.engine`), follows every hidden channel through the graph with one rule per
operation (:mod:`~intertwiners.symmetries.rules`), joins channels tied by residual connections, gathers
the constraints every operation puts on a channel's transform (:mod:`~intertwiners.symmetries.constraints`)
and gives each *space* the largest group allowed (:mod:`~intertwiners.symmetries.resolve`). Anything it
does not understand pins the spaces it touches, with the reason. Then, by default, every space is checked
on the example input (a random element, outputs compared in eval and train mode, in float64) and any space
that fails is pinned too: a misjudged operation may cost a symmetry, never give a wrong one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import groups as G
from .engine import Analysis, capture, map_inputs
from .resolve import ParamAction, Resolver, Segment, choose


@dataclass
class Space:
    """One hidden space and its group: ``size`` coordinates, ``group`` (an ``IntertwinerGroup`` or an
    :class:`~intertwiners.symmetries.structured.AttentionGroup`), ``sites`` (activation sites whose input
    holds it), ``producers``/``consumers`` (parameters whose rows / columns it moves), ``ties`` (residual
    additions inside it)."""

    name: str
    size: int
    group: object
    sites: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    ties: int = 0

    @property
    def kind(self) -> str:
        return self.group.kind

    @property
    def is_monomial(self) -> bool:
        return self.group.is_monomial

    def __repr__(self) -> str:
        return f"Space({self.name!r}, size={self.size}, kind={self.kind!r}, sites={self.sites}, ties={self.ties})"


@dataclass
class SymmetrySpec:
    """The weight-space symmetries of one model: ``spaces`` (name -> :class:`Space`), ``pinned`` (name ->
    reason), ``pinned_sizes``, ``sites`` (all activation sites) and ``param_actions`` (how each space moves
    each parameter and buffer; see :meth:`actions`)."""

    spaces: dict[str, Space]
    pinned: dict[str, str]
    pinned_sizes: dict[str, int]
    sites: list[str]
    param_actions: list[ParamAction]
    model_type: str = ""
    groups: dict = field(default_factory=dict, repr=False)
    lower_precision_inside: bool = False
    """The captured graph casts to float32/float16/bfloat16 (transformers' RMSNorm does, even in a float64
    model): a transformed copy then agrees with the model to that precision only (the rounding differs)."""

    def actions(self, space: str | None = None) -> list[ParamAction]:
        """The parameters/buffers a space acts on: ``ParamAction(param, dim, role, space, segment, ...)``,
        ``role`` ``out`` (t -> T t along ``dim``), ``in`` (w -> w T^-1), ``scale`` (per-channel factors),
        ``perm``; ``dim`` None means along the flattened tensor. All spaces when ``space`` is None."""
        if space is not None and space not in self.spaces:
            raise ValueError(f"unknown space {space!r}; spaces: {list(self.spaces)}")
        return [a for a in self.param_actions if space is None or a.space == space]

    def summary(self) -> str:
        lines = [f"{self.model_type}: {len(self.spaces)} spaces, {len(self.pinned)} pinned"]
        for s in self.spaces.values():
            extra = f", tied by {s.ties} residual add(s)" if s.ties else ""
            lines.append(f"  {s.name:<32} n={s.size:<5} {s.kind:<28} sites={s.sites}{extra}")
        for name, reason in self.pinned.items():
            lines.append(f"  {name:<32} n={self.pinned_sizes.get(name, '?'):<5} PINNED: {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _as_args(model: nn.Module, example_input) -> tuple | dict:
    """The example input as positional inputs (a tuple) or keyword inputs (a dict, e.g. a tokenizer's output
    with ``input_ids`` and ``attention_mask``), on the model's device, floating inputs in its dtype."""
    if isinstance(example_input, torch.Tensor):
        args = (example_input,)
    elif isinstance(example_input, tuple | list):
        args = tuple(example_input)
    elif isinstance(example_input, Mapping):
        args = {str(k): v for k, v in example_input.items()}
    else:
        from .._util import as_tensor
        args = (as_tensor(example_input, name="example_input"),)
    p = next(iter(model.parameters()), None)

    def prepare(a):
        if not isinstance(a, torch.Tensor):
            raise ValueError("example_input must be a tensor, a tuple of tensors or a dict of tensors, got "
                             f"{type(a).__name__} inside")
        if not torch.isfinite(a).all() if a.is_floating_point() else False:
            raise ValueError("example_input has non-finite entries")
        if p is not None:
            a = a.to(device=p.device, dtype=p.dtype if a.is_floating_point() else a.dtype)
        return a

    if not args:
        raise ValueError("example_input is empty")
    out = map_inputs(args, prepare)
    if isinstance(out, dict):
        return out
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None)
    if first_conv is not None and out and out[0].is_floating_point():
        want = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(first_conv)] if type(first_conv) in (
            nn.Conv1d, nn.Conv2d, nn.Conv3d) else None
        if want is not None and out[0].ndim == want - 1:
            raise ValueError(f"example_input has shape {tuple(out[0].shape)}: an unbatched input to a "
                             f"{type(first_conv).__name__}; pass a batch (add a leading batch axis)")
    return tuple(out)


def build(an: Analysis, model_type: str) -> SymmetrySpec:
    res = Resolver(an).run()
    spaces, groups = res.spaces, an.groups
    # names: the first site that holds the space (channel ranges if it holds more), else its producer
    out_bindings = {}
    for b in an.bindings:
        if b.role == "out":
            for c in res.classes(b.atoms)[res.classes(b.atoms) >= 0][:1].tolist():
                out_bindings.setdefault(res.space_of[c], b.param.rsplit(".", 1)[0])
    site_layouts = dict((n, lay) for n, lay in an.sites)
    used, names = set(), []
    for sid, sp in enumerate(spaces):
        base = sp.get("name")
        if base is None and sp["sites"]:
            base = sp["sites"][0]
            cls = res.classes(site_layouts[base].atoms)
            inside = [i for i, c in enumerate(cls.tolist()) if c >= 0 and res.space_of[c] == sid]
            if len(inside) != len(cls):
                import numpy as np
                base = f"{base}[{_ranges(np.array(inside))}]" if inside else base
        if base is None:
            base = out_bindings.get(sid, f"space{sid}")
        name, k = base, 1
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        names.append(name)
    result, pinned, pinned_sizes, active = {}, {}, {}, {}
    for sid, sp in enumerate(spaces):
        if not sp["classes"]:
            continue  # merged into an attention space
        reasons = list(dict.fromkeys(sp["reasons"]))
        if sp.get("multi") and sp.get("group") is None:
            reasons.append("its channels carry different transforms in one value")
        if sp["output"]:
            reasons = [r for r in reasons if r != "the model's output"]
            if not reasons:
                continue
            reasons.append("it reaches the model's output")
        group = None
        if not reasons:
            group = choose(sp, groups)
            if isinstance(group, str):
                reasons = [group]
        if reasons:
            pinned[names[sid]] = "; ".join(reasons)
            pinned_sizes[names[sid]] = len(sp["classes"])
            continue
        active[sid] = names[sid]
        result[names[sid]] = Space(names[sid], len(sp["classes"]), group, sp["sites"], [], [], sp["ties"])
    actions = []
    # spaces whose coordinates may occur with different multiplicities in one axis: monomial elements act
    # coordinate by coordinate, attention elements block by block
    splittable = {sid for sid, name in active.items()
                  if result[name].group.is_monomial or result[name].group.kind == "attention_heads"}
    for b in an.bindings:
        segs = res.segments(b.atoms, b.chains, active, splittable)
        in_segs = res.segments(b.in_atoms, b.in_chains, active, splittable) if b.in_atoms is not None else None
        for bad in (segs, in_segs):
            if isinstance(bad, str):
                raise ValueError(bad)  # pragma: no cover - the resolver keeps segments even
        for i, seg in enumerate(segs):
            in_seg = in_segs[i] if in_segs else None
            actions.append(ParamAction(b.param, b.dim, b.role, seg.space, seg, in_seg, b.groups, len(b.atoms)))
            space = result[seg.space]
            lst = space.producers if b.role == "out" else space.consumers if b.role == "in" else None
            if lst is not None and b.param not in lst:
                lst.append(b.param)
    return SymmetrySpec(result, pinned, pinned_sizes, [n for n, _ in an.sites], actions, model_type, groups)


def _ranges(positions) -> str:
    from .resolve import _ranges as r
    return r(positions)


def symmetry_spec(model: nn.Module, example_input, *, check: bool = True, leaf_types: tuple = ()) -> SymmetrySpec:
    """The weight-space symmetries of ``model`` (paper §3.2), found from its captured graph.

    ``example_input``: one input batch (a tensor, or a tuple of positional inputs such as token ids);
    the model runs on it in eval mode and is not modified. ``check`` (default True): apply a random element
    of every space on its own and compare outputs on ``example_input`` (eval and train mode, float64 copy);
    a space that fails is pinned with the reason. ``leaf_types`` is accepted for compatibility (capture
    needs no leaves). Returns a :class:`SymmetrySpec`; ValueError when the model cannot be captured.
    """
    del leaf_types
    if not isinstance(model, nn.Module):
        raise ValueError(f"symmetry_spec needs an nn.Module, got {type(model).__name__}")
    args = _as_args(model, example_input)
    cap = capture(model, args)
    an = Analysis(cap, model).run()
    spec = build(an, type(model).__name__)
    spec.lower_precision_inside = any(
        isinstance(a, torch.dtype) and a in (torch.float32, torch.float16, torch.bfloat16)
        for n in cap.graph.nodes for a in list(n.args) + list(n.kwargs.values()))
    if check and spec.spaces:
        from .verify import safety_check
        safety_check(model, args, spec, rtol=1e-5 if spec.lower_precision_inside else 1e-8)
    return spec


def drop_space(spec: SymmetrySpec, name: str, reason: str) -> None:
    """Pin a space after the fact (used by the safety check)."""
    space = spec.spaces.pop(name)
    spec.pinned[name] = reason
    spec.pinned_sizes[name] = space.size
    spec.param_actions = [a for a in spec.param_actions if a.space != name]


__all__ = ["ParamAction", "Segment", "Space", "SymmetrySpec", "copy", "drop_space", "symmetry_spec", "G"]
