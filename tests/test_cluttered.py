"""digits-cluttered: sizes, the exact bytes, no train/test leakage, the geometry against scipy, the cache."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from intertwiners import cluttered, data

# sha256 of the default build (cluttered.digest): any change to the construction, the seed or the random
# streams changes it; so would a numpy/scipy that draws or rounds differently.
EXPECTED_SHA256 = "603d775938e1f3986e6a76eb9c370c6cf0e0cc6d8f654a3ac3cf2a43966d93d6"
SMALL = cluttered.ClutterSpec(copies=(1, 1))


@pytest.fixture(scope="module")
def built():
    return cluttered.build()


@pytest.fixture(scope="module")
def small_built():
    return cluttered.build(SMALL)


@pytest.fixture(scope="module")
def sources():
    images, labels, split = cluttered.source_digits()
    return images, labels, split


@pytest.fixture(scope="module")
def cached(built, tmp_path_factory):
    """A cache folder holding the default build, named by INTERTWINERS_CACHE while the module's tests run."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTERTWINERS_CACHE", str(folder))
        cluttered.write_cache(built, cluttered.cache_path())
        yield folder


def test_sizes_dtypes_and_label_balance(built, sources):
    _, labels, split = sources
    assert built.x("train").shape == (5748, 3, 32, 32) and built.x("test").shape == (1440, 3, 32, 32)
    assert built.x("train").dtype == np.uint8 and built.y("train").dtype == np.uint8
    for name, copies in (("train", 4), ("test", 4)):
        # every source digit gives `copies` images, so the classes are as balanced as digits' stratified split
        assert np.array_equal(np.bincount(built.y(name), minlength=10),
                              copies * np.bincount(labels[split[name]], minlength=10))
        assert np.array_equal(built.y(name), labels[built.source(name)])
        assert np.array_equal(np.sort(built.source(name)), np.sort(np.repeat(split[name], copies)))
    # the images use the whole range and every channel (random colours, noise)
    x = built.x("train")
    assert x.min() == 0 and x.max() == 255
    assert np.all(np.abs(x.reshape(len(x), 3, -1).mean(axis=(0, 2)) - 127.5) < 5)


def test_identical_bytes(built):
    assert cluttered.digest(built.arrays) == EXPECTED_SHA256 == cluttered.REFERENCE_SHA256


def test_digest_sees_every_byte(small_built):
    arrays = {k: v.copy() for k, v in small_built.arrays.items()}
    before = cluttered.digest(arrays)
    arrays["x_test"][17, 2, 5, 9] ^= 1
    assert cluttered.digest(arrays) != before
    arrays["x_test"][17, 2, 5, 9] ^= 1
    assert cluttered.digest(arrays) == before
    assert cluttered.digest({**arrays, "y_test": arrays["y_test"].astype(np.int64)}) != before


def test_fewer_copies_are_a_prefix_whatever_the_chunks(built, small_built, monkeypatch):
    # the random streams are read in image order, so copy 0 of the full build is the one-copy build, although
    # their rendering chunks end at different images
    n_train, n_test = len(small_built.y("train")), len(small_built.y("test"))
    for key, value in small_built.arrays.items():
        n = n_train if key.endswith("train") else n_test
        assert np.array_equal(value, built.arrays[key][:n]), key
    # and the chunk size never changes a byte
    _, _, split = cluttered.source_digits()
    tiled = cluttered.tile(cluttered.upsample(cluttered.source_digits()[0]))
    whole = cluttered.render_split(tiled, split["test"][:40], 2, 1, SMALL)
    monkeypatch.setattr(cluttered, "CHUNK", 7)
    chunked = cluttered.render_split(tiled, split["test"][:40], 2, 1, SMALL)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))


def test_no_train_test_leakage(built, sources):
    _, _, split = sources
    assert not set(split["train"]) & set(split["test"])
    for name in ("train", "test"):
        own = set(split[name].tolist())
        # the digit and every clutter fragment come from this split's source digits
        assert set(built.source(name).tolist()) == own
        assert set(built.fragment_source(name).ravel().tolist()) <= own
        # a fragment is never cut from the image's own digit
        assert not np.any(built.fragment_source(name) == built.source(name)[:, None])
    # the split is digits' split: the test images are made of digits' test digits only
    assert np.array_equal(split["test"], np.sort(data.digits_source()[3]))


def test_sampling_is_scipy_bilinear(sources):
    images = sources[0][:20]
    hires = cluttered.upsample(images)
    tiled = cluttered.tile(hires)
    rng = np.random.default_rng(1)
    index = rng.integers(0, 20, 12)
    rows, cols = rng.uniform(-3, 10, (2, 12, 9, 9))  # source pixels, partly outside the 8x8 frame
    ours = cluttered._sample(tiled, index, rows, cols)

    def grid(t):  # the same 1/1024 rounding of the upsampled coordinate
        return np.round(((t + 0.5) * 4 - 0.5) * 1024) / 1024

    for k, m in enumerate(index):
        ref = ndimage.map_coordinates(hires[m], [grid(rows[k]), grid(cols[k])], order=1, mode="grid-constant",
                                      cval=0.0, prefilter=False) / 240
        assert np.array_equal(ours[k], ref)
    assert ours.min() == 0 and 0.2 < ours.max() <= 1


def test_upsampling_is_scipy_zoom(sources):
    images = sources[0][:50]
    ref = np.stack([ndimage.zoom(img, 4, order=3, mode="grid-constant", grid_mode=True) for img in images])
    assert np.array_equal(cluttered.upsample(images), np.round(np.clip(ref, 0, 16) * 15))


def test_digit_geometry_is_scipy_affine_transform(sources):
    # without elastic distortion, the digit is its upsampled image under one affine map: scale, rotation, shift
    spec = cluttered.ClutterSpec(elastic_alpha=0.0, rotation=40.0)
    images, _, split = sources
    hires = cluttered.upsample(images)
    p = cluttered.draw_parameters(16, 8, spec, np.random.default_rng(3))
    src = split["train"][:8]
    alpha = cluttered.digit_alpha(cluttered.tile(hires), src, p, np.full((16, 2, 32, 32), 0.5), spec)
    for k in range(16):
        cos, sin = np.cos(p["angle"][k]), np.sin(p["angle"][k])
        matrix = 4 / (2 * p["scale"][k]) * np.array([[cos, sin], [-sin, cos]])
        centre = np.array([p["centre_r"][k], p["centre_c"][k]])
        ref = ndimage.affine_transform(hires[src[p["local"][k]]], matrix, offset=15.5 - matrix @ centre,
                                       output_shape=(32, 32), order=1, mode="grid-constant", cval=0.0) / 240
        assert np.abs(alpha[k] - ref).max() < 2e-3  # the coordinates are rounded to 1/1024
        assert ref.sum() > 5  # the digit is on the canvas


def test_parameters_keep_the_digit_and_the_clutter_on_the_canvas():
    spec = cluttered.ClutterSpec(fragments=4)
    p = cluttered.draw_parameters(3000, 1000, spec, np.random.default_rng(0))
    half = spec.digit_size * p["scale"] / 2
    for centre in (p["centre_r"], p["centre_c"]):
        assert np.all(centre - half >= -0.5) and np.all(centre + half <= spec.canvas - 0.5)
    for corner in (p["frag_top"], p["frag_left"]):
        assert corner.min() == 0 and corner.max() == spec.canvas - spec.fragment_size
    assert np.all(p["frag_local"] != p["local"][:, None])
    assert set(np.unique(p["frag_local"])) == set(range(1000))
    assert np.all(np.abs(np.rad2deg(p["angle"])) <= spec.rotation)
    assert p["scale"].min() >= 0.8 and p["scale"].max() <= 1.2


@given(st.lists(st.floats(0, 1, exclude_max=True), min_size=6, max_size=6), st.floats(0, 0.5))
def test_every_stroke_channel_contrasts_with_the_background(u, contrast):
    background, ink = cluttered._colours(np.array([u[:3]]), np.array([u[3:]]), contrast)
    assert np.all((0 <= ink) & (ink <= 1))
    assert np.all(np.abs(ink - background) >= contrast - 1e-12)
    assert np.all(np.abs(ink - background) <= 1 - contrast + 1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"copies": (0, 1)}, "copies"), ({"scale": (1.2, 0.8)}, "scale"), ({"digit_size": 40.0}, "fit"),
    ({"fragment_size": 20}, "fragment_size"), ({"contrast": 0.7}, "contrast"), ({"noise": float("nan")}, "noise"),
    ({"seed": -1}, "seed"), ({"fragments": -2}, "fragments"),
])
def test_bad_construction_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluttered.ClutterSpec(**kwargs)


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERTWINERS_CACHE", str(tmp_path / "c"))
    assert cluttered.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("INTERTWINERS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cluttered.cache_dir() == tmp_path / "xdg" / "intertwiners"
    assert cluttered.cache_path(SMALL) != cluttered.cache_path()  # the parameters name the file


def counting_build(monkeypatch, result):
    calls = []
    monkeypatch.setattr(cluttered, "build", lambda spec=None: calls.append(spec) or result)
    return calls


def test_cache_round_trip(monkeypatch, tmp_path, small_built):
    monkeypatch.setenv("INTERTWINERS_CACHE", str(tmp_path))
    calls = counting_build(monkeypatch, small_built)
    first = cluttered.load_arrays(SMALL)
    path = cluttered.cache_path(SMALL)
    assert len(calls) == 1 and path.is_file() and os.listdir(tmp_path) == [path.name]  # no temporary left
    second = cluttered.load_arrays(SMALL)
    assert len(calls) == 1  # read, not rebuilt
    assert cluttered.digest(second.arrays) == cluttered.digest(first.arrays) == cluttered.digest(small_built.arrays)
    with np.load(path, allow_pickle=False) as npz:
        assert str(npz["sha256"]) == cluttered.digest(small_built.arrays)
    cluttered.load_arrays(SMALL, cache=False)
    assert len(calls) == 2  # cache=False always builds


def _flip_middle(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _tamper_array(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][0, 0, 0, 0] ^= 1  # a valid zip whose arrays no longer match their recorded hash
    np.savez(path, **arrays)


def _pickle_inside(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["y_train"] = np.array([object()] * len(arrays["y_train"]), dtype=object)
    np.savez(path, **arrays)


def _drop_hash(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "sha256"}
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage, match", [
    (_flip_middle, "cannot be read|damaged"), (_truncate, "cannot be read"), (_tamper_array, "damaged"),
    (_pickle_inside, "not a plain .npz"), (_drop_hash, "sha256"),
])
def test_damaged_cache_is_refused_and_rebuilt(monkeypatch, tmp_path, small_built, damage, match):
    monkeypatch.setenv("INTERTWINERS_CACHE", str(tmp_path))
    path = cluttered.cache_path(SMALL)
    cluttered.write_cache(small_built, path)
    damage(path)
    with pytest.raises(ValueError, match=match):
        cluttered.read_cache(path, SMALL)
    calls = counting_build(monkeypatch, small_built)
    with pytest.warns(UserWarning, match="rebuilding digits-cluttered"):
        again = cluttered.load_arrays(SMALL)
    assert len(calls) == 1 and cluttered.digest(again.arrays) == cluttered.digest(small_built.arrays)
    assert cluttered.digest(cluttered.read_cache(path, SMALL).arrays) == cluttered.digest(small_built.arrays)


def test_cache_of_other_parameters_is_refused(monkeypatch, tmp_path, small_built):
    path = tmp_path / "other.npz"
    cluttered.write_cache(small_built, path)
    with pytest.raises(ValueError, match="expected uint8"):
        cluttered.read_cache(path, cluttered.ClutterSpec())


def test_unwritable_cache_folder_still_builds(monkeypatch, tmp_path, small_built):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("INTERTWINERS_CACHE", str(blocker / "cache"))
    counting_build(monkeypatch, small_built)
    with pytest.warns(UserWarning, match="could not be cached"):
        got = cluttered.load_arrays(SMALL)
    assert got is small_built
    assert blocker.read_text() == "not a folder"


@pytest.fixture(scope="module")
def loaded(cached):
    return data.load("digits-cluttered")


def test_load_normalises_like_the_other_datasets(loaded, built):
    train, test = loaded
    assert train.x.shape == (5748, 3, 32, 32) and test.x.shape == (1440, 3, 32, 32)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert torch.equal(test.y, torch.from_numpy(built.y("test").astype(np.int64)))
    # per-channel normalisation with the training statistics
    assert torch.allclose(train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(train.x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert not train.flip and train.translate == 2 and train.input_shape == (3, 32, 32)
    assert train.name == "digits-cluttered-train" and test.dataset == "digits-cluttered"
    assert train.split(0.1)[1].dataset == "digits-cluttered"


def test_training_uses_the_cluttered_recipe(loaded):
    from intertwiners import training

    train, test = loaded
    model, metrics = training.train_one("myrtle_cnn", "digits-cluttered", 0, epochs=1, progress=False,
                                        data=(train.subset(np.arange(40)), test.subset(np.arange(20))))
    assert metrics["recipe"] == {**training.RECIPES["digits-cluttered"].__dict__, "epochs": 1}
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 16  # ARCH_DEFAULTS: width 16
    assert model(test.x[:2]).shape == (2, 10)
    resnet = training.build_for("resnet20", train)
    assert resnet(test.x[:2]).shape == (2, 10)


def test_cli_takes_the_dataset():
    from intertwiners.cli import build_parser

    for command in (["train"], ["similarity", "a", "b"], ["rotation-penalty"], ["align", "a", "b", "--out", "o"]):
        args = build_parser().parse_args([*command, "--dataset", "digits-cluttered"])
        assert args.dataset == "digits-cluttered"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--dataset", "mnist"])


def test_load_takes_a_variant(monkeypatch, small_built):
    calls = counting_build(monkeypatch, small_built)
    train, test = data.load("digits-cluttered", spec=SMALL, cache=False)
    assert calls == [SMALL] and len(train) == 1437 and len(test) == 360
