"""Listing activation sites and extracting hidden features from them.

``activation_sites(model, x)`` finds every activation (module or functional) in forward order by tracing
the model with torch.fx (see :mod:`intertwiners.tracing` for the naming scheme). When a model cannot be
traced, activation modules are still found with forward hooks on ``x``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ._util import as_tensor, resolve_device
from .activations import ACTIVATION_MODULES
from .tracing import check_sites, find_sites, trace, truncated_module


def _hook_sites(model: nn.Module, example_input) -> list[str]:
    names = {m: n for n, m in model.named_modules() if isinstance(m, ACTIVATION_MODULES)}
    order: list[str] = []
    counts: dict[str, int] = {}

    def hook(mod, _inp, _out):
        base = names[mod]
        k = counts.get(base, 0)
        counts[base] = k + 1
        order.append(base if k == 0 else f"{base}#{k}")

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad(), eval_mode(model):
            x = as_tensor(example_input, device=_param_device(model))
            model(x.to(_param_dtype(model)) if x.is_floating_point() else x)  # token ids stay integers
    finally:
        for h in handles:
            h.remove()
    return order


def activation_sites(model: nn.Module, example_input=None) -> list[str]:
    """Names of every activation site of ``model``, in forward order.

    ``example_input`` is only needed when the model cannot be traced by torch.fx (hooks then find the
    activation *modules*; functional activations cannot be found that way and a warning says so).
    """
    try:
        return [s.name for s in find_sites(trace(model))]
    except ValueError as err:
        if example_input is None:
            raise
        warnings.warn(f"{err}; listing activation modules with forward hooks instead (functional "
                      "activations are not visible this way)", stacklevel=2)
        return _hook_sites(model, example_input)


@contextmanager
def eval_mode(model: nn.Module, train: bool = False):
    """Temporarily put ``model`` in eval (or train) mode, restoring every submodule's flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


def _param_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _param_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def iterate_inputs(inputs_or_loader, batch_size: int = 256) -> Iterable[torch.Tensor]:
    """Yield input batches from a tensor/array (N, ...), a dataset with ``.x``, or an iterable of batches
    (tensors or ``(x, y, ...)`` tuples, as a DataLoader gives)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    source = getattr(inputs_or_loader, "x", inputs_or_loader)
    if isinstance(source, torch.Tensor | np.ndarray):
        x = as_tensor(source, name="inputs")
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"inputs are empty (shape {tuple(x.shape)}); give (N, ...) with N >= 1")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]
        return
    if source is None or isinstance(source, str | bytes | dict):
        raise ValueError(f"inputs must be a tensor/array (N, ...), a dataset with .x, or an iterable of batches; "
                         f"got {type(source).__name__}")
    try:
        batches = iter(source)
    except TypeError:
        raise ValueError(f"inputs must be a tensor/array (N, ...), a dataset with .x, or an iterable of batches; "
                         f"got {type(source).__name__}") from None
    for k, batch in enumerate(batches):
        if isinstance(batch, list | tuple):
            if not batch:
                raise ValueError(f"input batch {k} is an empty tuple")
            batch = batch[0]
        t = as_tensor(batch, name="input batch")
        if t.ndim == 0 or len(t) == 0:
            raise ValueError(f"input batch {k} has no rows (shape {tuple(t.shape)})")
        yield t


class SiteExtractor:
    """Computes a model's features at ``sites`` for one input batch at a time.

    Uses a truncated torch.fx copy of the model (nothing after the last site is computed; outputs are
    cloned so later in-place operations cannot change them); models that fx cannot trace fall back to
    forward hooks on activation modules, which needs ``example`` (an input batch) to list them.
    ``sites=None`` takes every site. The extractor shares the model's parameters: move the model to move it.
    """

    def __init__(self, model: nn.Module, sites: list[str] | str | None = None, example=None):
        self.model = model
        try:
            gm = trace(model)
        except ValueError:
            if example is None:
                raise
            names = _hook_sites(model, example)
            self.sites = check_sites(sites if sites is not None else names, names)
            self.runner: nn.Module = _HookRunner(model, self.sites)
        else:
            available = {s.name: s for s in find_sites(gm)}
            self.sites = check_sites(sites if sites is not None else list(available), list(available))
            self.runner = truncated_module(gm, [available[s].node for s in self.sites])

    def __call__(self, xb: torch.Tensor, train_mode: bool = False) -> tuple[torch.Tensor, ...]:
        """Features ``(site_1, site_2, ...)`` for the batch ``xb``, on the model's device, without autograd."""
        xb = xb.to(device=_param_device(self.model),
                   dtype=_param_dtype(self.model) if xb.is_floating_point() else xb.dtype)  # token ids stay integers
        with torch.no_grad(), eval_mode(self.model, train_mode), eval_mode(self.runner, train_mode):
            return tuple(self.runner(xb))


def extract_features(model: nn.Module, sites: list[str] | str, inputs_or_loader, *, device: str = "auto",
                     batch_size: int = 256, train_mode: bool = False, dtype: torch.dtype | None = None,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Hidden features at ``sites`` for all inputs: ``{site: Tensor (N, *feature_shape)}`` on the CPU.

    Runs in eval mode by default (batch norm uses its running statistics) and without autograd; only the
    requested sites are kept and nothing after the last of them is computed. ``dtype`` defaults to the
    model's parameter dtype. The model is moved to ``device`` for the extraction and back afterwards.
    """
    dev = resolve_device(device)
    batches = iterate_inputs(inputs_or_loader, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError("no input batches were given")
    extractor = SiteExtractor(model, sites, example=first[:2])
    names = extractor.sites
    original_device, original_dtype = _param_device(model), _param_dtype(model)
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in names}
    batches = itertools.chain([first], batches)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="features", unit="batch")
    try:
        model.to(device=dev, dtype=dtype or original_dtype)
        for k, xb in enumerate(batches):
            if xb.is_floating_point() and not bool(torch.isfinite(xb).all()):
                raise ValueError(f"input batch {k} holds NaN or infinite values")
            try:
                outputs = extractor(xb, train_mode)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError, IndexError) as err:
                raise ValueError(f"the model cannot run on input batch {k} of shape {tuple(xb.shape)}: "
                                 f"{str(err).splitlines()[0]}") from err
            for s, o in zip(names, outputs):
                if o.is_floating_point() and not bool(torch.isfinite(o.sum())) and not bool(torch.isfinite(o).all()):
                    raise ValueError(f"features at {s!r} hold NaN or infinite values (batch {k}); check the model's "
                                     "weights")
                chunks[s].append(o.detach().cpu())
    finally:
        model.to(device=original_device, dtype=original_dtype)
    return {s: torch.cat(c) for s, c in chunks.items()}


class _HookRunner(nn.Module):
    """Runs a model that fx cannot trace and returns the outputs of activation modules via hooks."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, x):
        modules = {n: m for n, m in self.model.named_modules() if isinstance(m, ACTIVATION_MODULES)}
        captured: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        handles = []
        for base, mod in modules.items():
            def hook(_m, _i, out, base=base):
                k = counts.get(base, 0)
                counts[base] = k + 1
                name = base if k == 0 else f"{base}#{k}"
                if name in self.names:
                    captured[name] = out.clone()
            handles.append(mod.register_forward_hook(hook))
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        return tuple(captured[n] for n in self.names)
