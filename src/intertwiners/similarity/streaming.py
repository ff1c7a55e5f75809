"""Streaming similarity: minibatch CKA for one pair, and layer x layer matrices between two models.

Minibatch CKA (Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn the same things?"):
over k minibatches of features (X_i, Y_i) with Gram matrices K_i, L_i,

    CKA_minibatch = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) * mean_i HSIC_1(L_i, L_i))

with the unbiased HSIC_1, so the estimate has no bias from the batch size. Memory is that of one batch,
whatever the number of samples. For the max kernel (G_ReLU-CKA) the centring and unit-norm scaling of
each column/channel use the statistics *of the batch* (one pass; G_ReLU invariance and the alignment
property hold batch by batch, so they hold for the estimate).

:func:`layer_similarity_matrix` runs two models over the data once and fills the whole matrix of CKA
values between their sites (Figs. 2 and 5): per batch, every site's Gram matrix is centred once
(U-centring for HSIC_1), and all HSIC_1 values between sites are one matrix product of the stacked
centred Gram matrices. :func:`procrustes_per_layer` streams the float64 second moments that the
Procrustes measures need (Table 2).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .._util import resolve_device
from ..features import SiteExtractor
from ._validate import check_pair, to_features, unit_scale
from .cka import check_min_samples, cka_from_hsic, degenerate_rtol
from .hsic import _check_estimator, centred_gram, centred_inner, hsic_normaliser
from .kernels import KERNELS, gram
from .procrustes import GROUPS, ProcrustesStats


class MinibatchCKA:
    """CKA accumulated over minibatches (NRK21): ``update(X_batch, Y_batch)`` then ``compute()``.

    kernel: linear | rbf | max (max = G_ReLU-CKA, normalised per batch). estimator: ``unbiased``
    (HSIC_1, the NRK21 estimator; every batch needs >= 4 samples) or ``biased``. Per-batch HSIC values
    stay as float64 tensors on the features' device (no host synchronisation per batch).
    """

    def __init__(self, kernel: str = "linear", estimator: str = "unbiased", *, threshold: float = 1.0,
                 sigma: float | None = None, drop_dead: bool = False, device=None, backend: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        _check_estimator(estimator)
        self.kernel, self.estimator = kernel, estimator
        self._opts = dict(threshold=threshold, sigma=sigma, drop_dead=drop_dead, backend=backend)
        self.device = None if device is None else resolve_device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self.n_batches = 0
        self.n_samples = 0
        # [sum HSIC(K,L), sum HSIC(K,K), sum HSIC(L,L), sum |K|^2/norm, sum |L|^2/norm]
        self._sums: torch.Tensor | None = None
        self._rtol = 0.0
        self._shift: dict[str, int] = {}   # power-of-two exponents fixed by the first batch (linear kernel)

    def update(self, X_batch, Y_batch) -> None:
        """Add one minibatch of features of the same samples: X (b, ...), Y (b, ...)."""
        x = to_features(X_batch, "X_batch", self.device)
        y = to_features(Y_batch, "Y_batch", self.device if self.device is not None else x.device)
        check_pair(x, y, ("X_batch", "Y_batch"))
        check_min_samples(x.shape[0], self.estimator, f"minibatch CKA: batch {self.n_batches}")
        x, y = self._scaled(x, "x"), self._scaled(y, "y")
        k = gram(x, self.kernel, name="X_batch", **self._opts)
        l = gram(y, self.kernel, name="Y_batch", **self._opts)
        self._rtol = max(self._rtol, degenerate_rtol(k.dtype, l.dtype))
        kc, lc = centred_gram(k, self.estimator), centred_gram(l, self.estimator)
        norm = hsic_normaliser(x.shape[0], self.estimator)
        vals = torch.stack([centred_inner(kc, lc), centred_inner(kc, kc), centred_inner(lc, lc),
                            torch.linalg.vector_norm(k, dtype=torch.float64) ** 2,
                            torch.linalg.vector_norm(l, dtype=torch.float64) ** 2]) / norm
        self._sums = vals if self._sums is None else self._sums + vals.to(self._sums.device)
        self.n_batches += 1
        self.n_samples += x.shape[0]

    def _scaled(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """Features ready for this kernel without overflow.

        The linear kernel's HSIC values are summed over batches, so every batch must keep the same scale:
        float64, times one power of two (exact) fixed by the first batch -- any finite input is safe. The max
        kernel and the median-bandwidth RBF kernel are scale invariant per batch: each batch is rescaled by its
        own power of two.
        """
        if self.kernel == "linear":
            t = t.to(torch.float64)
            if which not in self._shift:
                m = float(t.abs().amax())
                self._shift[which] = 0 if m == 0.0 or 2.0 ** -30 <= m <= 2.0 ** 30 else math.frexp(m)[1]
            shift = self._shift[which]
            return t if shift == 0 else torch.ldexp(t, torch.tensor(-shift, dtype=torch.int32, device=t.device))
        if self.kernel == "max" or self._opts["sigma"] is None:
            return unit_scale(t)
        return t

    @property
    def hsic_values(self) -> tuple[float, float, float]:
        """Mean over batches of (HSIC(K, L), HSIC(K, K), HSIC(L, L))."""
        if self._sums is None:
            raise ValueError("MinibatchCKA.compute() before any update(): no batches were given")
        m = (self._sums / self.n_batches).tolist()
        return m[0], m[1], m[2]

    def compute(self) -> float:
        """The minibatch CKA estimate; ValueError (never NaN) when a mean self-HSIC is not positive."""
        kl, kk, ll = self.hsic_values
        sk, sl = (self._sums[3:] / self.n_batches).tolist()
        if not all(math.isfinite(v) for v in (kl, kk, ll, sk, sl)):
            raise ValueError("minibatch CKA overflowed float64 (features of magnitude beyond about 1e75 with the "
                             "linear kernel); rescale the features")
        return cka_from_hsic(kl, kk, ll, self.estimator, what=f" after {self.n_batches} batch(es)",
                             scales=(sk, sl), rtol=self._rtol)


# ---------------------------------------------------------------------------------------------------
# Two models, many sites, one pass over the data.

_CKA_MEASURES = {"cka": "linear", "linear_cka": "linear", "rbf_cka": "rbf", "grelu_cka": "max",
                 "max_cka": "max"}
_PROCRUSTES_MEASURES = {"procrustes": "orthogonal", "orthogonal_procrustes": "orthogonal",
                        "permutation_procrustes": "permutation", "grelu_procrustes": "grelu"}
MEASURES = tuple(_CKA_MEASURES) + tuple(_PROCRUSTES_MEASURES)


def _batches(data, batch_size: int, max_samples: int | None) -> Iterable[torch.Tensor]:
    from ..features import iterate_inputs
    seen = 0
    for xb in iterate_inputs(data, batch_size):
        if max_samples is not None:
            if seen >= max_samples:
                return
            xb = xb[: max_samples - seen]
        seen += len(xb)
        yield xb


def _prepare(model_a, model_b, data, sites_a, sites_b, device, batch_size, max_samples):
    dev = resolve_device(device)
    if sites_b is None and sites_a is not None:
        sites_b = sites_a
    batches = iter(_batches(data, batch_size, max_samples))
    first = next(batches, None)                  # peeked, then put back: iterators are consumed once
    if first is None:
        raise ValueError("no input data was given")
    if model_a is model_b and (sites_b is None or list(sites_b) == list(sites_a or [])):
        warnings.warn("model_a and model_b are the same object: comparing a model with itself gives 1 on the "
                      "diagonal; pass two different models to compare seeds", stacklevel=3)
    ra = SiteExtractor(model_a, sites_a, example=first[:2])
    rb = SiteExtractor(model_b, sites_b, example=first[:2])
    moved = []
    for m, r in ((model_a, ra), (model_b, rb)):
        p = next(iter(m.parameters()), None)
        moved.append((m, p.device if p is not None else None))
        m.to(dev)
        r.runner.to(dev)
    return dev, ra, rb, moved, itertools.chain([first], batches)


def _restore(moved) -> None:
    for m, d in moved:
        if d is not None:
            m.to(d)


def layer_similarity_matrix(model_a: nn.Module, model_b: nn.Module, data, sites_a: Sequence[str] | None = None,
                            sites_b: Sequence[str] | None = None, measure: str = "grelu_cka",
                            batch_size: int = 256, device: str = "auto", estimator: str = "unbiased",
                            max_samples: int | None = None, drop_dead: bool = True, threshold: float = 1.0,
                            progress: bool = False, return_sites: bool = False):
    """The (len(sites_a), len(sites_b)) matrix of minibatch CKA between every pair of sites, one pass.

    measure: ``grelu_cka`` (max kernel, per-batch G_ReLU normalisation), ``cka`` / ``linear_cka`` or
    ``rbf_cka``. data: a dataset with ``.x``, an (N, ...) array/tensor, or an iterable of batches;
    sites default to every activation site (forward order); ``sites_b`` defaults to ``sites_a`` when
    that is given. Every batch must hold >= 4 samples for the
    unbiased estimator (a smaller last batch is skipped with a warning). Memory is independent of N:
    per batch, one centred (b, b) Gram matrix per site. ``drop_dead`` (default True here) drops units that
    are constant within a batch before the max kernel; they have no defined normalisation. Returns a
    float64 NumPy array, or ``(matrix, sites_a, sites_b)`` with ``return_sites=True``.
    """
    if measure not in _CKA_MEASURES:
        hint = " (Procrustes compares matching layers: use procrustes_per_layer)" \
            if measure in _PROCRUSTES_MEASURES else ""
        raise ValueError(f"measure must be one of {tuple(_CKA_MEASURES)}{hint}, got {measure!r}")
    _check_estimator(estimator)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be None or a positive integer, got {max_samples!r}")
    check_min_samples(batch_size, estimator, "the layer x layer CKA matrix: batch_size")
    kernel = _CKA_MEASURES[measure]
    dev, ra, rb, moved, batches = _prepare(model_a, model_b, data, sites_a, sites_b, device, batch_size,
                                           max_samples)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"{measure} matrix", unit="batch")
    opts = dict(threshold=threshold, drop_dead=drop_dead)
    acc = None
    n_batches = 0
    try:
        for xb in batches:
            if len(xb) < (4 if estimator == "unbiased" else 2):
                warnings.warn(f"skipping a final batch of {len(xb)} samples (the {estimator} HSIC needs >= "
                              f"{4 if estimator == 'unbiased' else 2})", stacklevel=2)
                continue
            ua, sa = _stacked_centred(ra(xb), ra.sites, kernel, estimator, opts)
            ub, sb = _stacked_centred(rb(xb), rb.sites, kernel, estimator, opts)
            norm = hsic_normaliser(len(xb), estimator)
            b = [(ua @ ub.T) / norm, (ua * ua).sum(1) / norm, (ub * ub).sum(1) / norm, sa / norm, sb / norm]
            acc = b if acc is None else [p + q for p, q in zip(acc, b)]
            n_batches += 1
    finally:
        _restore(moved)
    if acc is None:
        raise ValueError("no batch with enough samples was seen")
    kl, kk, ll, sk, sl = (t.cpu().numpy() / n_batches for t in acc)
    rtol = degenerate_rtol(torch.float32)
    for sites, self_hsic, scale in ((ra.sites, kk, sk), (rb.sites, ll, sl)):
        bad = [s for s, v, sc in zip(sites, self_hsic, scale) if not v > rtol * sc]
        if bad:
            raise ValueError(f"CKA undefined at site(s) {bad}: the mean self-HSIC is not positive ({estimator} "
                             "estimator); use larger batches or more data")
    out = kl / np.sqrt(np.outer(kk, ll))
    return (out, list(ra.sites), list(rb.sites)) if return_sites else out


def _stacked_centred(feats, sites, kernel, estimator, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked flattened centred Gram matrices (sites, b*b) and the |K|_F^2 of each (float64)."""
    rows, scales = [], []
    for s, f in zip(sites, feats):
        f = to_features(f, f"features at {s}")
        # linear: float64 keeps every batch at its own scale (values are summed over batches); the max and RBF
        # kernels are normalised per batch, so an exact power-of-two rescaling is safe
        f = f.to(torch.float64) if kernel == "linear" else unit_scale(f)
        k = gram(f, kernel, name=f"features at {s}", **opts)
        scales.append(torch.linalg.vector_norm(k, dtype=torch.float64) ** 2)
        rows.append(centred_gram(k, estimator).reshape(-1))
    return torch.stack(rows), torch.stack(scales)


def procrustes_per_layer(model_a: nn.Module, model_b: nn.Module, data, sites: Sequence[str] | None = None,
                         sites_b: Sequence[str] | None = None, groups: Sequence[str] = ("grelu", "orthogonal"),
                         center: bool = False, batch_size: int = 256, device: str = "auto",
                         max_samples: int | None = None, drop_dead: bool = True,
                         progress: bool = False) -> dict[str, dict[str, float]]:
    """Procrustes similarities between the same sites of two models, in one pass over the data.

    Features at each site are (N, C, *spatial) -> the (N * prod(spatial), C) channel matrix (Table 2).
    ``sites_b`` pairs site k of A with site k of B (default: the same names). Returns
    ``{site_a: {group: similarity}}``; float64 statistics, memory O(C^2) per site. ``drop_dead`` (default
    True here) drops dead channels (zero over the whole data) for the ``grelu`` group.
    """
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"groups must be drawn from {GROUPS}, got {g!r}")
    if sites is not None and sites_b is None:
        sites_b = sites
    dev, ra, rb, moved, batches = _prepare(model_a, model_b, data, sites, sites_b, device, batch_size,
                                           max_samples)
    if len(ra.sites) != len(rb.sites):
        _restore(moved)
        raise ValueError(f"procrustes_per_layer pairs sites one to one: {len(ra.sites)} sites in A and "
                         f"{len(rb.sites)} in B")
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="procrustes", unit="batch")
    stats = [ProcrustesStats() for _ in ra.sites]
    try:
        for xb in batches:
            for st, fa, fb, s in zip(stats, ra(xb), rb(xb), ra.sites):
                x, y = to_features(fa, f"A features at {s}"), to_features(fb, f"B features at {s}")
                check_pair(x, y)
                st.update(x, y)
    finally:
        _restore(moved)
    out: dict[str, dict[str, float]] = {}
    for s, st in zip(ra.sites, stats):
        out[s] = {g: st.similarity(g, center=center, drop_dead=drop_dead) for g in groups}
    return out
