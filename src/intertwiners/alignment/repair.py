"""REPAIR (Jordan et al., ICLR 2023): give the channels of an interpolated model the statistics that interpolate
the two end models' statistics.

Averaging the weights of two aligned networks shrinks the spread of their hidden channels (the "variance
collapse" of the paper): a channel of ``(1 - a)·A + a·B`` has a smaller standard deviation than the same
channel of A or of B, and the collapse compounds with depth. REPAIR measures, on training inputs, the mean
``mu`` and standard deviation ``sigma`` of every corrected channel of A and of B, and rescales and shifts the
channel of the interpolated model so that its mean becomes ``(1 - a)·mu_A + a·mu_B`` and its standard
deviation ``(1 - a)·sigma_A + a·sigma_B``. The correction is folded into the parameters of the layer that
produces the channel, so the repaired model has the architecture of A.

Where the correction applies (:func:`repair_sites`), read off one forward pass of the model:

* the output channels of every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` with a bias whose output does not go
  straight into a normalisation layer (a pre-activation of a network without norms): the channel's weight
  row and bias are rescaled and the bias shifted;
* the output channels of every batch norm with affine parameters (the "post-norm" statistics): its running
  statistics are set to the exact mean and (population) variance of its input, and its affine parameters to
  the target, ``beta = mu_target`` and ``gamma = sigma_target · sqrt(var + eps) / std`` (sign of the
  interpolated gamma kept). This is "recompute the batch-norm statistics, then set the affine parameters to
  the interpolated statistics"; the eps factor makes the output standard deviation exactly the target;
* the output channels of every ``nn.LayerNorm`` (one normalised dimension) and ``nn.GroupNorm`` with a weight
  and a bias: both rescaled, the bias shifted.

Left out: the layer whose output is the model's output (the logits are not a hidden channel), modules called
more than once in one forward pass (a shared layer has one set of parameters for several channels' statistics),
layers without a bias and not followed by a norm (no shift can be folded into them), and a ``Linear``/``Conv``
whose output goes straight into a normalisation layer (the norm's output is corrected instead; correcting both
would be undone by the norm). A channel that is constant on the data (standard deviation 0) only gets its
mean shifted.

Statistics are over every axis but the channel axis (batch, spatial positions, tokens), in eval mode,
accumulated in float64. Corrections are applied in forward order, each measured with the earlier ones already
applied, so every corrected channel ends with exactly its target statistics on the inputs used: in one forward
pass when the inputs are one batch (each site's hook corrects its output before the next layer sees it),
otherwise in one streamed pass per site (the forward stops after the site).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..features import iterate_inputs

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PRODUCERS = (nn.Linear,) + _CONV
_FROM_INPUT = ("batchnorm", "statistics")   # rules that read a batch norm's input and recompute its output


@dataclass(frozen=True)
class RepairSite:
    """One layer whose output channels REPAIR corrects.

    ``name``: the module's name in ``model.named_modules()``; ``rule``: ``"producer"`` (a Linear/Conv: weight
    rows and bias), ``"batchnorm"`` (running statistics and affine parameters), ``"norm"`` (a LayerNorm /
    GroupNorm: weight and bias) or ``"statistics"`` (a batch norm's running statistics alone: the batch-norm
    reset, :func:`batchnorm_sites`); ``axis``: the channel axis of the module's output (1 for convolutions, batch
    and group norms, -1 for linear layers and layer norms)."""

    name: str
    rule: str
    axis: int


@dataclass
class Moments:
    """Streaming per-channel moments of one site: ``count`` (samples per channel), ``mean`` (C,) and ``m2`` (C,),
    the sum of squared deviations from the mean (float64); batches are merged with Chan et al.'s formula, so
    the result does not depend on how the inputs are batched."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, t: torch.Tensor, axis: int) -> None:
        n = t.numel() // t.shape[axis]
        mean, std = channel_mean_std(t, axis)
        m2 = std * std * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (C,), population standard deviation (C,)), float64."""
        return self.mean, (self.m2 / self.count).clamp_min(0).sqrt()


def _other_axes(t: torch.Tensor, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(t.ndim) if d != axis % t.ndim)


def channel_mean_std(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), population std (C,)) of ``t`` per channel along ``axis`` (every other axis is a sample),
    returned in float64; computed in ``t``'s floating dtype (torch's reduction is accurate to a few units of
    that precision; float64 where the model computes in float64)."""
    t = t.detach()
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    var, mean = torch.var_mean(t, dim=_other_axes(t, axis), correction=0)
    return mean.to(torch.float64), var.to(torch.float64).sqrt()


def interpolated_targets(stats_a: dict, stats_b: dict, alpha: float) -> dict:
    """{site: (mean, std)}: ``(1 - alpha)·A + alpha·B`` of both statistics, per channel (the REPAIR targets)."""
    alpha = float(alpha)
    return {k: ((1 - alpha) * stats_a[k][0] + alpha * stats_b[k][0],
                (1 - alpha) * stats_a[k][1] + alpha * stats_b[k][1]) for k in stats_a}


def affine_correction(mean: torch.Tensor, std: torch.Tensor, target_mean: torch.Tensor, target_std: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,): ``y -> scale·y + shift`` gives channels of mean ``mean`` and standard deviation
    ``std`` the target ones. A constant channel (std 0) keeps scale 1 and only moves to the target mean."""
    live = std > 0
    scale = torch.where(live, target_std / torch.where(live, std, torch.ones_like(std)), torch.ones_like(std))
    return scale, target_mean - scale * mean


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer (torch's or a library's ``*Norm`` class): a producer feeding it is not corrected."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm
                      | nn.modules.instancenorm._InstanceNorm) or type(module).__name__.endswith("Norm")


def _rule(module: nn.Module) -> tuple[str, int] | None:
    """(rule, channel axis) for a module REPAIR can correct, else None."""
    if isinstance(module, _PRODUCERS):
        return ("producer", 1 if isinstance(module, _CONV) else -1) if module.bias is not None else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ("batchnorm", 1) if module.affine and module.track_running_stats else None
    if isinstance(module, nn.GroupNorm):
        return ("norm", 1) if module.affine else None
    if isinstance(module, nn.LayerNorm):
        ok = len(module.normalized_shape) == 1 and module.weight is not None and module.bias is not None
        return ("norm", -1) if ok else None
    return None


def _output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a tuple/list, a dict or a transformers ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in _output_tensors(o)]
    return []


@torch.no_grad()
def repair_sites(model: nn.Module, example_input: torch.Tensor) -> list[RepairSite]:
    """The layers whose channels REPAIR corrects, in the order one forward pass on ``example_input`` runs them
    (see the module docstring for the rule)."""
    candidates = {name: m for name, m in model.named_modules() if _rule(m) is not None}
    norms = {name: m for name, m in model.named_modules() if _is_norm(m)}
    calls: dict[str, int] = {}
    order: list[str] = []
    produced: dict[int, str] = {}   # id of an output tensor -> module name
    keep: list[torch.Tensor] = []   # holds every recorded tensor, so that no id is reused during the pass
    fed_norm: set[str] = set()

    def after(name):
        def hook(_m, _inputs, out):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name
                keep.append(out)
        return hook

    def before(_name):
        def hook(_m, inputs):
            for t in inputs:
                if isinstance(t, torch.Tensor) and id(t) in produced:
                    fed_norm.add(produced[id(t)])
        return hook

    handles = [m.register_forward_hook(after(n)) for n, m in candidates.items()]
    handles += [m.register_forward_pre_hook(before(n)) for n, m in norms.items()]
    was = model.training
    model.eval()
    try:
        out = model(_to_model(model, example_input))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    final = {produced[id(t)] for t in _output_tensors(out) if id(t) in produced}
    sites = []
    for name in order:
        rule, axis = _rule(candidates[name])
        if calls[name] > 1 or name in final or (rule == "producer" and name in fed_norm):
            continue
        sites.append(RepairSite(name, rule, axis))
    return sites


def _to_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    if p is None:
        return x
    return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)


@torch.no_grad()
def channel_statistics(model: nn.Module, sites: list[RepairSite], inputs, batch_size: int = 512) -> dict:
    """{site name: (mean (C,), std (C,))} of every site's output channels over ``inputs`` (eval mode, float64,
    streamed: independent of ``batch_size``)."""
    modules = dict(model.named_modules())
    moments = {s.name: Moments() for s in sites}

    def record(site):
        def hook(_m, _inputs, out):
            moments[site.name].update(out, site.axis)
        return hook

    handles = [modules[s.name].register_forward_hook(record(s)) for s in sites]
    was = model.training
    model.eval()
    try:
        for xb in iterate_inputs(inputs, batch_size):
            model(_to_model(model, xb))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {name: m.mean_std() for name, m in moments.items()}


def _fold(module: nn.Module, site: RepairSite, source: torch.Tensor | Moments, target: tuple
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fold the correction of ``site`` into ``module``'s parameters. ``source``: the statistics the rule reads
    (the output for producers and norms, the input for batch norms), as a tensor of one batch or moments.
    Returns the (scale, shift) applied to the output channels (None for batch norms, whose running statistics
    change too)."""
    mean, std = channel_mean_std(source, site.axis) if isinstance(source, torch.Tensor) else source.mean_std()
    t_mean, t_std = target
    if site.rule == "batchnorm":
        gamma = module.weight.detach().to(torch.float64)
        sign = torch.where(gamma < 0, -torch.ones_like(gamma), torch.ones_like(gamma))
        live = std > 0
        new_gamma = torch.where(live, sign * t_std * (std * std + module.eps).sqrt() / torch.where(live, std, 1.0),
                                gamma)
        fold_statistics(module, site, source)
        module.weight.copy_(new_gamma.to(module.weight.dtype))
        module.bias.copy_(t_mean.to(module.bias.dtype))
        return None
    scale, shift = affine_correction(mean, std, t_mean, t_std)
    weight, bias = module.weight, module.bias
    # the channel is axis 0 of a Linear/Conv weight and of a norm's per-channel weight and bias
    view = (-1,) + (1,) * (weight.ndim - 1)
    new_bias = scale * bias.detach().to(torch.float64) + shift
    weight.mul_(scale.to(weight.dtype).view(view))
    bias.copy_(new_bias.to(bias.dtype))
    return scale, shift


def _corrected_output(module: nn.Module, site: RepairSite, inputs: tuple, out: torch.Tensor, affine) -> torch.Tensor:
    """The site's output after the correction: ``scale·out + shift`` per channel (what the corrected layer
    computes, to rounding, without running it again), or the batch norm recomputed from its input."""
    if site.rule in _FROM_INPUT:
        return nn.functional.batch_norm(inputs[0], module.running_mean, module.running_var, module.weight,
                                        module.bias, False, 0.0, module.eps)
    scale, shift = affine
    shape = [1] * out.ndim
    shape[site.axis] = -1
    return out * scale.to(out.dtype).view(shape) + shift.to(out.dtype).view(shape)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the site it measures has run."""


@torch.no_grad()
def correct_in_forward_order(model: nn.Module, sites: list[RepairSite], fold, inputs, batch_size: int = 2048
                             ) -> nn.Module:
    """Fold a correction into every site of ``model`` in forward order, each measured on ``inputs`` (eval mode)
    with the earlier sites already corrected. ``fold(module, site, source)`` changes the module and returns
    the (scale, shift) its output got (None where the output is recomputed from the input: batch norms);
    ``source`` is the site's output (its input for batch norms), one batch's tensor or streamed
    :class:`Moments`. One forward pass when the inputs fit one batch of ``batch_size`` (each site's hook
    corrects its output before the next layer sees it), else one streamed pass per site (the forward stops
    after the site). Shared by REPAIR (:func:`repair`) and the batch-norm reset
    (:func:`.interpolation.recompute_batchnorm`). Returns the model."""
    modules = dict(model.named_modules())
    batches = list(iterate_inputs(inputs, batch_size))
    if not batches:
        raise ValueError("the statistics need at least one input batch")
    was = model.training
    model.eval()
    handles = []
    try:
        if len(batches) == 1:
            def correct(site):
                def hook(module, ins, out):
                    affine = fold(module, site, ins[0] if site.rule in _FROM_INPUT else out)
                    return _corrected_output(module, site, ins, out, affine)
                return hook

            handles = [modules[s.name].register_forward_hook(correct(s)) for s in sites]
            model(_to_model(model, batches[0]))
            return model
        for site in sites:
            moments = Moments()

            def measure(_m, ins, out, site=site, moments=moments):
                moments.update(ins[0] if site.rule in _FROM_INPUT else out, site.axis)
                raise _StopForward

            handle = modules[site.name].register_forward_hook(measure)
            try:
                for xb in batches:
                    try:
                        model(_to_model(model, xb))
                    except _StopForward:
                        pass
            finally:
                handle.remove()
            fold(modules[site.name], site, moments)
        return model
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def repair(model: nn.Module, sites: list[RepairSite], targets: dict, inputs, batch_size: int = 2048) -> nn.Module:
    """Correct ``model`` in place so that every site's channels have the ``targets`` ({site: (mean, std)}) on
    ``inputs`` (eval mode), in forward order (:func:`correct_in_forward_order`). Returns the model."""
    return correct_in_forward_order(model, sites, lambda m, s, src: _fold(m, s, src, targets[s.name]),
                                    inputs, batch_size)


def batchnorm_sites(model: nn.Module, example_input: torch.Tensor) -> list[RepairSite] | None:
    """Every batch norm that keeps running statistics, as a ``"statistics"`` site, in the order one forward
    pass on ``example_input`` runs them; None when one of them runs more than once in that pass or not at all
    (its statistics then have no single input)."""
    bns = {name: m for name, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    calls: dict[str, int] = {}

    def counter(name):
        def hook(_m, _inputs, _out):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [m.register_forward_hook(counter(n)) for n, m in bns.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_to_model(model, example_input))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if set(calls) != set(bns) or any(c != 1 for c in calls.values()):
        return None
    return [RepairSite(name, "statistics", 1) for name in calls]   # dicts keep the order of the first call


def fold_statistics(module: nn.Module, _site: RepairSite, source: torch.Tensor | Moments) -> None:
    """Set a batch norm's running statistics to the mean and population variance of its input ``source``."""
    mean, std = channel_mean_std(source, 1) if isinstance(source, torch.Tensor) else source.mean_std()
    module.running_mean.copy_(mean.to(module.running_mean.dtype))
    module.running_var.copy_((std * std).to(module.running_var.dtype))
    return None


class PathRepair:
    """REPAIR along one path: the end models' channel statistics, measured once, and the correction of each
    interpolated model towards their interpolation.

    ``model_a``, ``model_b``: the end models as the path's ends are evaluated (batch norm already recomputed
    where asked); ``inputs``: the training inputs of the statistics. ``covers_batchnorm``: every batch norm is
    a corrected site, so REPAIR sets their statistics itself and a batch-norm reset before it is redundant."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, batch_size: int = 2048):
        self.inputs, self.batch_size = inputs, batch_size
        self.sites = repair_sites(model_a, inputs[:2])
        if not self.sites:
            raise ValueError("repair=True, but the model has no channel REPAIR can correct (no Linear/Conv with a "
                             "bias before an activation, no affine norm)")
        self.stats_a = channel_statistics(model_a, self.sites, inputs, batch_size)
        self.stats_b = channel_statistics(model_b, self.sites, inputs, batch_size)
        names = {s.name for s in self.sites}
        self.covers_batchnorm = all(n in names for n, m in model_a.named_modules()
                                    if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def __call__(self, model: nn.Module, alpha: float) -> nn.Module:
        targets = interpolated_targets(self.stats_a, self.stats_b, alpha)
        return repair(model, self.sites, targets, self.inputs, self.batch_size)
