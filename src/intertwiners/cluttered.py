"""Cluttered digits: a harder image dataset built from scikit-learn's bundled digits, deterministic, no download.

After the cluttered translated MNIST of Mnih et al. (2014, "Recurrent models of visual attention"): a
digit placed at a random position on a larger canvas, with random fragments of *other* digits scattered over it
as clutter. Here the digits are scikit-learn's 8x8 images (there is no MNIST on this machine), the canvas is
32x32 with 3 colour channels (the input shape of the paper's CIFAR-10 models), and each digit is also randomly
scaled, rotated and elastically distorted (Simard et al. 2003), drawn in a random colour on a random
background colour, and noised. It is **not** CIFAR-10 and says nothing about natural images: it is a
10-class shape-recognition task hard enough that the models do not saturate. docs/datasets.md gives the
construction step by step, its sizes, build time and measured accuracies.

Construction (:func:`build`), for each split separately:

1. the split of the 1,797 source digits is ``load("digits")``'s (stratified, 1,437 train / 360 test,
   ``random_state=0``); a split's images use only that split's source digits, for the digit *and* for its
   clutter fragments, so no test digit is ever seen in training;
2. every source digit is upsampled x4 once (cubic spline, 8x8 -> 32x32, stored as integers 0..240);
3. each source digit gives ``copies`` images; each image draws, from its own split's stream: a scale, a
   rotation, a position, an elastic displacement field, a background colour and a digit colour, and
   ``fragments`` clutter fragments (another source digit of the split, its scale, rotation, window position,
   the part of that digit the window shows, and a colour);
4. the digit, then each fragment in turn, is painted over the background (``canvas += alpha (colour - canvas)``,
   alpha = the bilinearly sampled stroke intensity); pixel noise is added; the result is rounded to uint8.

Bit-for-bit reproducibility: the random numbers come from ``numpy.random.Generator(PCG64([seed, split, k]))``
(one stream each for the per-image parameters, the elastic fields and the noise) through ``random()``
only (integers by ``floor(u * n)``); no threads, no BLAS. The upsampled digits are rounded to integers and
every sampling coordinate to a multiple of 2^-10, so each bilinear interpolation is exact integer
arithmetic: the last-bit differences that sin/cos/exp or a summation order may show between CPUs and
library builds are absorbed by those roundings. Colours are composited in float32, element by element
(IEEE operations, the same everywhere). :data:`REFERENCE_SHA256` is the digest of the default build.

Cache: the built arrays are written to ``$INTERTWINERS_CACHE`` (default ``$XDG_CACHE_HOME/intertwiners`` or
``~/.cache/intertwiners``) as an ``.npz`` (read with ``allow_pickle=False``) under a temporary name, then
renamed; the file name carries the construction version and a hash of the parameters. A cached file is
re-verified (keys, dtypes, shapes, sha256 of the arrays) every time it is read; a damaged file is rebuilt
with a warning, never used. When the cache folder is not writable the arrays are built and used without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VERSION = 1
# sha256 (see :func:`digest`) of the default build, ``build(ClutterSpec())``, on the development machine
# (x86-64, numpy 2.4, scipy 1.17); building the default anywhere else is checked against it.
REFERENCE_SHA256 = "603d775938e1f3986e6a76eb9c370c6cf0e0cc6d8f654a3ac3cf2a43966d93d6"

UPSAMPLE = 4          # source digits are upsampled x4 (8x8 -> 32x32) once, before any sampling
INK_LEVELS = 240      # the upsampled stroke intensity is an integer 0..240 (16 grey levels x 15)
COORD_GRID = 1024     # sampling coordinates are rounded to multiples of 1/1024 (exact bilinear weights)
SOURCE_SIZE = 8       # scikit-learn's digits are 8x8, grey levels 0..16
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ClutterSpec:
    """Every parameter of the construction. Lengths are in canvas pixels, angles in degrees.

    ``digit_size``: side of the 8x8 source frame on the canvas at scale 1 (16: each source pixel becomes 2x2);
    ``scale``: range of the random scale factor; ``rotation``: maximum |angle|;
    ``elastic_alpha``, ``elastic_sigma``: Simard et al.'s elastic distortion (a uniform [-1, 1] field per
    axis, smoothed by a Gaussian of ``elastic_sigma``, times ``elastic_alpha``), Simard's alpha = 34,
    sigma = 4 for 28-px MNIST scaled to the 16-px digit (sigma x 16/28; alpha x (16/28)^2, as the smoothed
    field's amplitude goes as alpha / sigma);
    ``fragments``: clutter fragments per image: 2, so that they cover about the share of the canvas Mnih et al.'s
    clutter covers (4 x 8^2 / 60^2 = 7.1 %; here 2 x 6^2 / 32^2 = 7.0 %); the first construction copied their
    count, 4 (14 % of the canvas), and a Myrtle CNN reached only 75 % on it (docs/datasets.md gives both
    measurements); ``fragment_size``: their side
    (Mnih et al.'s 8-px patches are 8/28 of an MNIST frame and span about three stroke widths; 8/28 of the
    16-px digit would be 4.6 px, about one stroke width of these thicker-stroked digits, so 6 px);
    ``noise``: standard deviation of the uniform pixel noise, as a fraction of the 0..255 range;
    ``contrast``: every colour channel of a stroke differs from the background by at least this fraction;
    ``copies``: images per source digit in each split (train, test).
    """

    canvas: int = 32
    digit_size: float = 16.0
    scale: tuple[float, float] = (0.8, 1.2)
    rotation: float = 15.0
    elastic_alpha: float = 34.0 * (16 / 28) ** 2
    elastic_sigma: float = 4.0 * 16 / 28
    fragments: int = 2
    fragment_size: int = 6
    noise: float = 0.05
    contrast: float = 0.25
    copies: tuple[int, int] = (4, 4)
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.scale
        if not (isinstance(self.canvas, int) and self.canvas >= 8):
            raise ValueError(f"canvas must be an integer >= 8, got {self.canvas!r}")
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be a range 0 < low <= high, got {self.scale!r}")
        if not 0 < self.digit_size * hi <= self.canvas:
            raise ValueError(f"the largest digit ({self.digit_size} x {hi}) must fit the {self.canvas}-px canvas")
        if not (isinstance(self.fragment_size, int) and 1 <= self.fragment_size <= self.digit_size * lo):
            raise ValueError(f"fragment_size must be an integer from 1 to the smallest digit's side "
                             f"({self.digit_size * lo}), got {self.fragment_size!r}")
        if not (isinstance(self.fragments, int) and self.fragments >= 0):
            raise ValueError(f"fragments must be an integer >= 0, got {self.fragments!r}")
        if not 0 <= self.contrast <= 0.5:
            raise ValueError(f"contrast must lie in [0, 0.5] (a channel cannot differ by more than half the "
                             f"range from every background), got {self.contrast!r}")
        if len(self.copies) != 2 or any(not isinstance(c, int) or c < 1 for c in self.copies):
            raise ValueError(f"copies must be two integers >= 1 (train, test), got {self.copies!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("rotation", "elastic_alpha", "elastic_sigma", "noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def key(self) -> str:
        """A short hash of the construction version and every parameter (names the cache file)."""
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClutteredDigits:
    """The built arrays of both splits.

    ``x[split]`` uint8 (N, 3, canvas, canvas); ``y[split]`` uint8 (N,) labels 0..9; ``source[split]`` int16 (N,)
    the index (into scikit-learn's 1,797 digits) of each image's digit; ``fragment_source[split]`` int16
    (N, fragments) the digits its clutter fragments were cut from.
    """

    arrays: dict[str, np.ndarray]

    def x(self, split: str) -> np.ndarray:
        return self.arrays[f"x_{split}"]

    def y(self, split: str) -> np.ndarray:
        return self.arrays[f"y_{split}"]

    def source(self, split: str) -> np.ndarray:
        return self.arrays[f"source_{split}"]

    def fragment_source(self, split: str) -> np.ndarray:
        return self.arrays[f"fragment_source_{split}"]


def digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays in key order: each key, dtype, shape and C-order bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def source_digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's digits: images (1797, 8, 8) float64 0..16, labels (1797,) int64, and the split's indices
    (sorted), ``{"train": (1437,), "test": (360,)}``: ``data.load("digits")``'s split (:func:`data.digits_source`).
    """
    from .data import digits_source

    images, labels, i_train, i_test = digits_source()
    return images, labels, {"train": np.sort(i_train), "test": np.sort(i_test)}


def upsample(images: np.ndarray) -> np.ndarray:
    """(M, 8, 8) grey levels 0..16 -> (M, 32, 32) integers 0..240: the cubic spline x4, zero outside the frame.

    ``scipy.ndimage.zoom(image, 4, order=3, mode="grid-constant", grid_mode=True)`` of every digit (a test
    checks it), computed as ``U @ image @ U.T`` with ``U`` that zoom's 1-D operator (the spline is separable),
    then clipped to 0..16, times 15, rounded.
    """
    from scipy import ndimage

    eye = np.eye(SOURCE_SIZE)
    op = np.stack([ndimage.zoom(e, UPSAMPLE, order=3, mode="grid-constant", grid_mode=True) for e in eye], axis=1)
    hires = np.einsum("mik,lk->mil", np.einsum("ij,mjk->mik", op, images), op)
    return np.round(np.clip(hires, 0, 16) * (INK_LEVELS // 16))


def tile(hires: np.ndarray) -> np.ndarray:
    """(M, S, S) upsampled digits -> one int32 image (M (S + 2) + 2, S + 2): each digit framed by zeros.

    Digit ``m`` occupies rows ``m (S + 2) + 1 ..`` and columns ``1 .. S``; two spare zero rows at the end keep
    every bilinear neighbour of a clamped coordinate inside the array.
    """
    m, size, _ = hires.shape
    framed = np.pad(hires, ((0, 0), (1, 1), (1, 1))).reshape(m * (size + 2), size + 2)
    return np.pad(framed, ((0, 2), (0, 0))).astype(np.int32)


def _sample(tiled: np.ndarray, index: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Stroke intensity in [0, 1] of digits ``index`` at source-frame coordinates (rows, cols).

    ``tiled`` from :func:`tile`; ``index`` (K,) digit numbers, ``rows``/``cols`` (K, ...) in source pixels
    (centres 0..7). Bilinear interpolation of the x4 upsampled digit, zero outside its frame -- what
    ``scipy.ndimage.map_coordinates(order=1, mode="grid-constant")`` computes (a test checks it) -- done in
    integer arithmetic: coordinates are rounded to multiples of 1/1024 (clamped into the zero border, so a
    sample never reaches the next digit) and the weighted sum of the integer intensities is exact, so the
    result cannot depend on the order of operations or on the CPU.
    """
    width = tiled.shape[1]
    size = width - 2
    flat = tiled.ravel()

    def fixed(t):  # source pixels -> upsampled pixels, in units of 1/COORD_GRID, counted from the border
        t = np.clip((t + 0.5) * UPSAMPLE - 0.5, -1, size)
        return np.round((t + 1) * COORD_GRID).astype(np.int32)

    r, c = fixed(rows), fixed(cols)
    first_row = (np.asarray(index, np.int32) * width).reshape((-1,) + (1,) * (rows.ndim - 1))
    i = ((r // COORD_GRID) + first_row) * width + c // COORD_GRID
    wr, wc = r % COORD_GRID, c % COORD_GRID
    top = flat[i] * (COORD_GRID - wc) + flat[i + 1] * wc
    bottom = flat[i + width] * (COORD_GRID - wc) + flat[i + width + 1] * wc
    return (top * (COORD_GRID - wr) + bottom * wr) / (INK_LEVELS * COORD_GRID ** 2)


def _to_source(dr, dc, scale, angle, spec: ClutterSpec):
    """Canvas offsets (dr, dc) from a digit's centre -> its source-frame coordinates (rotate back, unscale)."""
    cos, sin = np.cos(angle), np.sin(angle)
    per_px = spec.digit_size / SOURCE_SIZE * scale
    centre = (SOURCE_SIZE - 1) / 2
    return (cos * dr + sin * dc) / per_px + centre, (cos * dc - sin * dr) / per_px + centre


def _colours(u_background: np.ndarray, u_strokes: np.ndarray, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Background colours (N, 3) uniform in [0, 1)^3 and stroke colours (..., 3) whose every channel differs
    from the background's by at least ``contrast`` (offset uniform in [contrast, 1 - contrast], modulo 1)."""
    background = u_background
    offset = contrast + (1 - 2 * contrast) * u_strokes
    shape = (-1,) + (1,) * (u_strokes.ndim - 2) + (3,)
    return background, np.mod(background.reshape(shape) + offset, 1.0)


# columns of the per-image parameter table drawn for each split (documented order = stream order)
_DIGIT_COLUMNS = ("scale", "angle", "row", "col", "bg_r", "bg_g", "bg_b", "ink_r", "ink_g", "ink_b")
_FRAGMENT_COLUMNS = ("source", "scale", "angle", "row", "col", "part_r", "part_c", "ink_r", "ink_g", "ink_b")
CHUNK = 512  # images rendered at a time (memory only: the bytes do not depend on it)


def _streams(seed: int, split_id: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Three independent streams per split: the parameter table, the elastic fields, the pixel noise.

    Each is read in image order only, so rendering in chunks of any size draws the same numbers.
    """
    return tuple(np.random.Generator(np.random.PCG64([seed, split_id, k])) for k in range(3))


def draw_parameters(n: int, n_sources: int, spec: ClutterSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The random choices of ``n`` images (copy ``k`` of local source ``i`` is image ``k * n_sources + i``).

    Returns arrays: ``local`` (n,) the digit's index among the split's sources; ``scale``, ``angle`` (radians),
    ``centre_r``, ``centre_c`` (n,) of the digit; ``background``, ``ink`` (n, 3) colours in [0, 1];
    ``frag_local``, ``frag_scale``, ``frag_angle``, ``frag_top``, ``frag_left``, ``frag_part_r``,
    ``frag_part_c`` (n, fragments) and ``frag_ink`` (n, fragments, 3).
    """
    c, f, nf = spec.canvas, spec.fragment_size, spec.fragments
    table = rng.random((n, len(_DIGIT_COLUMNS) + nf * len(_FRAGMENT_COLUMNS)))
    digit = dict(zip(_DIGIT_COLUMNS, table[:, :len(_DIGIT_COLUMNS)].T, strict=True))
    frag_table = table[:, len(_DIGIT_COLUMNS):].reshape(n, nf, len(_FRAGMENT_COLUMNS))
    frag = {name: frag_table[:, :, j] for j, name in enumerate(_FRAGMENT_COLUMNS)}
    lo, hi = spec.scale
    p = {"local": np.tile(np.arange(n_sources), n // n_sources)}
    # the digit: scale, rotation, and a position that keeps its scaled frame inside the canvas
    p["scale"] = lo + (hi - lo) * digit["scale"]
    p["angle"] = np.deg2rad(spec.rotation * (2 * digit["angle"] - 1))
    half = spec.digit_size * p["scale"] / 2
    p["centre_r"] = -0.5 + half + (c - 2 * half) * digit["row"]
    p["centre_c"] = -0.5 + half + (c - 2 * half) * digit["col"]
    p["background"], p["ink"] = _colours(np.stack([digit["bg_r"], digit["bg_g"], digit["bg_b"]], axis=-1),
                                         np.stack([digit["ink_r"], digit["ink_g"], digit["ink_b"]], axis=-1),
                                         spec.contrast)
    # the clutter: another source digit of the split (never the image's own), its scale and rotation, an
    # f x f window inside the canvas, and which part of that digit's frame the window shows
    shift = 1 + np.floor(frag["source"] * (n_sources - 1)).astype(np.int64)
    p["frag_local"] = np.mod(p["local"][:, None] + shift, n_sources)
    p["frag_scale"] = lo + (hi - lo) * frag["scale"]
    p["frag_angle"] = np.deg2rad(spec.rotation * (2 * frag["angle"] - 1))
    p["frag_top"] = np.floor(frag["row"] * (c - f + 1)).astype(np.int64)
    p["frag_left"] = np.floor(frag["col"] * (c - f + 1)).astype(np.int64)
    slack = (spec.digit_size * p["frag_scale"] - f) / 2   # how far the window's centre may sit from the digit's
    p["frag_part_r"] = slack * (2 * frag["part_r"] - 1)
    p["frag_part_c"] = slack * (2 * frag["part_c"] - 1)
    _, p["frag_ink"] = _colours(p["background"], np.stack([frag["ink_r"], frag["ink_g"], frag["ink_b"]], axis=-1),
                                spec.contrast)
    return p


def elastic_displacement(field: np.ndarray, spec: ClutterSpec) -> np.ndarray:
    """Simard et al.'s displacement (n, 2, C, C) in canvas pixels from uniform [0, 1) fields (n, 2, C, C):
    ``alpha * gaussian_filter(2 field - 1, sigma)`` per image and axis."""
    from scipy import ndimage

    sigma = (0, 0, spec.elastic_sigma, spec.elastic_sigma)
    return spec.elastic_alpha * ndimage.gaussian_filter(2 * field - 1, sigma=sigma)


def digit_alpha(tiled: np.ndarray, sources: np.ndarray, p: dict[str, np.ndarray], field: np.ndarray,
                spec: ClutterSpec) -> np.ndarray:
    """Stroke intensity (n, C, C) in [0, 1] of each image's digit on the canvas.

    Canvas pixel ``q`` (row, column) shows the digit's source frame at ``R(-angle) (q + d(q) - centre) /
    (digit_size / 8 * scale) + 3.5``, with ``d`` the elastic displacement: the digit scaled, rotated by
    ``angle``, centred on ``centre``, then elastically distorted.
    """
    c = spec.canvas
    grid = np.arange(c, dtype=np.float64)
    displacement = elastic_displacement(field, spec)
    dr = grid[None, :, None] + displacement[:, 0] - p["centre_r"][:, None, None]
    dc = grid[None, None, :] + displacement[:, 1] - p["centre_c"][:, None, None]
    rows, cols = _to_source(dr, dc, p["scale"][:, None, None], p["angle"][:, None, None], spec)
    return _sample(tiled, sources[p["local"]], rows, cols)


def _render(tiled: np.ndarray, sources: np.ndarray, p: dict[str, np.ndarray], field: np.ndarray,
            noise: np.ndarray, spec: ClutterSpec) -> np.ndarray:
    """Paint one chunk: parameters ``p`` of n images, uniform fields (n, 2, C, C) float64 and uniform noise
    (n, C, C, 3) float32 in [0, 1). Returns uint8 (n, 3, C, C). Colours are composited in float32.
    """
    n, f = len(p["local"]), spec.fragment_size
    alpha = digit_alpha(tiled, sources, p, field, spec).astype(np.float32)
    background = p["background"].astype(np.float32)[:, None, None, :]
    canvas = alpha[..., None] * (p["ink"].astype(np.float32)[:, None, None, :] - background)
    canvas += background

    # the fragments, painted over in turn, each inside its f x f window
    window = np.arange(f, dtype=np.float64) - (f - 1) / 2   # window pixels relative to the window's centre
    rows, cols = _to_source(window[None, None, :, None] + p["frag_part_r"][..., None, None],
                            window[None, None, None, :] + p["frag_part_c"][..., None, None],
                            p["frag_scale"][..., None, None], p["frag_angle"][..., None, None], spec)
    frag_alpha = _sample(tiled, sources[p["frag_local"]].reshape(-1), rows.reshape(-1, f, f),
                         cols.reshape(-1, f, f)).reshape(n, -1, f, f, 1).astype(np.float32)
    frag_ink = p["frag_ink"].astype(np.float32)
    image = np.arange(n)[:, None, None]
    offsets = np.arange(f)
    for k in range(spec.fragments):
        r = (p["frag_top"][:, k, None] + offsets)[:, :, None]
        cc = (p["frag_left"][:, k, None] + offsets)[:, None, :]
        patch = canvas[image, r, cc]
        patch += frag_alpha[:, k] * (frag_ink[:, k, None, None, :] - patch)
        canvas[image, r, cc] = patch

    # pixel noise: uniform with standard deviation spec.noise; then rounded to 0..255
    half_width = np.float32(255 * spec.noise * math.sqrt(3))
    noise *= 2 * half_width
    noise += np.float32(0.5) - half_width
    canvas *= np.float32(255)
    canvas += noise
    np.floor(canvas, out=canvas)
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8).transpose(0, 3, 1, 2)


def render_split(tiled: np.ndarray, sources: np.ndarray, copies: int, split_id: int,
                 spec: ClutterSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of one split: (uint8 (N, 3, C, C), digit source (N,), fragment sources (N, fragments)).

    ``tiled`` the upsampled digits (:func:`tile`); ``sources`` the split's digit indices; image
    ``k * len(sources) + i`` is copy ``k`` of ``sources[i]``. The random numbers come from
    :func:`_streams` ``(spec.seed, split_id)``.
    """
    table_rng, field_rng, noise_rng = _streams(spec.seed, split_id)
    n, c = len(sources) * copies, spec.canvas
    p = draw_parameters(n, len(sources), spec, table_rng)
    x = np.empty((n, 3, c, c), np.uint8)
    for start in range(0, n, CHUNK):
        part = {key: value[start:start + CHUNK] for key, value in p.items()}
        m = len(part["local"])
        x[start:start + m] = _render(tiled, sources, part, field_rng.random((m, 2, c, c)),
                                     noise_rng.random((m, c, c, 3), dtype=np.float32), spec)
    return x, sources[p["local"]].astype(np.int16), sources[p["frag_local"]].astype(np.int16)


def build(spec: ClutterSpec | None = None) -> ClutteredDigits:
    """Build both splits from scratch (no cache). Deterministic: the same bytes on every run."""
    spec = spec or ClutterSpec()
    images, labels, split = source_digits()
    tiled = tile(upsample(images))
    arrays = {}
    for split_id, (name, copies) in enumerate(zip(SPLITS, spec.copies, strict=True)):
        x, source, fragment_source = render_split(tiled, split[name], copies, split_id, spec)
        arrays[f"x_{name}"] = x
        arrays[f"y_{name}"] = labels[source].astype(np.uint8)
        arrays[f"source_{name}"] = source
        arrays[f"fragment_source_{name}"] = fragment_source
    if spec == ClutterSpec() and digest(arrays) != REFERENCE_SHA256:
        warnings.warn("digits-cluttered built here differs from the reference bytes (sha256 "
                      f"{digest(arrays)[:12]}... instead of {REFERENCE_SHA256[:12]}...): this numpy/scipy draws or "
                      "rounds differently, so accuracies measured elsewhere on it may not carry over", stacklevel=2)
    return ClutteredDigits(arrays)


def cache_dir() -> Path:
    """``$INTERTWINERS_CACHE``, else ``$XDG_CACHE_HOME/intertwiners``, else ``~/.cache/intertwiners``."""
    if os.environ.get("INTERTWINERS_CACHE"):
        return Path(os.environ["INTERTWINERS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "intertwiners"


def cache_path(spec: ClutterSpec | None = None) -> Path:
    spec = spec or ClutterSpec()
    return cache_dir() / f"digits-cluttered-v{VERSION}-{spec.key()}.npz"


def _expected_layout(spec: ClutterSpec) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    _, _, split = source_digits()
    layout = {}
    for name, copies in zip(SPLITS, spec.copies, strict=True):
        n = len(split[name]) * copies
        layout[f"x_{name}"] = (np.dtype(np.uint8), (n, 3, spec.canvas, spec.canvas))
        layout[f"y_{name}"] = (np.dtype(np.uint8), (n,))
        layout[f"source_{name}"] = (np.dtype(np.int16), (n,))
        layout[f"fragment_source_{name}"] = (np.dtype(np.int16), (n, spec.fragments))
    return layout


def read_cache(path: Path, spec: ClutterSpec) -> ClutteredDigits:
    """Read and verify a cache file; any problem raises ``ValueError`` naming the file and what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {key: npz[key] for key in npz.files}
    except ValueError as err:
        raise ValueError(f"cache file {path} is not a plain .npz of arrays ({err})") from None
    except Exception as err:  # zipfile.BadZipFile, OSError, EOFError, a CRC error: all mean a damaged file
        raise ValueError(f"cache file {path} cannot be read ({type(err).__name__}: {err})") from None
    recorded = stored.pop("sha256", None)
    layout = _expected_layout(spec)
    if set(stored) != set(layout):
        raise ValueError(f"cache file {path} holds {sorted(stored)}, expected {sorted(layout)}")
    for key, (dtype, shape) in layout.items():
        if stored[key].dtype != dtype or stored[key].shape != shape:
            raise ValueError(f"cache file {path}: {key} is {stored[key].dtype} {stored[key].shape}, expected "
                             f"{dtype} {shape}")
    if recorded is None or recorded.shape != () or recorded.dtype.kind != "U":
        raise ValueError(f"cache file {path} lacks its sha256 record")
    actual = digest(stored)
    if str(recorded) != actual:
        raise ValueError(f"cache file {path} is damaged: its arrays hash to {actual[:12]}..., "
                         f"the file records {str(recorded)[:12]}...")
    return ClutteredDigits(stored)


def write_cache(built: ClutteredDigits, path: Path) -> None:
    """Write ``built`` with its sha256 under a temporary name in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, sha256=np.array(digest(built.arrays)), **built.arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(spec: ClutterSpec | None = None, cache: bool = True) -> ClutteredDigits:
    """The built arrays, from the cache when a verified file is there, else built (and cached when possible).

    A cache file that fails verification is rebuilt and replaced, with a warning naming the problem. A cache
    folder that cannot be written is warned about and skipped.
    """
    spec = spec or ClutterSpec()
    if not cache:
        return build(spec)
    path = cache_path(spec)
    if path.is_file():
        try:
            return read_cache(path, spec)
        except ValueError as err:
            warnings.warn(f"{err}; rebuilding digits-cluttered", stacklevel=2)
    built = build(spec)
    try:
        write_cache(built, path)
    except OSError as err:
        warnings.warn(f"digits-cluttered could not be cached in {path.parent} ({err}); built in memory only "
                      "(set INTERTWINERS_CACHE to a writable folder to keep it)", stacklevel=2)
    return built
