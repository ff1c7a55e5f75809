"""The Broden-layout reader and the synthetic dataset written in that layout."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from intertwiners.dissection import BrodenDataset, make_synthetic_broden
from intertwiners.dissection.broden import decode_label_image, load_images
from intertwiners.dissection.synthetic import COLORS, PIXEL_CATEGORIES, SHAPES, label_table


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("broden")
    drawn = make_synthetic_broden(root, n_images=24, seed=1, image_size=16, label_size=8)
    return root, drawn


def test_round_trip_pixel_and_image_labels(synthetic):
    root, drawn = synthetic
    ds = BrodenDataset(root)
    assert len(ds) == 24 and ds.label_shape == (8, 8)
    assert ds.categories == ["color", "object", "texture", "scene"]
    assert [(c.number, c.name, c.category) for c in ds.concepts] == label_table()
    for i in range(len(ds)):
        seg = ds.segmentation(i)
        assert seg.pixel.shape == (3, 8, 8)
        for k, cat in enumerate(PIXEL_CATEGORIES):
            assert np.array_equal(seg.pixel[k], drawn.pixel_labels[cat][i])
            assert np.array_equal(ds.pixel_labels(i, cat)[0], drawn.pixel_labels[cat][i])
        assert seg.image_level == (int(drawn.image_labels["scene"][i]),)
        assert seg.annotated == {"color", "object", "texture", "scene"}
        assert ds.load_image(i).shape == (16, 16, 3)
    assert np.array_equal(ds.class_labels, drawn.classes)
    assert ds.class_names == list(SHAPES)


def test_splits(synthetic):
    root, drawn = synthetic
    val = BrodenDataset(root, split="val")
    train = BrodenDataset(root, split="train")
    assert len(val) == drawn.split.count("val") == 6 and len(train) == 18
    assert [r["image"] for r in val.records] == [im for im, s in zip(drawn.images, drawn.split) if s == "val"]
    with pytest.raises(ValueError, match="no images"):
        BrodenDataset(root, split="nonexistent")


def test_labels_describe_the_pixels(synthetic):
    # Independent of writer/reader agreement: a pixel labelled with colour c, without texture, in a "day"
    # image, has RGB close to COLORS[c] (only noise of sigma 6 was added); object pixels are never
    # background-coloured.
    root, drawn = synthetic
    ds = BrodenDataset(root)
    names = {num: name for num, name, _ in label_table()}
    checked = 0
    for i in range(len(ds)):
        if names[int(drawn.image_labels["scene"][i])] != "day":
            continue
        img = ds.load_image(i)[1::2, 1::2].astype(float)  # the label grid samples the centre of 2x2 blocks
        color, texture = drawn.pixel_labels["color"][i], drawn.pixel_labels["texture"][i]
        for num in np.unique(color):
            sel = (color == num) & (texture == 0)
            if sel.any():
                assert np.abs(img[sel] - np.array(COLORS[names[num]])).max() < 40
                checked += 1
    assert checked > 5


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_broden(tmp_path / "a", n_images=6, seed=3, image_size=16)
    b = make_synthetic_broden(tmp_path / "b", n_images=6, seed=3, image_size=16)
    c = make_synthetic_broden(tmp_path / "c", n_images=6, seed=4, image_size=16)
    assert (tmp_path / "a" / "index.csv").read_text() == (tmp_path / "b" / "index.csv").read_text()
    assert all(np.array_equal(a.pixel_labels[k], b.pixel_labels[k]) for k in PIXEL_CATEGORIES)
    assert not np.array_equal(a.pixel_labels["color"], c.pixel_labels["color"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a/images/synthetic/0003.png")),
                          np.asarray(Image.open(tmp_path / "b/images/synthetic/0003.png")))


def test_load_images_normalises(synthetic):
    root, _ = synthetic
    ds = BrodenDataset(root)
    x = load_images(ds, [0, 1], mean=(0, 0, 0), std=(1, 1, 1))
    assert x.shape == (2, 3, 16, 16)
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), ds.load_image(0) / 255.0)
    assert load_images(ds, [0], size=8).shape == (1, 3, 8, 8)


# -- a hand-built dataset, independent of the synthetic writer --------------------------------------------
def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _png(path, labels):
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = labels % 256, labels // 256
    Image.fromarray(rgb).save(path)


@pytest.fixture
def handmade(tmp_path):
    root = tmp_path / "hand"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "images" / "a.jpg")
    obj = np.zeros((4, 4), dtype=np.int64)
    obj[:2] = 300                      # needs the G channel: 300 = 44 + 256 * 1
    part = np.zeros((4, 4), dtype=np.int64)
    part[:, :1] = 2
    _png(root / "images" / "a_object.png", obj)
    _png(root / "images" / "a_part.png", part)
    _write(root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", "object", "part", "scene", "texture"],
           [["a.jpg", "val", 8, 8, 4, 4, "a_object.png;a_part.png", "", "7", "5;6"]])
    _write(root / "category.csv", ["name", "first", "last", "count", "frequency"],
           [["object", 1, 300, 2, 1], ["part", 2, 2, 1, 0], ["scene", 7, 7, 1, 1], ["texture", 5, 6, 2, 1]])
    _write(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
           [[2, "leg", "object(3);part(9)", 1, 0.1, ""], [5, "striped", "texture(1)", 1, 1, ""],
            [6, "dotted", "texture(1)", 1, 1, ""], [7, "beach", "scene(1)", 1, 1, ""],
            [300, "car", "object(4)", 1, 0.5, "auto;automobile"]])
    for cat, rows in (("object", [[1, 300, "car"]]), ("part", [[1, 2, "leg"]]), ("scene", [[1, 7, "beach"]]),
                      ("texture", [[1, 5, "striped"], [2, 6, "dotted"]])):
        _write(root / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
               [r + [1, 1] for r in rows])
    return root


def test_handmade_dataset_reads(handmade):
    ds = BrodenDataset(handmade)
    assert [c.number for c in ds.concepts] == [2, 5, 6, 7, 300]
    assert {c.name: c.category for c in ds.concepts}["leg"] == "part"  # primary = largest count
    seg = ds.segmentation(0)
    assert seg.pixel.shape == (2, 4, 4)
    assert seg.pixel[0, 0, 0] == 300 and seg.pixel[0, 3, 3] == 0 and seg.pixel[1, 0, 0] == 2
    assert sorted(seg.image_level) == [5, 6, 7]
    assert seg.annotated == {"object", "scene", "texture"}  # the empty "part" column is not annotated
    assert ds.class_labels is None
    assert np.array_equal(ds.pixel_labels(0, "texture"), np.stack([np.full((4, 4), 5), np.full((4, 4), 6)]))
    assert int(decode_label_image(handmade / "images" / "a_object.png").max()) == 300


def _rewrite(path, old, new):
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize("breakage, match", [
    (lambda r: (r / "index.csv").unlink(), "missing file"),
    (lambda r: (r / "c_part.csv").unlink(), "missing file"),
    (lambda r: (r / "label.csv").write_text("number,title\n1,x\n"), "lacks column"),
    (lambda r: _rewrite(r / "index.csv", "val,8,8", "val,eight,8"), "must be an integer"),
    (lambda r: _rewrite(r / "index.csv", ",scene,", ",weather,"), "not categories"),
    (lambda r: _rewrite(r / "index.csv", ",7,", ",8,"), "not in label.csv"),
    (lambda r: _rewrite(r / "label.csv", "scene(1)", "scene[1]"), "name\\(count\\)"),
    (lambda r: _rewrite(r / "label.csv", "scene(1)", "weather(1)"), "not in category.csv"),
    (lambda r: _rewrite(r / "index.csv", "a.jpg,val,8,8,4,4,a_object.png",
                        "a.jpg,val,8,8,4,4,extra,a_object.png"), "number of fields"),
    (lambda r: (r / "category.csv").write_bytes(b"\xff\xfe\x00name"), "CSV|column"),
])
def test_malformed_files_raise(handmade, breakage, match):
    breakage(handmade)
    with pytest.raises(ValueError, match=match):
        BrodenDataset(handmade)


@pytest.mark.parametrize("breakage, match", [
    (lambda r: _png(r / "images" / "a_object.png", np.zeros((5, 4), dtype=np.int64)), "has size"),
    (lambda r: _png(r / "images" / "a_object.png", np.full((4, 4), 301)), "not in label.csv"),
    (lambda r: (r / "images" / "a_part.png").unlink(), "missing label image"),
    (lambda r: (r / "images" / "a_part.png").write_bytes(b"not a png"), "cannot decode"),
    (lambda r: (r / "images" / "a.jpg").unlink(), "missing image"),
])
def test_malformed_label_images_raise(handmade, breakage, match):
    ds = BrodenDataset(handmade)
    breakage(handmade)
    with pytest.raises(ValueError, match=match):
        ds.segmentation(0)
        ds.load_image(0)


def test_missing_root_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        BrodenDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="label_size"):
        make_synthetic_broden(tmp_path / "x", n_images=2, image_size=16, label_size=5)
    with pytest.raises(ValueError, match="n_images"):
        make_synthetic_broden(tmp_path / "x", n_images=0)
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
