"""Stitching two frozen models at an activation site (paper §4) and the stitching penalty (eq. 4.3).

The stitched network is ``back_after(site) ∘ layer ∘ front_upto(site)``: front's layers up to and including
the activation at ``site``, a stitching layer over channels, then back's layers after ``site``. Both models
are split with torch.fx (:func:`intertwiners.tracing.split_at`). Only sites that every later layer reaches
through the site itself can be split: for a ResNet these are the stem activation (``relu``) and the
activations after each residual add (``layerS.B.relu2``); a site inside a residual block (``relu1``) raises
a ValueError, because back's skip connection would need back's own features from before the site.

Frozen models: ``stitch`` works on deep copies of ``front`` and ``back`` whose parameters have
``requires_grad=False`` and which stay in eval mode throughout (batch-norm running statistics never move);
the caller's models are not touched. Front's features are computed without autograd, once, and cached
(when they fit in ``cache_bytes``), so a stitching step costs back's forward and its input-gradient pass.

Training: the layer is optimised for the task loss (cross-entropy of the stitched network) on the training
data minus a validation split (``train_data.split(val_fraction, seed=0)``, the split the zoo was trained
with); the layer of the best validation epoch (epoch 0 = the initial layer included) is kept. The test set
is used only to report accuracies.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .._util import as_tensor, resolve_device
from ..data import ArrayDataset, augment
from ..tracing import site_map, split_at, trace
from .layers import GReLUStitch, PermutationStitch, StitchingLayer, kind_label, make_layer, parse_kind
from .matching import ChannelStats, closed_form_match


@dataclass(frozen=True)
class StitchSettings:
    """Optimisation settings. ``default``: fast and sensible on digits; ``authors``: the paper's code."""

    epochs: int = 5
    batch_size: int = 32
    optimizer: str = "adam"          # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.0            # sgd only
    weight_decay: float = 0.0
    alpha: float = 0.1               # weight of -alpha * ||P||_F (grelu, permutation)
    schedule: str = "joint"          # joint | permutation_first (grelu: P alone for the first half of the epochs)
    init: str = "match"              # match | identity | barycenter (grelu, permutation)
    smoothing: float = 0.0           # grelu/permutation match init: mix of the barycentre J/C into P
    relaxation: str = "straight_through"   # grelu/permutation: straight_through | soft (see layers)
    sinkhorn_iterations: int = 100   # at most; stops when rows sum to 1 within 1e-5


SETTINGS = {
    "default": StitchSettings(),
    # The authors' code (REFERENCE.md): SGD lr 1e-3, weight decay 1e-4, 20 epochs, alpha 0.1, for G_ReLU 10
    # epochs with the permutation only, then 10 with the scalings. Their initialisation is not recorded;
    # ``init`` stays "match" unless given.
    "authors": StitchSettings(epochs=20, optimizer="sgd", lr=1e-3, weight_decay=1e-4, alpha=0.1,
                              schedule="permutation_first", relaxation="soft"),
}
INITS = ("match", "identity", "barycenter")
SCHEDULES = ("joint", "permutation_first")


@dataclass
class StitchResult:
    """Outcome of :func:`stitch`. Accuracies and the penalty are percentages / accuracy points (0-100)."""

    accuracy: float                  # stitched network on the test set
    front_accuracy: float            # front model on the test set
    back_accuracy: float             # back model on the test set
    penalty: float                   # (front + back) / 2 - accuracy, eq. 4.3
    layer: StitchingLayer            # the trained layer (eval mode, on the CPU)
    matrix: torch.Tensor             # (C_out, C_in) applied over channels at evaluation (low_rank: U V^T)
    bias: torch.Tensor | None
    site: str
    kind: str                        # label, e.g. "grelu" or "low_rank:4"
    rank: int | None
    val_accuracy: float              # best validation accuracy (the epoch that was kept)
    init_val_accuracy: float         # validation accuracy of the initial layer
    best_epoch: int                  # 0 = the initial layer was best
    epochs: int                      # epochs run (the most: settings["epochs"]; fewer when it converged)
    seconds: float
    seed: int
    settings: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # per epoch: {"epoch", "loss", "val_accuracy"[, "scale_change"]}
    model: nn.Module | None = None   # the stitched network (frozen copies of front and back), on the CPU

    def as_row(self) -> dict:
        """A plain dict of numbers and strings (no tensors) for tables and CSV files."""
        return {"site": self.site, "kind": self.kind, "rank": self.rank, "accuracy": self.accuracy,
                "front_accuracy": self.front_accuracy, "back_accuracy": self.back_accuracy,
                "penalty": self.penalty, "val_accuracy": self.val_accuracy,
                "init_val_accuracy": self.init_val_accuracy, "best_epoch": self.best_epoch,
                "epochs": self.epochs, "seconds": self.seconds, "seed": self.seed}


def stitching_penalty(front_accuracy: float, back_accuracy: float, stitched_accuracy: float) -> float:
    """Eq. 4.3: (Acc f + Acc f~) / 2 - Acc S(f, f~, l, phi), in accuracy points."""
    for name, v in (("front", front_accuracy), ("back", back_accuracy), ("stitched", stitched_accuracy)):
        if not (isinstance(v, int | float) and math.isfinite(v) and 0 <= v <= 100):
            raise ValueError(f"{name} accuracy must be a percentage in [0, 100], got {v!r}")
    return (front_accuracy + back_accuracy) / 2 - stitched_accuracy


class StitchedModel(nn.Module):
    """``back(layer(front(x)))`` with ``front`` and ``back`` frozen: always in eval mode, front without autograd."""

    def __init__(self, front: nn.Module, layer: StitchingLayer, back: nn.Module):
        super().__init__()
        self.front, self.layer, self.back = front, layer, back
        self.train(False)

    def train(self, mode: bool = True):
        self.training = mode
        self.layer.train(mode)
        self.front.eval()
        self.back.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.front(x)
        return self.back(self.layer(h))


def _residual_blocked(gm, node) -> str | None:
    """Name of a later node that uses a value from before ``node`` (so the graph cannot be split there)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if order[n] > order[node]:
            for a in n.all_input_nodes:
                if order[a] < order[node] and a.op != "get_attr":
                    return n.name
    return None


def stitchable_sites(model: nn.Module) -> list[str]:
    """Activation sites of ``model`` (forward order) where it can be split into front and back.

    Excludes sites bypassed by a residual connection (inside a ResNet block)."""
    gm = trace(model)
    return [name for name, s in site_map(gm).items() if _residual_blocked(gm, s.node) is None]


def split_model(model: nn.Module, site: str) -> tuple[nn.Module, nn.Module]:
    """(front, back) of ``model`` at ``site``: front(x) is the activation at ``site``, back maps it to the output.

    The parts share parameters with ``model``. Raises ValueError for an unknown site or a site inside a
    residual block (listing the stitchable sites).
    """
    gm = trace(model)
    sites = site_map(gm)
    if site not in sites:
        raise ValueError(f"unknown activation site {site!r}; this model has: {list(sites)}")
    blocker = _residual_blocked(gm, sites[site].node)
    if blocker is not None:
        ok = [n for n, s in sites.items() if _residual_blocked(gm, s.node) is None]
        raise ValueError(f"cannot stitch at {site!r}: a residual connection bypasses it ({blocker} also uses a "
                         f"value from before the site), so back's later layers would need back's own earlier "
                         f"features. Stitchable sites of this model: {ok}")
    return split_at(gm, sites[site].node)


def fast_back(back: nn.Module, example: torch.Tensor) -> tuple[nn.Module, bool]:
    """A copy of the frozen ``back`` for training the layer: eval-mode batch norms folded into the preceding
    convolutions (torch.fx's ``fuse``) and, for (N, C, H, W) features, channels-last memory format.

    Returns ``(module, channels_last)``. The result agrees with ``back`` up to float rounding (checked on
    ``example``; on disagreement or any failure the original ``back`` is returned). Used only for the
    training steps; validation and test accuracies always use the original ``back``.
    """
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(back.eval())
        fused.requires_grad_(False)
        channels_last = example.ndim == 4
        if channels_last:
            fused = fused.to(memory_format=torch.channels_last)
            example_in = example.contiguous(memory_format=torch.channels_last)
        else:
            example_in = example
        with torch.no_grad():
            ref, out = back(example), fused(example_in)
        scale = float(ref.abs().max()) + 1e-6
        if out.shape != ref.shape or not float((out - ref).abs().max()) <= 1e-3 * scale:
            return back, False
        return fused.eval(), channels_last
    except Exception:  # an unfusable graph trains with the original back
        return back, False


def as_dataset(data, name: str) -> ArrayDataset:
    """An ArrayDataset from an ArrayDataset or an ``(x, y)`` pair of arrays/tensors (x (N, ...), y (N,))."""
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, tuple | list) and len(data) == 2:
        x = as_tensor(data[0], dtype=torch.float32, name=f"{name} inputs")
        y = as_tensor(data[1], name=f"{name} labels").long()
        if x.ndim == 2:
            x = x[:, :, None, None]
        if x.ndim != 4:
            raise ValueError(f"{name} inputs must be (N, C, H, W) or (N, d), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} inputs contain NaN or Inf")
        if len(y) == 0 or y.min() < 0:
            raise ValueError(f"{name} labels must be nonnegative class indices")
        return ArrayDataset(x, y, int(y.max()) + 1, name)
    raise ValueError(f"{name} must be an ArrayDataset or an (x, y) pair, got {type(data).__name__}")


def _frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    m = copy.deepcopy(model).to(device)
    m.requires_grad_(False)
    return m.eval()


@torch.no_grad()
def _run_batches(fn, x: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def _scores(fn, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy %, mean cross-entropy) of ``fn`` on (x, y), in batches, no autograd."""
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = fn(x[i:i + batch_size].to(device))
        yb = y[i:i + batch_size].to(device)
        correct += int((out.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
    return 100.0 * correct / len(x), loss / len(x)


@torch.no_grad()
def evaluate(fn, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 512) -> float:
    """Top-1 accuracy (percent) of ``fn`` (a callable on input batches) on (x, y), in batches, no autograd."""
    correct = 0
    for i in range(0, len(x), batch_size):
        out = fn(x[i:i + batch_size].to(device))
        correct += (out.argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


def _resolve_settings(settings, overrides: dict) -> StitchSettings:
    if isinstance(settings, str):
        if settings not in SETTINGS:
            raise ValueError(f"unknown stitching settings {settings!r}; known: {sorted(SETTINGS)}")
        settings = SETTINGS[settings]
    elif not isinstance(settings, StitchSettings):
        raise ValueError("settings must be a name in SETTINGS or a StitchSettings")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    s = replace(settings, **chosen)
    if s.epochs < 0 or s.batch_size < 1 or s.lr <= 0 or s.weight_decay < 0 or s.alpha < 0:
        raise ValueError(f"invalid stitching settings: {s}")
    if s.optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {s.optimizer!r}")
    if s.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {s.schedule!r}")
    if s.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {s.init!r}")
    if s.relaxation not in ("straight_through", "soft"):
        raise ValueError(f"relaxation must be 'straight_through' or 'soft', got {s.relaxation!r}")
    if not 0 <= s.smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {s.smoothing}")
    return s


def _initialise(layer: StitchingLayer, kind: str, rank, s: StitchSettings, stats_fn) -> None:
    if kind == "identity":
        return
    if s.init == "barycenter":
        if not isinstance(layer, PermutationStitch):
            raise ValueError(f"init='barycenter' applies to grelu and permutation stitching, not {kind!r}")
        layer.set_barycenter()
    elif s.init == "match":
        m, b = closed_form_match(kind, stats_fn(), rank)
        if isinstance(layer, PermutationStitch):
            layer.set_from(m, None, smoothing=s.smoothing)
        else:
            layer.set_from(m, b)
    # init == "identity": the layers' constructors already start at the identity
    layer.project_()


def stitch(front: nn.Module, back: nn.Module, site: str, kind: str, train_data, test_data,
           epochs: int | None = None, rank: int | None = None, seed: int = 0, *,
           settings: str | StitchSettings = "default", batch_size: int | None = None, optimizer: str | None = None,
           lr: float | None = None, weight_decay: float | None = None, momentum: float | None = None,
           alpha: float | None = None, schedule: str | None = None, init: str | None = None,
           smoothing: float | None = None, relaxation: str | None = None, val_fraction: float = 0.1,
           val_seed: int = 0, augment_data: bool = False, patience: int | None = None,
           device: str | torch.device = "auto", cache_bytes: int = 1 << 30, eval_batch_size: int = 512,
           front_accuracy: float | None = None, back_accuracy: float | None = None,
           keep_model: bool = True, fast: bool = True, progress: bool = False) -> StitchResult:
    """Stitch ``front`` (up to and including the activation at ``site``) to ``back`` (after ``site``).

    Args:
        front, back: models with the activation site ``site`` (e.g. two seeds of one architecture); never
            modified (the work is done on frozen copies in eval mode).
        site: a stitchable activation site (:func:`stitchable_sites`), e.g. ``"relu2"``, ``"layer2.1.relu2"``.
        kind: ``full`` | ``low_rank`` (with ``rank``, or ``"low_rank:R"``) | ``grelu`` | ``permutation`` |
            ``orthogonal`` | ``identity``.
        train_data, test_data: ArrayDatasets (or ``(x, y)`` pairs). A validation split of ``val_fraction``
            (seed ``val_seed``) is carved from ``train_data`` for picking the best epoch.
        epochs: the most training epochs (default from ``settings``: 5; ``identity`` trains nothing).
        patience: stop once the validation split has not improved for this many epochs
            (:class:`intertwiners.training.Convergence`; the initial layer counts as epoch 0); ``None``
            (default) runs every epoch.
        seed: seeds the shuffling and any randomness; the result is deterministic on a given machine.
        settings: ``"default"`` (Adam lr 1e-3, 5 epochs, batch 32, joint schedule, init from the
            closed-form match) or ``"authors"`` (SGD lr 1e-3, wd 1e-4, 20 epochs, permutation first);
            the keyword arguments ``batch_size`` ... ``relaxation`` override single fields
            (``relaxation``: grelu/permutation forward with the rounded P and straight-through gradients,
            the default, or ``"soft"``, the doubly-stochastic P itself as the authors did).
        augment_data: apply the dataset's augmentation during training (then front's features cannot be
            cached and are recomputed, still without autograd, every step).
        cache_bytes: front's training and validation features are computed once and kept when they take
            at most this many bytes.
        front_accuracy, back_accuracy: the two models' test accuracies when already known (skips two
            evaluations in sweeps); computed otherwise.
        keep_model: keep the stitched network (frozen copies) in ``result.model``.
        fast: train through :func:`fast_back` (batch norm folded, channels-last); evaluation always uses
            the original back.

    Returns a :class:`StitchResult` with the test accuracies, the penalty (eq. 4.3), the layer, its
    evaluation ``matrix`` and ``bias``. :func:`stitch_many` stitches several kinds at once.
    """
    kind_name, rank = parse_kind(kind, rank)
    return stitch_many(front, back, site, [kind_label(kind_name, rank)], train_data, test_data, epochs, seed,
                       settings=settings, batch_size=batch_size, optimizer=optimizer, lr=lr,
                       weight_decay=weight_decay, momentum=momentum, alpha=alpha, schedule=schedule, init=init,
                       smoothing=smoothing, relaxation=relaxation, val_fraction=val_fraction, val_seed=val_seed,
                       augment_data=augment_data, patience=patience, device=device, cache_bytes=cache_bytes,
                       eval_batch_size=eval_batch_size, front_accuracy=front_accuracy, back_accuracy=back_accuracy,
                       keep_model=keep_model, fast=fast, progress=progress)[0]


@dataclass
class _Run:
    """One kind's training state inside :func:`stitch_many`."""

    kind: str
    rank: int | None
    layer: StitchingLayer
    stop: object                      # training.Convergence
    epochs: int
    best_state: dict
    init_acc: float
    history: list
    opt: torch.optim.Optimizer | None = None
    init_log_scale: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.opt is not None and not self.stop.done


def stitch_many(front: nn.Module, back: nn.Module, site: str, kinds, train_data, test_data,
                epochs: int | None = None, seed: int = 0, *, settings: str | StitchSettings = "default",
                batch_size: int | None = None, optimizer: str | None = None, lr: float | None = None,
                weight_decay: float | None = None, momentum: float | None = None, alpha: float | None = None,
                schedule: str | None = None, init: str | None = None, smoothing: float | None = None,
                relaxation: str | None = None, val_fraction: float = 0.1, val_seed: int = 0,
                augment_data: bool = False, patience: int | None = None, device: str | torch.device = "auto",
                cache_bytes: int = 1 << 30, eval_batch_size: int = 512, front_accuracy: float | None = None,
                back_accuracy: float | None = None, keep_model: bool = True, fast: bool = True,
                progress: bool = False) -> list[StitchResult]:
    """:func:`stitch` for every kind of ``kinds`` (``"low_rank:R"`` for rank R) at one site of one pair, at once.

    What the kinds share is done once: splitting and freezing the models, front's features (training,
    validation and test images), the channel statistics of the closed-form initialisation, and every
    training step's minibatch (all kinds draw the same order from ``seed``, as separate calls with that
    seed would). Each step runs back once on the K layers' outputs stacked along the batch axis; each layer
    gets the gradient of its own loss, its own optimiser, projection and regulariser, keeps its own best
    epoch and stops on its own :class:`~intertwiners.training.Convergence`. Each result is what
    :func:`stitch` returns for that kind, up to floating-point rounding. Arguments as for :func:`stitch`.
    """
    from ..training import Convergence

    start = time.perf_counter()
    parsed = [parse_kind(k) for k in kinds]
    if not parsed:
        raise ValueError("stitch_many needs at least one kind")
    labels = [kind_label(n, r) for n, r in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"stitch_many: kinds repeat: {labels}")
    s = _resolve_settings(settings, dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                                         weight_decay=weight_decay, momentum=momentum, alpha=alpha,
                                         schedule=schedule, init=init, smoothing=smoothing,
                                         relaxation=relaxation))
    Convergence(1, patience)   # validates patience
    if not isinstance(front, nn.Module) or not isinstance(back, nn.Module):
        raise ValueError("front and back must be torch.nn.Module models")
    train_full = as_dataset(train_data, "train_data")
    test = as_dataset(test_data, "test_data")
    train, val = train_full.split(val_fraction, seed=val_seed)
    dev = resolve_device(device)

    front_model, back_model = _frozen_copy(front, dev), _frozen_copy(back, dev)
    front_part, _ = split_model(front_model, site)
    back_head, back_part = split_model(back_model, site)
    front_part.eval()
    back_part.eval()
    back_head.eval()

    with torch.no_grad():
        probe = front_part(train.x[:2].to(dev))
        back_probe = back_head(train.x[:2].to(dev))
    if probe.ndim < 2 or back_probe.ndim < 2 or probe.shape[2:] != back_probe.shape[2:]:
        raise ValueError(f"features at {site!r} do not line up: front gives {tuple(probe.shape[1:])}, "
                         f"back expects {tuple(back_probe.shape[1:])}")
    layers = []
    for name, rank in parsed:
        torch.manual_seed(seed)
        layers.append(make_layer(name, probe.shape[1], back_probe.shape[1], rank=rank, alpha=s.alpha,
                                 sinkhorn_iterations=s.sinkhorn_iterations, relaxation=s.relaxation).to(dev))

    # front's features: cached once (no autograd) when they fit, else recomputed per batch
    feat_bytes = probe[0].numel() * probe.element_size() * (len(train) + len(val))
    cache = not augment_data and feat_bytes <= cache_bytes
    if cache:
        train_h = _run_batches(front_part, train.x, dev, eval_batch_size)
        val_h = _run_batches(front_part, val.x, dev, eval_batch_size)

    stats_cache: list[ChannelStats] = []

    def stats_fn() -> ChannelStats:   # the closed-form initialisations share one pass over the training set
        if not stats_cache:
            stats = ChannelStats()
            for i in range(0, len(train), eval_batch_size):
                xb = train.x[i:i + eval_batch_size].to(dev)
                with torch.no_grad():
                    hx = train_h[i:i + eval_batch_size] if cache else front_part(xb)
                    stats.update(hx, back_head(xb))
            stats_cache.append(stats)
        return stats_cache[0]

    for layer, (name, rank) in zip(layers, parsed):
        _initialise(layer, name, rank, s, stats_fn)

    def val_scores(layer: StitchingLayer) -> tuple[float, float]:
        layer.eval()
        if cache:
            return _scores(lambda h: back_part(layer(h)), val_h, val.y, dev, eval_batch_size)
        return _scores(lambda x: back_part(layer(front_part(x))), val.x, val.y, dev, eval_batch_size)

    train_back, channels_last = fast_back(back_part, probe) if fast else (back_part, False)

    def train_features(h: torch.Tensor) -> torch.Tensor:
        return h.contiguous(memory_format=torch.channels_last) if channels_last else h

    runs = []
    for layer, (name, rank), label in zip(layers, parsed, labels):
        n_epochs = 0 if name == "identity" else s.epochs
        stop = Convergence(n_epochs, patience)
        acc, loss = val_scores(layer)
        stop.update(0, acc, loss)
        run = _Run(label, rank, layer, stop, n_epochs, copy.deepcopy(layer.state_dict()), acc,
                   [{"epoch": 0, "loss": None, "val_accuracy": acc}],
                   init_log_scale=layer.log_scale.detach().clone() if isinstance(layer, GReLUStitch) else None)
        params = list(layer.parameters())
        if params and n_epochs > 0:
            run.opt = (torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay) if s.optimizer == "adam"
                       else torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay))
        runs.append(run)

    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=s.epochs, desc=f"stitch {', '.join(labels)} @ {site}", leave=False)
    epoch = 0
    while any(r.active for r in runs):
        epoch += 1
        active = [r for r in runs if r.active]
        for r in active:
            r.layer.train()
            if isinstance(r.layer, GReLUStitch):
                scales_on = s.schedule == "joint" or epoch > s.epochs // 2
                r.layer.log_scale.requires_grad_(scales_on)
                if not scales_on:
                    r.layer.log_scale.grad = None
        perm = torch.randperm(len(train), generator=gen)
        totals = torch.zeros(len(active))
        count = 0
        for i in range(0, len(train), s.batch_size):
            idx = perm[i:i + s.batch_size]
            if cache:
                h = train_h[idx.to(train_h.device)]
            else:
                xb = train.x[idx]
                if augment_data:
                    xb = augment(xb, gen, train.flip, train.translate)
                with torch.no_grad():
                    h = front_part(xb.to(dev))
            h = train_features(h)
            outs = [r.layer(h) for r in active]
            logits = train_back(torch.cat(outs) if len(outs) > 1 else outs[0])
            yb = train.y[idx].to(dev)
            losses = F.cross_entropy(logits.reshape(len(active), len(idx), -1).permute(1, 2, 0),
                                     yb[:, None].expand(-1, len(active)), reduction="none").mean(0)
            objective = losses.sum()
            for r in active:
                reg = r.layer.regularizer()
                if reg is not None:
                    objective = objective + reg
                r.opt.zero_grad(set_to_none=True)
            objective.backward()
            for r in active:
                r.opt.step()
                r.layer.project_()
            totals += losses.detach().cpu() * len(idx)
            count += len(idx)
        for j, r in enumerate(active):
            acc, loss = val_scores(r.layer)
            entry = {"epoch": epoch, "loss": float(totals[j]) / count, "val_accuracy": acc}
            if r.init_log_scale is not None:   # how far the scalings moved (0 while the schedule holds them)
                entry["scale_change"] = float((r.layer.log_scale.detach() - r.init_log_scale).abs().max())
            r.history.append(entry)
            if r.stop.update(epoch, acc, loss):
                r.best_state = copy.deepcopy(r.layer.state_dict())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    if cache:
        test_h = _run_batches(front_part, test.x, dev, eval_batch_size)
    if front_accuracy is None:
        front_accuracy = evaluate(front_model, test.x, test.y, dev, eval_batch_size)
    if back_accuracy is None:
        back_accuracy = evaluate(back_model, test.x, test.y, dev, eval_batch_size)
    results = []
    for r in runs:
        layer = r.layer
        layer.load_state_dict(r.best_state)
        if isinstance(layer, GReLUStitch):
            layer.log_scale.requires_grad_(True)
        model = StitchedModel(front_part, layer, back_part)
        model.eval()
        # test accuracy: the same routine and batches as for the two models
        acc = (evaluate(lambda h, layer=layer: back_part(layer(h)), test_h, test.y, dev, eval_batch_size) if cache
               else evaluate(model, test.x, test.y, dev, eval_batch_size))
        penalty = stitching_penalty(front_accuracy, back_accuracy, acc)
        with torch.no_grad():
            matrix = layer.matrix.detach().cpu().clone()
            bias = None if layer.bias is None else layer.bias.detach().cpu().clone()
        results.append(StitchResult(
            accuracy=acc, front_accuracy=front_accuracy, back_accuracy=back_accuracy, penalty=penalty,
            layer=layer.cpu().eval(), matrix=matrix, bias=bias, site=site, kind=r.kind, rank=r.rank,
            val_accuracy=r.stop.best_accuracy, init_val_accuracy=r.init_acc, best_epoch=r.stop.best_epoch,
            epochs=r.stop.epoch, seconds=time.perf_counter() - start, seed=seed,
            settings={**asdict(s), "epochs": r.epochs, "patience": patience}, history=r.history,
            model=model.cpu() if keep_model else None))
    return results
