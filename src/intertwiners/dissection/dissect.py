"""Network dissection (Bau et al. 2017), optionally in a rotated basis of the units.

For a layer ("site") with U units and a probe dataset in the Broden layout:

1. **Thresholds.** For each unit u, T_u is the top-``quantile`` quantile (default 0.005, i.e. the
   0.995 quantile, linear interpolation as ``torch.quantile``) of its activations over every image
   and every spatial position, at the layer's own resolution. It is computed *exactly* and streaming:
   only the largest ``k = n - floor((1 - quantile) (n - 1))`` values per unit (n = images x positions)
   are ever kept, merged batch by batch with ``torch.topk``.
2. **Masks.** Each activation map is upsampled bilinearly to the label resolution (sh, sw) and
   thresholded: M_u = A_u > T_u.
3. **IoU.** For each unit u and concept c, summed over the dataset,
   IoU(u, c) = |M_u ∩ L_c| / (|M_u ∩ annotated(cat(c))| + |L_c| - |M_u ∩ L_c|), where L_c is the
   set of pixels labelled c (every pixel of an image for an image-level label) and
   annotated(cat(c)) are the images that carry labels of c's category (NetDissect's convention).
   A unit's concept is its best-IoU concept; it is *interpretable* when that IoU exceeds
   ``iou_threshold`` (0.04).

Rotation: with ``rotation=Q`` (U, U) the layer is read in the basis new_u = sum_v Q[u, v] a_v
(a' = Q a at every position) before step 1; ``Q = I`` is the plain dissection.

Memory: the upsampled maps are never all held; pass 2 works batch by batch. The layer's features
at their own resolution are cached between the two passes when they take less than
``cache_bytes`` (then the model runs once over the dataset); otherwise the second pass runs the model
again. Intersections are counted in float32 per batch (exact: batch sizes keep counts below 2**24)
and summed in float64, so results are exactly integer counts and exactly equivariant under
permutations of the units.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._util import as_tensor, resolve_device
from ..features import eval_mode
from ..tracing import site_map, trace, truncated_module
from .broden import IMAGENET_MEAN, IMAGENET_STD, BrodenDataset, load_images


# ----------------------------------------------------------------------------------------------------
# results
@dataclass(frozen=True)
class UnitResult:
    """One unit's dissection: its best ``concept`` (name), that concept's ``category``, the ``iou``, the
    activation ``threshold`` and whether it is ``interpretable`` (iou > iou_threshold)."""

    unit: int
    concept: str
    category: str
    iou: float
    threshold: float
    interpretable: bool


@dataclass
class DissectionResult:
    """Everything a dissection measured. ``iou``: float64 tensor (U, C); ``thresholds`` (U,);
    ``concepts`` / ``concept_categories``: name and category of each of the C concepts."""

    site: str
    iou: torch.Tensor
    thresholds: torch.Tensor
    concepts: list[str]
    concept_categories: list[str]
    quantile: float
    iou_threshold: float
    n_images: int
    intersections: torch.Tensor = field(repr=False, default=None)

    @property
    def best_concept(self) -> torch.Tensor:
        """(U,) index of each unit's best concept (ties: the lowest index)."""
        return self.iou.argmax(dim=1)

    @property
    def best_iou(self) -> torch.Tensor:
        return self.iou.max(dim=1).values

    @property
    def interpretable(self) -> torch.Tensor:
        """(U,) bool: best IoU > iou_threshold."""
        return self.best_iou > self.iou_threshold

    @property
    def units(self) -> list[UnitResult]:
        best, score, ok = self.best_concept.tolist(), self.best_iou.tolist(), self.interpretable.tolist()
        return [UnitResult(u, self.concepts[c], self.concept_categories[c], s, float(t), k)
                for u, (c, s, k, t) in enumerate(zip(best, score, ok, self.thresholds.tolist()))]

    @property
    def interpretable_units(self) -> int:
        return int(self.interpretable.sum())

    @property
    def unique_concepts(self) -> int:
        """Number of distinct best concepts among the interpretable units."""
        return len(set(self.best_concept[self.interpretable].tolist()))

    def counts_by_category(self) -> dict[str, int]:
        """Interpretable units per category of their best concept."""
        out = {c: 0 for c in dict.fromkeys(self.concept_categories)}
        for u in self.units:
            if u.interpretable:
                out[u.category] += 1
        return out

    def to_csv(self, path: str | Path) -> Path:
        """One row per unit: unit, concept, category, iou, threshold, interpretable."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["unit", "concept", "category", "iou", "threshold", "interpretable"])
            for u in self.units:
                w.writerow([u.unit, u.concept, u.category, f"{u.iou:.6f}", f"{u.threshold:.6g}", int(u.interpretable)])
        return path


# ----------------------------------------------------------------------------------------------------
# reading a site
class _Stop(Exception):
    pass


class SiteReader:
    """Runs ``model`` up to ``site`` and returns the site's output (nothing after it is computed).

    ``site``: an activation site name from :func:`intertwiners.features.activation_sites` (modules and
    functional activations, e.g. ``"layer1.0.relu2"`` or ``"layer1.0:relu"``), or the qualified name of
    any submodule (its output, e.g. a residual block ``"layer3.1"``).
    """

    def __init__(self, model: nn.Module, site: str):
        self.model, self.site = model, site
        self._runner = None
        sites: dict = {}
        try:
            gm = trace(model)
            sites = site_map(gm)
        except ValueError:
            gm = None
        modules = dict(model.named_modules())
        if site in sites:
            self._runner = truncated_module(gm, [sites[site].node])
        elif site and site in modules:
            self._module = modules[site]
        else:
            some = list(modules)[1:12]
            raise ValueError(f"unknown site {site!r}: not an activation site {sorted(sites)[:20]} nor a "
                             f"submodule name (e.g. {some})")

    def to(self, device):
        self.model.to(device)
        if self._runner is not None:
            self._runner.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._runner is not None:
            out = self._runner(x)[0]
        else:
            captured = []

            def hook(_m, _i, output):
                captured.append(output)
                raise _Stop

            handle = self._module.register_forward_hook(hook)
            try:
                self.model(x)
            except _Stop:
                pass
            finally:
                handle.remove()
            if not captured:
                raise ValueError(f"site {self.site!r}: the module was never called in the forward pass")
            out = captured[0]
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"site {self.site!r} outputs a {type(out).__name__}, not a tensor")
        if out.ndim not in (2, 4):
            raise ValueError(f"site {self.site!r} outputs shape {tuple(out.shape)}; dissection needs (N, U, H, W) "
                             "or (N, U)")
        return out


# ----------------------------------------------------------------------------------------------------
# exact streaming quantile
def topk_size(n: int, quantile: float) -> int:
    """How many of the largest of n values determine the (1 - quantile) quantile (linear interpolation)."""
    lo = math.floor((1.0 - quantile) * (n - 1))
    return n - lo


def quantile_from_top(top: torch.Tensor, n: int, quantile: float) -> torch.Tensor:
    """The (1 - quantile) quantile per row (linear interpolation, as ``torch.quantile``) from the
    ``topk_size(n, quantile)`` largest values of each row (``top``: (U, k), any order) of n values."""
    k = top.shape[1]
    top = top.sort(dim=1, descending=True).values
    pos = (1.0 - quantile) * (n - 1)
    lo = math.floor(pos)
    frac = pos - lo
    x_lo = top[:, k - 1]
    x_hi = top[:, k - 2] if k >= 2 else x_lo
    return torch.lerp(x_lo, x_hi, frac) if frac > 0 else x_lo.clone()


class _TopK:
    def __init__(self, k: int):
        self.k, self.buf = k, None

    def update(self, values: torch.Tensor) -> None:  # values (U, m)
        cat = values if self.buf is None else torch.cat([self.buf, values], dim=1)
        self.buf = cat if cat.shape[1] <= self.k else cat.topk(self.k, dim=1, sorted=False).values


# ----------------------------------------------------------------------------------------------------
# labels
@dataclass
class _LabelBatch:
    pixel: torch.Tensor       # (B, K, S) int64 concept index + 1, 0 = none
    image_level: torch.Tensor  # (B, C) float32 indicator of image-level concepts
    annotated: torch.Tensor   # (B, n_categories) float32


def _label_batch(dataset: BrodenDataset, indices: list[int], shape: tuple[int, int], device) -> _LabelBatch:
    segs = [dataset.segmentation(i) for i in indices]
    kmax = max(1, max(s.pixel.shape[0] for s in segs))
    s_pix = shape[0] * shape[1]
    pixel = np.zeros((len(segs), kmax, s_pix), dtype=np.int64)
    n_concepts = len(dataset.concepts)
    image_level = np.zeros((len(segs), n_concepts), dtype=np.float32)
    annotated = np.zeros((len(segs), len(dataset.categories)), dtype=np.float32)
    lookup = dataset.number_to_index + 1
    for b, s in enumerate(segs):
        if s.pixel.shape[0]:
            pixel[b, :s.pixel.shape[0]] = lookup[s.pixel.reshape(s.pixel.shape[0], -1)]
        for n in s.image_level:
            image_level[b, dataset.number_to_index[n]] = 1.0
        for cat in s.annotated:
            annotated[b, dataset.categories.index(cat)] = 1.0
    return _LabelBatch(torch.from_numpy(pixel).to(device), torch.from_numpy(image_level).to(device),
                       torch.from_numpy(annotated).to(device))


class _Tally:
    """Accumulates intersections (U, C), label areas (C,) and mask areas per category (U, n_categories)."""

    def __init__(self, n_units: int, n_concepts: int, n_categories: int, device):
        self.inter = torch.zeros(n_units, n_concepts, dtype=torch.float64, device=device)
        self.mask_cat = torch.zeros(n_units, n_categories, dtype=torch.float64, device=device)
        self.label_area = torch.zeros(n_concepts, dtype=torch.float64, device=device)

    def add_labels(self, labels: _LabelBatch, onehot, s_pix: int) -> None:
        if onehot is not None:
            cols, y = onehot
            self.label_area.index_add_(0, cols, y.sum(dim=(0, 1)).double())
        self.label_area += s_pix * labels.image_level.sum(0).double()

    def add_masks(self, masks: torch.Tensor, labels: _LabelBatch, onehot) -> None:
        """masks: (B, U, S) bool."""
        mf = masks.float()
        area = mf.sum(dim=2)  # (B, U)
        if onehot is not None:
            cols, y = onehot
            inter = torch.bmm(mf, y).sum(0)  # (U, Cb)
            self.inter.index_add_(1, cols, inter.double())
        self.inter += (area.t() @ labels.image_level).double()
        self.mask_cat += (area.t() @ labels.annotated).double()

    def iou(self, concept_category: torch.Tensor) -> torch.Tensor:
        union = self.mask_cat[:, concept_category] + self.label_area[None, :] - self.inter
        return torch.where(union > 0, self.inter / union.clamp_min(1e-300), torch.zeros_like(union))


def _pixel_onehot(pixel: torch.Tensor):
    """(B, K, S) concept index + 1 -> (columns (Cb,) concept indices, one-hot float32 (B, S, Cb)); None if
    no pixel is labelled. A pixel carrying the same concept in two channels counts once."""
    values, inverse = torch.unique(pixel, return_inverse=True)
    has_zero = bool(values[0] == 0)
    cols = values[1:] - 1 if has_zero else values - 1
    if cols.numel() == 0:
        return None
    b, k, s = pixel.shape
    y = torch.zeros(b, s, len(values), dtype=torch.float32, device=pixel.device)
    y.scatter_(2, inverse.permute(0, 2, 1), 1.0)
    if has_zero:
        y = y[:, :, 1:]
    return cols, y


# ----------------------------------------------------------------------------------------------------
def _as_rotation(rotation, n_units: int, device, dtype) -> torch.Tensor | None:
    if rotation is None:
        return None
    q = as_tensor(rotation, name="rotation")
    if q.ndim != 2 or q.shape != (n_units, n_units):
        raise ValueError(f"rotation must be ({n_units}, {n_units}) for a site with {n_units} units, "
                         f"got {tuple(q.shape)}")
    if not torch.isfinite(q).all():
        raise ValueError("rotation contains NaN or infinite entries")
    return q.to(device=device, dtype=dtype)


def _rotate(feat: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    if q is None:
        return feat
    if feat.ndim == 2:
        return feat @ q.t()
    return torch.einsum("uv,bvhw->buhw", q, feat)


def _upsample(feat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, U, h, w) or (B, U) -> (B, U, sh*sw), bilinear (align_corners=False)."""
    if feat.ndim == 2:
        return feat[:, :, None].expand(-1, -1, shape[0] * shape[1])
    if tuple(feat.shape[2:]) != tuple(shape):
        feat = F.interpolate(feat, size=shape, mode="bilinear", align_corners=False)
    return feat.reshape(feat.shape[0], feat.shape[1], -1)


def dissect_many(model: nn.Module, site: str, dataset: BrodenDataset, rotations: list, *,
                 quantile: float = 0.005, iou_threshold: float = 0.04, batch_size: int = 64,
                 image_size: int | tuple[int, int] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device: str = "auto", cache_bytes: int = 512 * 2**20, indices=None,
                 progress: bool = False) -> list[DissectionResult]:
    """:func:`dissect` for several rotations (``None`` = the unit basis) sharing the forward passes.

    Returns one :class:`DissectionResult` per entry of ``rotations``.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if not 0 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not isinstance(dataset, BrodenDataset):
        raise ValueError(f"dataset must be a BrodenDataset, got {type(dataset).__name__}")
    if len(rotations) == 0:
        raise ValueError("no rotations given (use [None] for the unit basis)")
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not indices:
        raise ValueError("no images to dissect")
    dev = resolve_device(device)
    label_shape = dataset.label_shape
    s_pix = label_shape[0] * label_shape[1]
    reader = SiteReader(model, site)
    p = next(iter(model.parameters()), None)
    original_device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if progress:
        from tqdm.auto import tqdm
    else:
        def tqdm(x, **_):
            return x

    def features(batch):
        x = load_images(dataset, batch, image_size, mean, std).to(device=dev, dtype=dtype)
        try:
            return reader(x).float()
        except RuntimeError as err:
            raise ValueError(f"the model could not run on the probe images (RGB, shape {tuple(x.shape[1:])}): "
                             f"{err}. Is it a model for RGB images of that size? (image_size resizes them)") from err

    try:
        reader.to(dev)
        with torch.no_grad(), eval_mode(model):
            # pass 1: thresholds (exact streaming top-k), caching native features if small enough
            cache: list[torch.Tensor] | None = []
            cached_bytes, qs, tops, n_total, feat_shape = 0, None, None, 0, None
            for batch in tqdm(batches, desc="dissect: thresholds"):
                f = features(batch)
                if feat_shape is None:
                    feat_shape = tuple(f.shape[1:])
                    n_units = f.shape[1]
                    per_image = int(np.prod(feat_shape[1:])) if f.ndim == 4 else 1
                    n_total = len(indices) * per_image
                    k = topk_size(n_total, quantile)
                    qs = [_as_rotation(r, n_units, dev, f.dtype) for r in rotations]
                    tops = [_TopK(k) for _ in rotations]
                elif tuple(f.shape[1:]) != feat_shape:
                    raise ValueError(f"site {site!r} gives features {tuple(f.shape[1:])} for some images and "
                                     f"{feat_shape} for others; pass image_size to resize the images")
                for q, top in zip(qs, tops):
                    g = _rotate(f, q)
                    top.update(g.transpose(0, 1).reshape(n_units, -1))
                if cache is not None:
                    cached_bytes += f.numel() * f.element_size()
                    if cached_bytes <= cache_bytes:
                        cache.append(f)
                    else:
                        cache = None  # too big: the second pass runs the model again
            thresholds = [quantile_from_top(top.buf, n_total, quantile) for top in tops]
            # pass 2: masks at label resolution and the IoU tally, batch by batch
            n_categories = len(dataset.categories)
            tallies = [_Tally(n_units, len(dataset.concepts), n_categories, dev) for _ in rotations]
            # keep B * S < 2**24 (exact float32 counts) and B * U * S moderate (memory)
            sub = max(1, min(2**24 // s_pix - 1, (2**25) // max(1, n_units * s_pix)))
            for bi, batch in enumerate(tqdm(batches, desc="dissect: IoU")):
                f = cache[bi] if cache is not None else features(batch)
                for start in range(0, len(batch), sub):
                    part = batch[start:start + sub]
                    labels = _label_batch(dataset, part, label_shape, dev)
                    onehot = _pixel_onehot(labels.pixel)
                    fp = f[start:start + sub]
                    tallies[0].add_labels(labels, onehot, s_pix)
                    for q, thr, tally in zip(qs, thresholds, tallies):
                        up = _upsample(_rotate(fp, q), label_shape)
                        tally.add_masks(up > thr[None, :, None], labels, onehot)
    finally:
        model.to(original_device)
    # the label areas do not depend on the rotation: computed once
    for tally in tallies[1:]:
        tally.label_area = tallies[0].label_area
    cat_index = torch.as_tensor(dataset.concept_categories(), device=dev)
    results = []
    for thr, tally in zip(thresholds, tallies):
        results.append(DissectionResult(site, tally.iou(cat_index).cpu(), thr.double().cpu(),
                                        dataset.concept_names, [c.category for c in dataset.concepts],
                                        quantile, iou_threshold, len(indices), tally.inter.cpu()))
    return results


def dissect(model: nn.Module, site: str, dataset: BrodenDataset, rotation=None, quantile: float = 0.005,
            iou_threshold: float = 0.04, **kwargs) -> DissectionResult:
    """NetDissect of ``site`` of ``model`` on ``dataset`` (see the module docstring for the method).

    ``site``: an activation site (module or functional, nested anywhere) or any submodule name.
    ``rotation``: (U, U) matrix; the units are read as ``Q a`` (None: the unit basis). Images are
    loaded as RGB, resized to ``image_size`` when given, scaled to [0, 1] and normalised with ``mean``/
    ``std`` (ImageNet statistics by default). Other keyword arguments: ``batch_size``, ``device``,
    ``cache_bytes``, ``indices`` (a subset of images), ``progress``. Runs in eval mode without autograd.
    """
    return dissect_many(model, site, dataset, [rotation], quantile=quantile, iou_threshold=iou_threshold,
                        **kwargs)[0]
