"""Datasets: scikit-learn's bundled ``digits`` (no download), ``digits-cluttered`` built from them
(:mod:`intertwiners.cluttered`), and CIFAR-10 from the standard python batches.

``load(name, root=None)`` returns ``(train, test)`` as :class:`ArrayDataset` objects holding normalised
float32 images (N, C, H, W) and int64 labels. CIFAR batches are read with an unpickler that admits only
the NumPy array constructors that format needs, so a crafted batch file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS = ("digits", "digits-cluttered", "cifar10")


@dataclass
class ArrayDataset(Dataset):
    """Images ``x`` (N, C, H, W) float32, labels ``y`` (N,) int64, with the augmentation that suits them.

    ``flip``: random horizontal flips are label-preserving; ``translate``: max shift in pixels.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    flip: bool = False
    translate: int = 0

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise ValueError(f"ArrayDataset needs torch tensors x and y, got {type(self.x).__name__} and "
                             f"{type(self.y).__name__}")
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset needs x (N, C, H, W) and y (N,), got {tuple(self.x.shape)} "
                             f"and {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    @property
    def dataset(self) -> str:
        """The dataset this part comes from: ``"digits-cluttered"`` for ``"digits-cluttered-train-val"``."""
        return dataset_of(self.name)

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ArrayDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset(self.x[index], self.y[index], self.num_classes, name or self.name,
                            self.flip, self.translate)

    def split(self, fraction: float, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
        """Carve a held-out part (e.g. validation) of ``fraction`` of the samples, seeded, stratified-free."""
        if not 0 < fraction < 1:
            raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        n_held = max(1, int(round(fraction * len(self))))
        return self.subset(perm[n_held:], self.name), self.subset(perm[:n_held], self.name + "-val")


def dataset_of(name: str) -> str:
    """The dataset name in a part's name ``<dataset>-<part>`` (the longest known dataset name it starts with)."""
    known = [d for d in DATASETS if name == d or name.startswith(d + "-")]
    return max(known, key=len) if known else name.split("-")[0]


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool, translate: int) -> torch.Tensor:
    """The paper's augmentation on a batch (N, C, H, W): random horizontal flip, random translation.

    Translation pads with zeros by ``translate`` pixels and crops back at a random offset per image.
    """
    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)
    if translate > 0:
        t = translate
        padded = F.pad(x, (t, t, t, t))
        dy = torch.randint(0, 2 * t + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * t + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
        idx_n = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x.contiguous()


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return (train - mean) / std, (test - mean) / std


def digits_source(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits and their fixed split: ``(images, labels, i_train, i_test)``.

    images (1797, 8, 8) float64 grey levels 0..16, labels (1797,) int64; the split is stratified and seeded
    (``train_test_split(random_state=seed)``), 1,437 / 360 by default. ``digits`` and ``digits-cluttered``
    both use it, so their test sets come from the same source digits.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if not (isinstance(test_fraction, int | float) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    bunch = sk_digits()
    labels = bunch.target.astype(np.int64)
    i_train, i_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                       stratify=labels)
    return bunch.images.astype(np.float64), labels, i_train, i_test


def load_digits(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 8x8 digits, upsampled (bilinear) to ``size`` x ``size``, 1 channel.

    A fixed seeded stratified split (default 1,437 train / 360 test); per-channel normalisation from
    the training part. Augmentation: translation by 1 px, no flips (digits are not mirror-symmetric).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"digits size must be a positive multiple of 8, got {size!r}")
    raw, labels, i_train, i_test = digits_source(test_fraction, seed)
    images = raw.astype(np.float32)[:, None] / 16.0
    if size != 8:
        images = F.interpolate(torch.from_numpy(images), size=(size, size), mode="bilinear",
                               align_corners=False).numpy()
    x_train, x_test = _normalise(images[i_train], images[i_test])
    make = lambda x, y, tag: ArrayDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),  # noqa: E731
                                          10, f"digits-{tag}", flip=False, translate=1)
    return make(x_train, labels[i_train], "train"), make(x_test, labels[i_test], "test")


def load_cluttered_digits(spec=None, cache: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
    """``digits-cluttered``: 3x32x32 colour images of transformed digits among clutter (see :mod:`.cluttered`).

    5,748 train / 1,440 test images (4 per source digit of ``digits``' split), built deterministically in
    seconds and cached (``cache=False``: always build, never read or write the cache). ``spec``: a
    :class:`~intertwiners.cluttered.ClutterSpec` for a variant (default: the documented construction).
    Per-channel normalisation from the training part; augmentation: translation by 2 px, no flips.
    """
    from .cluttered import load_arrays

    built = load_arrays(spec, cache=cache)
    x_train, x_test = _normalise(built.x("train").astype(np.float32) / 255.0,
                                 built.x("test").astype(np.float32) / 255.0)
    make = lambda x, y, tag: ArrayDataset(torch.from_numpy(np.ascontiguousarray(x)),  # noqa: E731
                                          torch.from_numpy(y.astype(np.int64)), 10, f"digits-cluttered-{tag}",
                                          flip=False, translate=2)
    return make(x_train, built.y("train"), "train"), make(x_test, built.y("test"), "test")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits only the globals that a CIFAR python batch (a dict of bytes, lists and arrays) needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays and lists "
                             "(this file is not a genuine CIFAR-10 batch)")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CIFAR-10 batch {path} is missing")
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a readable CIFAR-10 python batch: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise ValueError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels' entries, found {sorted(obj)}")
    data = np.asarray(obj["data"])
    try:
        raw_labels = np.asarray(obj["labels"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: 'labels' is not a list of integers ({err})") from None
    # labels are never cast blindly: 0.5 or 1.7 must not become 0 and 1
    if raw_labels.ndim != 1 or raw_labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be a flat list of integers 0..9, got {raw_labels.dtype} values of "
                         f"shape {raw_labels.shape}" + (f" (e.g. {raw_labels.flat[0]!r})" if raw_labels.size else ""))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(raw_labels):
        raise ValueError(f"{path}: 'data' must be uint8 (N, 3072) matching {len(raw_labels)} labels, "
                         f"got {data.dtype} {data.shape}")
    if len(raw_labels) == 0:
        raise ValueError(f"{path}: the batch holds no images")
    if raw_labels.min() < 0 or raw_labels.max() > 9:
        raise ValueError(f"{path}: labels must lie in 0..9, found {int(raw_labels.min())}..{int(raw_labels.max())}")
    return data.reshape(-1, 3, 32, 32), raw_labels.astype(np.int64)


def load_cifar10(root: str | Path | None) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 from ``root`` holding ``data_batch_1..5`` and ``test_batch`` (or ``root/cifar-10-batches-py``)."""
    if root is None:
        raise ValueError("cifar10 needs root=DIR (the folder with data_batch_1..5 and test_batch); "
                         "nothing is downloaded")
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise ValueError(f"CIFAR-10 folder {root} does not exist")
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*names, "test_batch"] if not (root / n).is_file()]
    if missing:
        raise ValueError(f"CIFAR-10 folder {root} lacks {', '.join(missing)}")
    parts = [read_cifar_batch(root / n) for n in names]
    x_train = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = read_cifar_batch(root / "test_batch")
    x_train, x_test = _normalise(x_train, x_test.astype(np.float32) / 255.0)
    return (ArrayDataset(torch.from_numpy(x_train), torch.from_numpy(y_train), 10, "cifar10-train", True, 2),
            ArrayDataset(torch.from_numpy(x_test), torch.from_numpy(y_test), 10, "cifar10-test", True, 2))


def load(name: str, root: str | Path | None = None, **kwargs) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` for ``"digits"`` (bundled), ``"digits-cluttered"`` (built from digits, cached) or
    ``"cifar10"`` (python batches under ``root``)."""
    if name == "digits":
        return load_digits(**kwargs)
    if name == "digits-cluttered":
        return load_cluttered_digits(**kwargs)
    if name == "cifar10":
        return load_cifar10(root)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
