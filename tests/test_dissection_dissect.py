"""Network dissection: against a slow reference, on known concept detectors, under rotations and permutations."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from intertwiners.dissection import BrodenDataset, dissect, dissect_many, make_synthetic_broden, random_rotation
from intertwiners.dissection.broden import IMAGENET_MEAN, IMAGENET_STD, load_images
from intertwiners.dissection.dissect import quantile_from_top, topk_size
from intertwiners.dissection.synthetic import COLORS

N_COLOURS = len(COLORS)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dissect_probe")
    make_synthetic_broden(root, n_images=48, seed=0, image_size=16)
    return BrodenDataset(root)


@pytest.fixture(scope="module")
def small_labels_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dissect_ref")
    make_synthetic_broden(root, n_images=20, seed=2, image_size=16, label_size=16)
    return BrodenDataset(root)


class ColourProbe(nn.Module):
    """Units 0..7: relu(1 - |x - z_c|^2 / r^2), a detector of colour c (in normalised RGB); then
    ``n_noise`` units that output a fixed random map, whatever the image (detect nothing)."""

    def __init__(self, n_noise: int = 8, size: int = 16, order=None, seed: int = 0):
        super().__init__()
        rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
        z = (rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        noise = torch.randn(n_noise, size, size, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("centres", z)
        self.register_buffer("noise", noise)
        self.order = list(range(N_COLOURS + n_noise)) if order is None else list(order)
        self.act = nn.ReLU()

    def forward(self, x):
        d = ((x[:, None] - self.centres[None, :, :, None, None]) ** 2).sum(2)
        noise = self.noise[None].expand(x.shape[0], -1, -1, -1)
        return self.act(torch.cat([1 - d / 0.5, noise], dim=1)[:, self.order])


Q_SYNTH = dict(quantile=0.05, iou_threshold=0.1)  # the synthetic concepts are large: see experiment.py


def test_probe_detectors_are_found_with_their_concepts(probe_data):
    res = dissect(ColourProbe(), "act", probe_data, **Q_SYNTH)
    names = list(COLORS)
    for u in res.units[:N_COLOURS]:
        assert u.interpretable and u.category == "color" and u.concept == names[u.unit], u
    assert not any(u.interpretable for u in res.units[N_COLOURS:])
    assert res.interpretable_units == N_COLOURS and res.unique_concepts == N_COLOURS
    assert res.counts_by_category()["color"] == N_COLOURS


def test_rotation_mixes_the_detectors(probe_data):
    model = ColourProbe()
    n = N_COLOURS + 8
    rotations = [None] + [random_rotation(n, torch.Generator().manual_seed(s)) for s in range(3)]
    plain, *rotated = dissect_many(model, "act", probe_data, rotations, **Q_SYNTH)
    for r in rotated:
        assert r.interpretable_units < plain.interpretable_units, [x.interpretable_units for x in rotated]
    assert sum(r.interpretable_units for r in rotated) / len(rotated) <= 0.6 * plain.interpretable_units
    # the identity as a matrix is the unit basis
    same = dissect(model, "act", probe_data, rotation=torch.eye(n), **Q_SYNTH)
    assert torch.equal(same.iou, plain.iou)


def test_permuting_units_only_relabels_them(probe_data):
    n = N_COLOURS + 8
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    base = dissect(ColourProbe(), "act", probe_data, **Q_SYNTH)
    permuted = dissect(ColourProbe(order=perm), "act", probe_data, **Q_SYNTH)
    assert torch.equal(permuted.iou, base.iou[perm])
    assert torch.equal(permuted.thresholds, base.thresholds[perm])
    assert [(u.concept, u.iou, u.interpretable) for u in permuted.units] == \
        [(base.units[p].concept, base.units[p].iou, base.units[p].interpretable) for p in perm]
    assert (permuted.interpretable_units, permuted.unique_concepts) == (base.interpretable_units,
                                                                       base.unique_concepts)
    # the same permutation given as a rotation matrix P (units read as P a)
    p = torch.eye(n)[perm]
    as_rotation = dissect(ColourProbe(), "act", probe_data, rotation=p, **Q_SYNTH)
    assert torch.equal(as_rotation.iou, permuted.iou)


@given(n=st.integers(1, 400), q=st.floats(0.001, 0.5), seed=st.integers(0, 1000))
def test_streaming_quantile_matches_torch_quantile(n, q, seed):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed))
    x[1] = x[1].round()  # ties
    k = topk_size(n, q)
    top = x.topk(k, dim=1).values[:, torch.randperm(k)]  # any order
    expected = torch.quantile(x.double(), 1 - q, dim=1).float()  # float64 ranks: torch rounds them in float32
    assert torch.allclose(quantile_from_top(top, n, q), expected, rtol=1e-6, atol=1e-6)


# -- an independent slow implementation -------------------------------------------------------------
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres, edges clamped."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def slow_dissect(features: np.ndarray, ds: BrodenDataset, quantile: float, rotation=None) -> np.ndarray:
    """IoU (U, C) with plain loops: per-unit quantile, bilinear upsampling, NetDissect counting."""
    f = features.astype(np.float64)
    if rotation is not None:
        f = np.einsum("uv,nvhw->nuhw", rotation, f)
    n, units, h, w = f.shape
    thr = np.quantile(f.transpose(1, 0, 2, 3).reshape(units, -1), 1 - quantile, axis=1)
    sh, sw = ds.label_shape
    wy, wx = _bilinear_matrix(h, sh), _bilinear_matrix(w, sw)
    concepts = ds.concepts
    inter = np.zeros((units, len(concepts)))
    label_area = np.zeros(len(concepts))
    mask_cat = np.zeros((units, len(ds.categories)))
    for i in range(n):
        seg = ds.segmentation(i)
        masks = [(wy @ f[i, u] @ wx.T) > thr[u] for u in range(units)]
        for c, concept in enumerate(concepts):
            if concept.number in seg.image_level:
                lab = np.ones((sh, sw), dtype=bool)
            else:
                lab = (seg.pixel == concept.number).any(axis=0)
            label_area[c] += lab.sum()
            for u in range(units):
                inter[u, c] += (masks[u] & lab).sum()
        for k, cat in enumerate(ds.categories):
            if cat in seg.annotated:
                for u in range(units):
                    mask_cat[u, k] += masks[u].sum()
    cat_of = [ds.categories.index(c.category) for c in concepts]
    union = mask_cat[:, cat_of] + label_area[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = Inner()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean((2, 3))


@pytest.mark.parametrize("site", ["body:relu", "body", "body.conv"])
def test_matches_slow_reference_with_upsampling_and_rotation(small_labels_data, site):
    ds = small_labels_data
    model = Nested().eval()
    x = load_images(ds, range(len(ds)))
    with torch.no_grad():
        feats = (model.body.conv(x) if site == "body.conv" else model.body(x)).numpy()
    assert feats.shape[2:] == (8, 8) and ds.label_shape == (16, 16)  # upsampling is exercised
    q = random_rotation(6, torch.Generator().manual_seed(1))
    for rotation in (None, q):
        res = dissect(model, site, ds, rotation=rotation, quantile=0.1, batch_size=7, device="cpu")
        expected = slow_dissect(feats, ds, 0.1, None if rotation is None else q.numpy())
        assert np.allclose(res.iou.numpy(), expected, atol=1e-12)


def test_two_pass_and_batch_size_give_identical_results(small_labels_data):
    model = Nested()
    a = dissect(model, "body:relu", small_labels_data, quantile=0.05)
    b = dissect(model, "body:relu", small_labels_data, quantile=0.05, cache_bytes=0, batch_size=3)
    assert torch.equal(a.iou, b.iou) and torch.equal(a.thresholds, b.thresholds)


def test_result_csv_and_counts(small_labels_data, tmp_path):
    res = dissect(Nested(), "body", small_labels_data, quantile=0.1, iou_threshold=0.05)
    path = res.to_csv(tmp_path / "units.csv")
    rows = list(csv.DictReader(open(path)))
    assert [int(r["unit"]) for r in rows] == list(range(6))
    assert [r["concept"] for r in rows] == [u.concept for u in res.units]
    assert sum(int(r["interpretable"]) for r in rows) == res.interpretable_units
    assert res.interpretable_units == int((res.iou.max(1).values > 0.05).sum())
    assert res.unique_concepts == len({u.concept for u in res.units if u.interpretable})
    assert ((res.iou >= 0) & (res.iou <= 1)).all()


def test_linear_layer_sites_are_spatially_constant(small_labels_data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5), nn.ReLU())
    res = dissect(model, "2", small_labels_data, quantile=0.2)
    assert res.iou.shape == (5, len(small_labels_data.concepts))


def test_bad_arguments_raise(small_labels_data):
    model = Nested()
    with pytest.raises(ValueError, match="unknown site"):
        dissect(model, "body.nothing", small_labels_data)
    with pytest.raises(ValueError, match="rotation must be"):
        dissect(model, "body", small_labels_data, rotation=torch.eye(5))
    with pytest.raises(ValueError, match="quantile"):
        dissect(model, "body", small_labels_data, quantile=0)
    with pytest.raises(ValueError, match="could not run"):
        dissect(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), "1", small_labels_data)  # a 1-channel model
    with pytest.raises(ValueError, match="BrodenDataset"):
        dissect(model, "body", torch.zeros(2, 3, 16, 16))
