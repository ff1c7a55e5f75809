"""Reading a dataset in the Broden layout (Bau et al. 2017), the probe set of network dissection.

Layout under ``root`` (the same for real Broden and :func:`make_synthetic_broden`):

* ``index.csv``: ``image,split,ih,iw,sh,sw,<category>...``. ``image`` is a path under ``root/images``;
  ``ih, iw`` the image size, ``sh, sw`` the label resolution. Each category column holds ``;``-separated
  entries: a PNG path (pixel labels for that category) or an integer (an image-level label, used for
  ``scene`` and ``texture`` in Broden). An empty field means the image is not annotated for that category.
* ``category.csv``: ``name,...`` one row per category.
* ``label.csv``: ``number,name,category,...``; ``category`` lists ``cat(count)`` entries separated by ``;``.
  Each label belongs to the category with the largest count (its primary category).
* ``c_<category>.csv``: ``code,number,name,...``: the dense codes of the labels of one category.
* label PNGs: label number = ``R + 256 * G`` per pixel, 0 = unlabelled.

Missing or malformed files raise ``ValueError`` naming the file (and row) and what is wrong.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

INDEX_META = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_ENTRY = re.compile(r"^\s*([^()]+?)\s*\(\s*(\d+)\s*\)\s*$")


@dataclass(frozen=True)
class Concept:
    """A label: its global ``number`` (label.csv), ``name`` and primary ``category``."""

    number: int
    name: str
    category: str


@dataclass(frozen=True)
class Segmentation:
    """The labels of one image.

    ``pixel``: int64 array (K, sh, sw) of global label numbers, one channel per PNG (K may be 0);
    ``image_level``: global numbers that label the whole image; ``annotated``: categories with any entry.
    """

    pixel: np.ndarray
    image_level: tuple[int, ...]
    annotated: frozenset[str]


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"Broden dataset: missing file {path}")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"Broden dataset: {path} is not a readable CSV file: {err}") from err
    missing = [c for c in required if c not in fields]
    if missing:
        raise ValueError(f"Broden dataset: {path} lacks column(s) {missing} (has {fields})")
    for k, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"Broden dataset: {path} line {k} has a different number of fields than the header")
    return rows


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"Broden dataset: {path} line {line}: column {column!r} must be an integer, "
                         f"got {value!r}") from None


def decode_label_image(path: str | Path) -> np.ndarray:
    """A label PNG decoded as ``R + 256 * G`` (int64 array (H, W)); grayscale PNGs are taken as R."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Broden dataset: missing label image {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as err:
        raise ValueError(f"Broden dataset: cannot decode label image {path}: {err}") from err
    if arr.ndim == 2:
        return arr.astype(np.int64)
    if arr.ndim != 3 or arr.shape[2] < 2:
        raise ValueError(f"Broden dataset: label image {path} has unexpected shape {arr.shape}")
    return arr[..., 0].astype(np.int64) + 256 * arr[..., 1].astype(np.int64)


class BrodenDataset:
    """A dataset in the Broden layout (see the module docstring). ``split`` keeps only that split.

    Attributes: ``concepts`` (list of :class:`Concept`, ordered by number; the dense concept index used by
    dissection is the position in this list), ``categories`` (names, category.csv order),
    ``number_to_index`` (int64 array: global number -> concept index, -1 for none), ``records`` (the
    parsed index rows), ``class_labels`` (int64 array from ``classes.csv`` when present, else None).
    """

    def __init__(self, root: str | Path, split: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"Broden dataset: {self.root} is not a directory")
        cat_path = self.root / "category.csv"
        self.categories = [r["name"].strip() for r in _read_csv(cat_path, ("name",))]
        if not self.categories or any(not c for c in self.categories):
            raise ValueError(f"Broden dataset: {cat_path} lists no categories or an empty name")
        self.concepts = self._read_labels()
        max_number = max(c.number for c in self.concepts)
        self.number_to_index = np.full(max_number + 1, -1, dtype=np.int64)
        for i, c in enumerate(self.concepts):
            self.number_to_index[c.number] = i
        self.codes = {cat: self._read_codes(cat) for cat in self.categories}
        self.records = self._read_index(split)
        if not self.records:
            raise ValueError(f"Broden dataset: no images in {self.root / 'index.csv'}"
                             + (f" with split {split!r}" if split else ""))
        self.class_labels, self.class_names = self._read_classes()

    # -- parsing --------------------------------------------------------------------------------------
    def _read_labels(self) -> list[Concept]:
        path = self.root / "label.csv"
        concepts, seen = [], set()
        for k, row in enumerate(_read_csv(path, ("number", "name", "category")), start=2):
            number = _int(row["number"], path, k, "number")
            if number <= 0:
                continue  # 0 is "unlabelled"
            if number in seen:
                raise ValueError(f"Broden dataset: {path} line {k}: label number {number} appears twice")
            seen.add(number)
            counts = {}
            for entry in filter(None, (e.strip() for e in row["category"].split(";"))):
                m = _CATEGORY_ENTRY.match(entry)
                if m is None:
                    raise ValueError(f"Broden dataset: {path} line {k}: category entry {entry!r} is not "
                                     "of the form name(count)")
                counts[m.group(1)] = int(m.group(2))
            if not counts:
                raise ValueError(f"Broden dataset: {path} line {k}: label {number} has no category")
            unknown = [c for c in counts if c not in self.categories]
            if unknown:
                raise ValueError(f"Broden dataset: {path} line {k}: categories {unknown} are not in category.csv")
            primary = max(counts, key=lambda c: (counts[c], -self.categories.index(c)))
            concepts.append(Concept(number, row["name"].strip(), primary))
        if not concepts:
            raise ValueError(f"Broden dataset: {path} defines no labels")
        return sorted(concepts, key=lambda c: c.number)

    def _read_codes(self, cat: str) -> dict[int, int]:
        path = self.root / f"c_{cat}.csv"
        codes = {}
        for k, row in enumerate(_read_csv(path, ("code", "number")), start=2):
            codes[_int(row["code"], path, k, "code")] = _int(row["number"], path, k, "number")
        return codes

    def _read_index(self, split: str | None) -> list[dict]:
        path = self.root / "index.csv"
        rows = _read_csv(path, INDEX_META)
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        columns = [c for c in header if c not in INDEX_META]
        unknown = [c for c in columns if c not in self.categories]
        if unknown:
            raise ValueError(f"Broden dataset: {path} has column(s) {unknown} that are not categories in "
                             "category.csv")
        records = []
        for k, row in enumerate(rows, start=2):
            if split is not None and row["split"] != split:
                continue
            rec = {"image": row["image"].strip(), "split": row["split"],
                   **{c: _int(row[c], path, k, c) for c in ("ih", "iw", "sh", "sw")}, "pixel": {}, "scalar": {}}
            if not rec["image"]:
                raise ValueError(f"Broden dataset: {path} line {k}: empty image path")
            if min(rec["ih"], rec["iw"], rec["sh"], rec["sw"]) <= 0:
                raise ValueError(f"Broden dataset: {path} line {k}: sizes must be positive")
            for cat in columns:
                for entry in filter(None, (e.strip() for e in row[cat].split(";"))):
                    if entry.isdigit():
                        number = int(entry)
                        if number >= len(self.number_to_index) or self.number_to_index[number] < 0:
                            raise ValueError(f"Broden dataset: {path} line {k}: label {number} in column "
                                             f"{cat!r} is not in label.csv")
                        rec["scalar"].setdefault(cat, []).append(number)
                    else:
                        rec["pixel"].setdefault(cat, []).append(entry)
            records.append(rec)
        return records

    def _read_classes(self) -> tuple[np.ndarray | None, list[str] | None]:
        path = self.root / "classes.csv"
        if not path.is_file():
            return None, None
        rows = _read_csv(path, ("image", "class"))
        by_image = {}
        names: dict[int, str] = {}
        for k, row in enumerate(rows, start=2):
            cls = _int(row["class"], path, k, "class")
            by_image[row["image"].strip()] = cls
            if row.get("name"):
                names[cls] = row["name"]
        missing = [r["image"] for r in self.records if r["image"] not in by_image]
        if missing:
            raise ValueError(f"Broden dataset: {path} has no class for {missing[:3]}")
        labels = np.array([by_image[r["image"]] for r in self.records], dtype=np.int64)
        n = int(labels.max()) + 1 if len(labels) else 0
        return labels, [names.get(c, str(c)) for c in range(n)]

    # -- access ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    @property
    def label_shape(self) -> tuple[int, int]:
        """(sh, sw) when every image shares it (ValueError otherwise)."""
        shapes = {(r["sh"], r["sw"]) for r in self.records}
        if len(shapes) != 1:
            raise ValueError(f"images have different label resolutions {sorted(shapes)[:4]}...")
        return next(iter(shapes))

    @property
    def concept_names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def concept_categories(self) -> np.ndarray:
        """int64 array (num_concepts,): index into ``categories`` of each concept's primary category."""
        return np.array([self.categories.index(c.category) for c in self.concepts], dtype=np.int64)

    def image_path(self, i: int) -> Path:
        return self.root / "images" / self.records[i]["image"]

    def load_image(self, i: int, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """Image ``i`` as uint8 RGB (H, W, 3); resized bilinearly to ``size`` (side or (H, W)) when given."""
        path = self.image_path(i)
        if not path.is_file():
            raise ValueError(f"Broden dataset: missing image {path}")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if size is not None:
                    h, w = (size, size) if isinstance(size, int) else size
                    im = im.resize((w, h), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
        except OSError as err:
            raise ValueError(f"Broden dataset: cannot decode image {path}: {err}") from err

    def segmentation(self, i: int) -> Segmentation:
        """The labels of image ``i`` (global numbers; see :class:`Segmentation`)."""
        rec = self.records[i]
        shape = (rec["sh"], rec["sw"])
        channels = []
        for cat, files in rec["pixel"].items():
            for name in files:
                lab = decode_label_image(self.root / "images" / name)
                if lab.shape != shape:
                    raise ValueError(f"Broden dataset: label image {name} has size {lab.shape}, but index.csv "
                                     f"says sh, sw = {shape}")
                if lab.max() >= len(self.number_to_index) or (self.number_to_index[lab[lab > 0]] < 0).any():
                    bad = sorted(set(np.unique(lab[lab > 0]).tolist())
                                 - set(c.number for c in self.concepts))[:5]
                    raise ValueError(f"Broden dataset: label image {name} ({cat}) uses label numbers {bad} "
                                     "that are not in label.csv")
                channels.append(lab)
        pixel = np.stack(channels) if channels else np.zeros((0, *shape), dtype=np.int64)
        scalars = tuple(n for nums in rec["scalar"].values() for n in nums)
        return Segmentation(pixel, scalars, frozenset(rec["pixel"]) | frozenset(rec["scalar"]))

    def pixel_labels(self, i: int, category: str) -> np.ndarray:
        """Label numbers (K, sh, sw) of ``category`` in image ``i`` (image-level labels broadcast to the map)."""
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; known: {self.categories}")
        rec = self.records[i]
        shape = (rec["sh"], rec["sw"])
        out = [decode_label_image(self.root / "images" / f) for f in rec["pixel"].get(category, [])]
        out += [np.full(shape, n, dtype=np.int64) for n in rec["scalar"].get(category, [])]
        return np.stack(out) if out else np.zeros((0, *shape), dtype=np.int64)


# Normalisation of images for models (ImageNet statistics, as torchvision models on real Broden expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_tensor(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 RGB images (N, H, W, 3) -> float32 tensor (N, 3, H, W): ``(x / 255 - mean) / std``."""
    import torch

    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) RGB, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def load_images(dataset: BrodenDataset, indices, size: int | tuple[int, int] | None = None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Images ``indices`` of ``dataset`` as one normalised float32 tensor (B, 3, H, W).

    Without ``size`` every image must have the same (ih, iw); ValueError otherwise.
    """
    arrays = [dataset.load_image(int(i), size) for i in indices]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:3]}; pass an image size to resize them")
    return images_to_tensor(np.stack(arrays), mean, std)
