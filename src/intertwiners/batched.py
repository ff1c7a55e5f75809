"""Several models of one architecture as one batched model, trained together as each would train alone.

K models with the same structure are *stacked* (:func:`stack`): each convolution becomes one grouped
convolution over the K models' channels, each batch norm one batch norm over K·C channels (its statistics
are per channel, hence per model, in training and in eval mode alike), each linear layer a batched matrix
product, each layer norm a layer norm per model. The stacked model maps a channel-stacked input
(N, K·C, H, W) -- model k reads channels k·C .. (k+1)·C - 1 -- to (N, K·classes), model k's logits in
block k. Every tensor of the stacked model holds the K models' tensors *member-major* under the same
state-dict key as in each model: reshaped to (K, *shape of one model's tensor), its k-th slice is model k's
(:meth:`Stack.member_state`). Tensors that are the same for all models (a batch norm's step counter) are
kept once.

One rule per module type (:data:`STACK_RULES`); containers (``nn.Sequential``, a ResNet block, ...) are
stacked child by child and keep their own ``forward``, which must only pass channel-stacked tensors between
their children (true of every model in :mod:`intertwiners.models` and
:mod:`intertwiners.dissection.fig3_models`). A module type without a rule raises ValueError.

:func:`fit_many` trains K models together with the loop of :func:`intertwiners.training.fit`: the loss is
the sum of the K models' mean cross-entropies, so each model's gradient is its own; Adam and weight decay act
element by element, so each model's update is the one it would get alone. Each model draws its minibatch
order and augmentation from its own generator (models given the same seed share one stream: the same
batches, drawn once), stops on its own :class:`~intertwiners.training.Convergence` and keeps its own best
epoch; a model that has stopped leaves the stack, so the others train without it. What differs from
training alone is only floating-point rounding (a grouped convolution sums in another order).

Why not ``torch.func.vmap``: on 2 CPU cores the grouped modules were as fast or faster (docs/performance.md,
``benchmarks/bench_batched_training.py``), keep batch-norm running statistics without functional
rewrites and need no per-call transforms.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._util import channels_last_trains_safely, resolve_device
from .activations import ACTIVATION_MODULES
from .data import ArrayDataset, augment

# ----------------------------------------------------------------------------------------------------------
# stacked modules


class StackedLinear(nn.Module):
    """K linear layers: (N, K·in) -> (N, K·out). ``weight`` (K, out, in), ``bias`` (K, out)."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = x.reshape(n, self.members, self.in_features).transpose(0, 1)          # (K, N, in)
        out = torch.bmm(h, self.weight.transpose(1, 2))                           # (K, N, out)
        if self.bias is not None:
            out = out + self.bias[:, None, :]
        return out.transpose(0, 1).reshape(n, self.members * self.out_features)

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


class StackedLayerNorm(nn.Module):
    """K layer norms over the last axis: (..., K·C) normalised per block of C. ``weight``/``bias`` (K, C)."""

    def __init__(self, members: int, channels: int, eps: float, affine: bool):
        super().__init__()
        self.members, self.channels, self.eps = members, channels, eps
        self.weight = nn.Parameter(torch.ones(members, channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(members, channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.reshape(*x.shape[:-1], self.members, self.channels), (self.channels,), eps=self.eps)
        if self.weight is not None:
            h = h * self.weight + self.bias
        return h.reshape(x.shape)


class PerMember(nn.Module):
    """Different elementwise modules per model (e.g. LeakyReLU slopes): channel block k through module k."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(len(self.parts), dim=1)
        return torch.cat([m(c) for m, c in zip(self.parts, chunks)], dim=1)


class StackedPadShortcut(nn.Module):
    """K option-A shortcuts (:class:`intertwiners.models.PadShortcut`): subsample, zero-pad each block."""

    def __init__(self, members: int, template):
        super().__init__()
        self.members, self.stride = members, template.stride
        self.in_planes, self.pad_before, self.pad_after = template.in_planes, template.pad_before, template.pad_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        n, _, h, w = x.shape
        x = F.pad(x.reshape(n, self.members, self.in_planes, h, w), (0, 0, 0, 0, self.pad_before, self.pad_after))
        return x.reshape(n, -1, h, w)


class StackedChannelTransform(nn.Module):
    """K fixed channel maps (:class:`intertwiners.rotation_penalty.ChannelTransform`); ``matrix`` (K, C, C)."""

    def __init__(self, members: int, channels: int):
        super().__init__()
        self.members, self.channels = members, channels
        self.register_buffer("matrix", torch.zeros(members, channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], self.members, self.channels, *x.shape[2:])
        out = torch.einsum("koc,nkc...->nko...", self.matrix.to(x.dtype), h).reshape(x.shape)
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # keep channels-last: the einsum's output is NCHW, and every later layer would then run in NCHW
            # (a 2x2 max pool there took 10x the time of the channels-last one)
            out = out.contiguous(memory_format=torch.channels_last)
        return out


# ----------------------------------------------------------------------------------------------------------
# one rule per module type: build the stacked module's structure (its values are filled in by `stack`)


def _same(mods: Sequence[nn.Module]) -> bool:
    return all(type(m) is type(mods[0]) and repr(m) == repr(mods[0]) for m in mods)


def _elementwise(mods: Sequence[nn.Module], k: int) -> nn.Module:
    return copy.deepcopy(mods[0]) if _same(mods) else PerMember([copy.deepcopy(m) for m in mods])


def _channelwise(mods: Sequence[nn.Module], k: int) -> nn.Module:
    if not _same(mods):
        raise ValueError(f"cannot stack {type(mods[0]).__name__} modules that differ between models: "
                         f"{sorted({repr(m) for m in mods})}")
    return copy.deepcopy(mods[0])


def _conv(mods: Sequence[nn.Conv2d], k: int) -> nn.Module:
    c = mods[0]
    if c.padding_mode != "zeros":
        raise ValueError(f"stacking a convolution with padding_mode={c.padding_mode!r} is not supported")
    return nn.Conv2d(k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                     groups=k * c.groups, bias=c.bias is not None)


def _batch_norm(mods: Sequence[nn.BatchNorm2d], k: int) -> nn.Module:
    b = mods[0]
    return nn.BatchNorm2d(k * b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats)


def _linear(mods: Sequence[nn.Linear], k: int) -> nn.Module:
    lin = mods[0]
    return StackedLinear(k, lin.in_features, lin.out_features, lin.bias is not None)


def _layer_norm(mods: Sequence[nn.LayerNorm], k: int) -> nn.Module:
    ln = mods[0]
    if len(ln.normalized_shape) != 1:
        raise ValueError(f"stacking a LayerNorm over {ln.normalized_shape} (more than the last axis) is not supported")
    return StackedLayerNorm(k, ln.normalized_shape[0], ln.eps, ln.elementwise_affine)


def _pad_shortcut(mods, k: int) -> nn.Module:
    return StackedPadShortcut(k, mods[0])


def _channel_transform(mods, k: int) -> nn.Module:
    return StackedChannelTransform(k, mods[0].matrix.shape[0])


def _container(mods: Sequence[nn.Module], k: int, channel_params: tuple[str, ...] = ()) -> nn.Module:
    """A copy of the first container with every child stacked; ``channel_params``: its own parameters,
    per channel along their first axis (e.g. a layer scale), stacked to (K·C, ...)."""
    first = mods[0]
    own = [n for n, _ in first.named_parameters(recurse=False)] + [n for n, _ in first.named_buffers(recurse=False)]
    unknown = sorted(set(own) - set(channel_params))
    if unknown:
        raise ValueError(f"cannot stack {type(first).__name__}: it holds tensors {unknown} of its own and has no "
                         "stacking rule (intertwiners.batched.STACK_RULES)")
    names = [n for n, _ in first.named_children()]
    for m in mods[1:]:
        if type(m) is not type(first) or [n for n, _ in m.named_children()] != names:
            raise ValueError(f"cannot stack models of different structure ({type(first).__name__} vs "
                             f"{type(m).__name__})")
    out = copy.copy(first)
    out._modules = {name: stack_module([getattr(m, name) for m in mods], k) for name in names}
    out._parameters = {n: nn.Parameter(torch.empty(k * p.shape[0], *p.shape[1:]), p.requires_grad)
                       for n, p in first.named_parameters(recurse=False)}
    out._buffers = {n: torch.empty(k * b.shape[0], *b.shape[1:]) for n, b in first.named_buffers(recurse=False)}
    return out


def _convnext_block(mods, k: int) -> nn.Module:
    return _container(mods, k, channel_params=("gamma",))


def _rules() -> dict[type, object]:
    from .dissection.fig3_models import ConvNeXtBlock
    from .models import PadShortcut
    from .rotation_penalty import ChannelTransform

    rules: dict[type, object] = {
        nn.Conv2d: _conv, nn.BatchNorm2d: _batch_norm, nn.Linear: _linear, nn.LayerNorm: _layer_norm,
        PadShortcut: _pad_shortcut, ChannelTransform: _channel_transform, ConvNeXtBlock: _convnext_block,
        nn.Identity: _elementwise,
    }
    for cls in ACTIVATION_MODULES:
        if cls is not nn.PReLU:     # PReLU has a learned slope: no rule
            rules[cls] = _elementwise
    for cls in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten):
        rules[cls] = _channelwise
    return rules


STACK_RULES: dict[type, object] = {}


def stack_module(mods: Sequence[nn.Module], k: int) -> nn.Module:
    """The stacked structure of K modules of one type (values not filled in; see :func:`stack`)."""
    if not STACK_RULES:
        STACK_RULES.update(_rules())
    kind = type(mods[0])
    if any(type(m) is not kind for m in mods):
        raise ValueError(f"cannot stack models of different structure: {sorted({type(m).__name__ for m in mods})}")
    if kind is nn.Flatten and (mods[0].start_dim != 1 or mods[0].end_dim != -1):
        raise ValueError("stacking nn.Flatten needs start_dim=1, end_dim=-1")
    rule = STACK_RULES.get(kind)
    if rule is not None:
        return rule(mods, k)
    if next(mods[0].children(), None) is None and next(mods[0].parameters(), None) is None:
        raise ValueError(f"cannot stack {kind.__name__}: no stacking rule for it (intertwiners.batched.STACK_RULES)")
    return _container(mods, k)


class Stack(nn.Module):
    """K models as one (see the module docstring): ``forward`` (N, K·C, ...) -> (N, K·out)."""

    def __init__(self, body: nn.Module, members: int, shapes: dict[str, torch.Size]):
        super().__init__()
        self.body, self.members, self.shapes = body, members, dict(shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Model ``k``'s state dict (views into the stacked tensors)."""
        return {key: member_slice(t, self.shapes[key], self.members, k) for key, t in self.body.state_dict().items()}


def member_slice(t: torch.Tensor, shape: torch.Size, members: int, k: int) -> torch.Tensor:
    """Model ``k``'s block of a stacked tensor ``t`` (one model's tensor has ``shape``)."""
    return t if t.numel() == _numel(shape) and members > 1 else t.reshape(members, *shape)[k]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@torch.no_grad()
def _momentum_of(model: nn.Module, key: str):
    """The momentum of the batch norm owning state ``key`` (``None``: a cumulative average)."""
    return getattr(model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model, "momentum", None)


def stack(models: Sequence[nn.Module]) -> Stack:
    """One :class:`Stack` computing all ``models`` (same structure) at once, with their current values.

    Raises ValueError for models of different structure, a module type without a rule, or tensors that
    should be shared (e.g. a batch norm's step counter) but differ.
    """
    models = list(models)
    if not models:
        raise ValueError("stack needs at least one model")
    k = len(models)
    body = stack_module(models, k)
    states = [m.state_dict() for m in models]
    target = body.state_dict()
    if set(target) != set(states[0]):
        raise ValueError(f"stacking changed the state-dict keys: {sorted(set(target) ^ set(states[0]))}")
    shapes = {key: states[0][key].shape for key in target}
    for key, t in target.items():
        parts = [s[key] for s in states]
        if any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"cannot stack: {key!r} has shapes {sorted({tuple(p.shape) for p in parts})}")
        if t.numel() == k * parts[0].numel():
            t.copy_(torch.stack(parts).reshape(t.shape))
        elif t.numel() == parts[0].numel():
            # a batch norm's step counter only matters with momentum=None (a cumulative average); models that
            # stopped at different epochs differ in it, and evaluating them together never reads it
            counter = key.endswith("num_batches_tracked") and _momentum_of(models[0], key) is not None
            if not counter and any(not torch.equal(p, parts[0]) for p in parts):
                raise ValueError(f"cannot stack: {key!r} differs between the models but is shared when stacked")
            t.copy_(parts[0].reshape(t.shape))
        else:  # pragma: no cover - a rule that builds the wrong shape
            raise ValueError(f"stacking rule gave {key!r} shape {tuple(t.shape)} for {k} x {tuple(parts[0].shape)}")
    out = Stack(body, k, shapes)
    out.train(models[0].training)
    return out


def channel_stack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """K inputs (N, C, ...) as one channel-stacked input (N, K·C, ...)."""
    return torch.cat(list(parts), dim=1)


# ----------------------------------------------------------------------------------------------------------
# evaluation and training


@torch.no_grad()
def _scores(net: Stack, x: torch.Tensor, y: torch.Tensor, members: int, dev, batch_size: int = 512,
            prefix: nn.Module | None = None, channels_last: bool = False) -> list[tuple[float, float]]:
    """Per model: (accuracy %, mean cross-entropy) of the stacked ``net`` on the shared inputs ``x``."""
    correct = torch.zeros(members)
    loss = torch.zeros(members, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev)
        if prefix is not None:
            xb = prefix(xb)
        xb = xb.repeat(1, members, *([1] * (xb.ndim - 2)))
        if channels_last and xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        logits = net(xb).reshape(len(xb), members, -1)
        yb = y[i:i + batch_size].to(dev)
        correct += (logits.argmax(2) == yb[:, None]).sum(0).cpu().float()
        loss += F.cross_entropy(logits.permute(0, 2, 1), yb[:, None].expand(-1, members), reduction="none"
                                ).sum(0).cpu().double()
    return [(100.0 * float(c) / len(x), float(s) / len(x)) for c, s in zip(correct, loss)]


def evaluate_many(models: Sequence[nn.Module], data: ArrayDataset, device: str | torch.device = "auto",
                  batch_size: int = 512) -> list[tuple[float, float]]:
    """``[(accuracy %, mean cross-entropy)]`` of each model on ``data`` (eval mode), computed stacked."""
    dev = resolve_device(device)
    if len(data) == 0:
        raise ValueError(f"evaluating on an empty dataset ({getattr(data, 'name', 'data')} has no samples)")
    net = stack(models).to(dev).eval()
    return _scores(net, data.x, data.y, len(models), dev, batch_size)


def _restack(net: Stack, opt: torch.optim.Adam, templates: list[nn.Module], keep: list[int]):
    """The stack of the models ``keep`` (indices into the current stack) with their current values, and an
    Adam whose state is theirs."""
    for j, model in zip(keep, templates):
        model.load_state_dict(net.member_state(j))
    new = stack(templates).to(next(net.parameters()).device).train()
    old_params = dict(net.body.named_parameters())
    new_opt = torch.optim.Adam(new.body.parameters(), lr=opt.param_groups[0]["lr"],
                               weight_decay=opt.param_groups[0]["weight_decay"])
    index = torch.as_tensor(keep)
    for name, p in new.body.named_parameters():
        state = opt.state.get(old_params[name])
        if not state:
            continue
        shape = net.shapes[name]
        new_opt.state[p] = {key: (v.clone() if v.ndim == 0 or v.numel() == _numel(shape) and net.members > 1
                                  else v.reshape(net.members, *shape)[index.to(v.device)].reshape(p.shape).clone())
                            for key, v in state.items()}
    return new, new_opt


def fit_many(models: Sequence[nn.Module], train: ArrayDataset, val: ArrayDataset, recipe, seeds: Sequence[int],
             device: str | torch.device = "auto", progress: bool = True, desc: str = "train", *,
             prefix: nn.Module | None = None, channels_last: bool = True) -> list[dict]:
    """Train ``models`` (one architecture) together, each as :func:`intertwiners.training.fit` would train it
    with its seed; each model ends with the weights of its best validation epoch (in place).

    ``seeds[k]``: model k's minibatch order and augmentation (equal seeds: one shared stream). ``prefix``: a
    frozen module every model starts with (e.g. the layers before a rotation penalty's transform), run once
    per stream and batch without autograd; the models then map its output to logits. ``channels_last``:
    4-D activations in channels-last memory format (faster grouped convolutions on CPUs), unless
    :func:`~intertwiners._util.channels_last_trains_safely` says the stacked model cannot train that way.
    Returns one dict per model, with the keys of :func:`~intertwiners.training.fit`.
    """
    from .training import Convergence, check_fit_inputs, diverged

    models = list(models)
    seeds = [int(s) for s in seeds]
    if not models or len(seeds) != len(models):
        raise ValueError(f"fit_many needs one seed per model, got {len(models)} models and {len(seeds)} seeds")
    check_fit_inputs(train, val, recipe, "fit_many")
    dev = resolve_device(device)
    if prefix is not None:
        prefix = prefix.to(dev).eval()
        prefix.requires_grad_(False)
    streams = list(dict.fromkeys(seeds))
    gens = [torch.Generator().manual_seed(s) for s in streams]
    stream_of = [streams.index(s) for s in seeds]
    stops = [Convergence(recipe.epochs, recipe.patience) for _ in models]
    best = [copy.deepcopy(m.state_dict()) for m in models]
    active = list(range(len(models)))
    templates = [copy.deepcopy(m) for m in models]
    net = stack(models).to(dev).train()
    channels_last = channels_last and channels_last_trains_safely(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.body.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = (len(train) + recipe.batch_size - 1) // recipe.batch_size
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    start = time.perf_counter()
    epoch = 0
    while active:
        epoch += 1
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(epoch)
        net.train()
        live = sorted({stream_of[k] for k in active})
        perms = {s: torch.randperm(len(train), generator=gens[s]) for s in live}
        members = len(active)
        for i in range(0, len(train), recipe.batch_size):
            xs, ys = {}, {}
            for s in live:
                idx = perms[s][i:i + recipe.batch_size]
                xb = augment(train.x[idx], gens[s], train.flip, train.translate).to(dev)
                if prefix is not None:
                    with torch.no_grad():
                        xb = prefix(xb)
                xs[s], ys[s] = xb, train.y[idx].to(dev)
            xb = channel_stack([xs[stream_of[k]] for k in active])
            if channels_last and xb.ndim == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = torch.stack([ys[stream_of[k]] for k in active], dim=1)                # (B, K)
            logits = net(xb).reshape(len(yb), members, -1)
            losses = F.cross_entropy(logits.permute(0, 2, 1), yb, reduction="none").mean(0)   # (K,)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            if bar is not None:
                bar.update(1)
        last = losses.detach().cpu()
        for j, k in enumerate(active):
            if not bool(torch.isfinite(last[j])):
                if bar is not None:
                    bar.close()
                raise diverged(epoch, float(last[j]), f"training of model {k} (seed {seeds[k]})")
        scores = _scores(net.eval(), val.x, val.y, members, dev, prefix=prefix, channels_last=channels_last)
        for j, k in enumerate(active):
            if stops[k].update(epoch, *scores[j]):
                best[k] = {key: t.detach().clone() for key, t in net.member_state(j).items()}
        if bar is not None:
            bar.set_postfix(epoch=epoch, active=members)
        keep = [j for j, k in enumerate(active) if not stops[k].done]
        if len(keep) < members and keep:
            net, opt = _restack(net, opt, [templates[active[j]] for j in keep], keep)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
        active = [active[j] for j in keep]
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    out = []
    for model, stop, state in zip(models, stops, best):
        model.load_state_dict(state)
        model.to(dev).eval()
        out.append({"val_accuracy": stop.best_accuracy, "val_loss": stop.best_loss, "best_epoch": stop.best_epoch,
                    "epochs": stop.epoch, "max_epochs": recipe.epochs, "wall_time_s": wall})
    return out
