"""A small synthetic stand-in for Broden, written in exactly the Broden layout.

Every image shows one object (a shape) on a background. Known concepts, numbered globally 1..L:

* ``color`` (pixel labels): the base colour of each region (object or background), from :data:`COLORS`;
* ``object`` (pixel labels): the shape of the object (:data:`SHAPES`); background pixels are 0;
* ``texture`` (pixel labels): regions painted with a pattern (:data:`TEXTURES`: stripes, checks, dots
  darken part of the region); plain regions are 0;
* ``scene`` (one label for the whole image): ``day`` or ``night`` (the whole image dimmed).

The class of an image (for training models on it) is the index of its object's shape; it is written
to ``classes.csv`` (``image,class,name``), a file the Broden layout does not have and readers ignore.
Images are RGB PNGs with a little Gaussian noise; label PNGs hold ``R + 256 * G`` = global label number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 50),
    "cyan": (50, 210, 220), "magenta": (200, 50, 200), "white": (235, 235, 235), "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("striped", "checkered", "dotted")
SCENES = ("day", "night")
CATEGORIES = ("color", "object", "texture", "scene")
PIXEL_CATEGORIES = ("color", "object", "texture")
IMAGE_CATEGORIES = ("scene",)


def label_table() -> list[tuple[int, str, str]]:
    """``[(number, name, category), ...]``: the global label numbers of the synthetic concepts (1-based)."""
    rows: list[tuple[int, str, str]] = []
    for cat, names in (("color", list(COLORS)), ("object", list(SHAPES)), ("texture", list(TEXTURES)),
                       ("scene", list(SCENES))):
        for name in names:
            rows.append((len(rows) + 1, name, cat))
    return rows


@dataclass
class SyntheticBroden:
    """What :func:`make_synthetic_broden` drew: the ground truth to compare a reader against.

    ``pixel_labels[cat]``: int array (N, label_size, label_size) of global label numbers (0 = none);
    ``image_labels[cat]``: int array (N,); ``classes``: (N,) shape index; ``split``: list of "train"/"val".
    """

    root: Path
    images: list[str]
    split: list[str]
    classes: np.ndarray
    class_names: tuple[str, ...]
    pixel_labels: dict[str, np.ndarray] = field(default_factory=dict)
    image_labels: dict[str, np.ndarray] = field(default_factory=dict)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base down
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= 0.5 * (dy + r))
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture_dark(texture: str, yy: np.ndarray, xx: np.ndarray, period: int, phase: int,
                  orientation: int) -> np.ndarray:
    """Where a texture darkens its region (bool (H, W))."""
    if texture == "striped":
        coord = (yy, xx, yy + xx)[orientation]
        return ((coord + phase) // period) % 2 == 0
    if texture == "checkered":
        return (((yy + phase) // period) + ((xx + phase) // period)) % 2 == 0
    if texture == "dotted":
        return (((yy + phase) % (period + 1)) < 2) & (((xx + phase) % (period + 1)) < 2)
    raise ValueError(f"unknown texture {texture!r}")


def draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int],
                                                               int]:
    """One synthetic image: ``(rgb uint8 (size, size, 3), pixel labels {cat: (size, size)}, image labels
    {cat: number}, class)``; labels are global numbers from :func:`label_table`."""
    numbers = {(cat, name): num for num, name, cat in label_table()}
    color_names = list(COLORS)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    iy, ix = np.mgrid[0:size, 0:size]
    bg, fg = rng.choice(len(color_names), size=2, replace=False)
    shape = int(rng.integers(len(SHAPES)))
    r = rng.uniform(size / 5, size / 2.6)
    cy, cx = rng.uniform(r * 0.6, size - r * 0.6, size=2)
    obj = _shape_mask(SHAPES[shape], yy + 0.5, xx + 0.5, cy, cx, r)
    if not obj.any():  # a degenerate draw: put a pixel at the centre so every image has an object
        obj[int(min(cy, size - 1)), int(min(cx, size - 1))] = True

    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = COLORS[color_names[bg]]
    img[obj] = COLORS[color_names[fg]]
    color = np.where(obj, numbers[("color", color_names[fg])], numbers[("color", color_names[bg])])
    texture = np.zeros((size, size), dtype=np.int64)
    # object texture: plain or one of TEXTURES; background texture: plain half of the time
    obj_tex = int(rng.integers(len(TEXTURES) + 1)) - 1
    bg_tex = int(rng.integers(2 * len(TEXTURES))) - len(TEXTURES)
    for region, tex in ((obj, obj_tex), (~obj, bg_tex)):
        if tex < 0:
            continue
        dark = _texture_dark(TEXTURES[tex], iy, ix, int(rng.integers(2, 4)), int(rng.integers(4)),
                             int(rng.integers(3))) & region
        img[dark] *= 0.45
        texture[region] = numbers[("texture", TEXTURES[tex])]
    scene = int(rng.integers(len(SCENES)))
    if SCENES[scene] == "night":
        img *= 0.5
    img += rng.normal(0.0, 6.0, size=img.shape)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    pixel = {"color": color, "object": np.where(obj, numbers[("object", SHAPES[shape])], 0), "texture": texture}
    return rgb, pixel, {"scene": numbers[("scene", SCENES[scene])]}, shape


def encode_label_png(labels: np.ndarray) -> Image.Image:
    """An RGB image with R = number % 256, G = number // 256 (the Broden label encoding)."""
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= 256 * 256:
        raise ValueError("label numbers must be in [0, 65535] to be encoded as R + 256*G")
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb, mode="RGB")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_synthetic_broden(root: str | Path, n_images: int = 256, seed: int = 0, *, image_size: int = 32,
                          label_size: int | None = None, val_fraction: float = 0.25) -> SyntheticBroden:
    """Write a synthetic dataset in the Broden layout under ``root`` and return what was drawn.

    ``image_size``: side of the square RGB images; ``label_size``: side of the label maps (default
    ``image_size``; must divide it: labels are the drawn masks sampled at the centre of each block, as
    Broden's labels are at a lower resolution than its images). The last ``val_fraction`` of the images
    get split ``val``, the others ``train``. Deterministic for a given ``seed``. Existing files of an
    earlier dataset in ``root`` are overwritten.
    """
    if int(n_images) != n_images or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    label_size = image_size if label_size is None else int(label_size)
    if label_size < 1 or image_size % label_size:
        raise ValueError(f"label_size ({label_size}) must divide image_size ({image_size})")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root)
    (root / "images" / "synthetic").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    step = image_size // label_size
    start = step // 2
    n_val = int(round(n_images * val_fraction))
    table = label_table()
    freq = {num: 0 for num, _, _ in table}
    cover = {num: 0.0 for num, _, _ in table}
    drawn = SyntheticBroden(root, [], [], np.zeros(n_images, dtype=np.int64), SHAPES,
                            {c: np.zeros((n_images, label_size, label_size), dtype=np.int64)
                             for c in PIXEL_CATEGORIES},
                            {c: np.zeros(n_images, dtype=np.int64) for c in IMAGE_CATEGORIES})
    index_rows, class_rows = [], []
    width = max(4, len(str(n_images - 1)))
    for i in range(n_images):
        rgb, pixel, image_level, cls = draw_image(rng, image_size)
        stem = f"synthetic/{i:0{width}d}"
        Image.fromarray(rgb, mode="RGB").save(root / "images" / f"{stem}.png")
        row = [f"{stem}.png", "val" if i >= n_images - n_val else "train", image_size, image_size,
               label_size, label_size]
        for cat in PIXEL_CATEGORIES:
            lab = pixel[cat][start::step, start::step]
            drawn.pixel_labels[cat][i] = lab
            encode_label_png(lab).save(root / "images" / f"{stem}_{cat}.png")
            row.append(f"{stem}_{cat}.png")
            for num, count in zip(*np.unique(lab[lab > 0], return_counts=True)):
                freq[int(num)] += 1
                cover[int(num)] += count / lab.size
        for cat in IMAGE_CATEGORIES:
            num = image_level[cat]
            drawn.image_labels[cat][i] = num
            row.append(str(num))
            freq[num] += 1
            cover[num] += 1.0
        index_rows.append(row)
        class_rows.append([f"{stem}.png", cls, SHAPES[cls]])
        drawn.images.append(f"{stem}.png")
        drawn.split.append(row[1])
        drawn.classes[i] = cls
    _write_csv(root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES], index_rows)
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               [[num, name, f"{cat}({freq[num]})", freq[num], f"{cover[num]:.4f}", ""] for num, name, cat in table])
    cat_rows = []
    for cat in CATEGORIES:
        members = [(num, name) for num, name, c in table if c == cat]
        cat_rows.append([cat, members[0][0], members[-1][0], len(members),
                         sum(1 for r in index_rows if r[6 + CATEGORIES.index(cat)])])
        _write_csv(root / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[code, num, name, freq[num], f"{cover[num]:.4f}"]
                    for code, (num, name) in enumerate(members, start=1)])
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], cat_rows)
    _write_csv(root / "classes.csv", ["image", "class", "name"], class_rows)
    return drawn
