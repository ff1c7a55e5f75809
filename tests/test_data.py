import pickle

import numpy as np
import pytest
import torch

from intertwiners import data


def write_cifar_batch(path, n, seed, protocol=2):
    """A CIFAR-10 python batch in the real format: a pickled dict of bytes keys, uint8 (N, 3072) data."""
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return batch


@pytest.fixture
def cifar_root(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", 6, seed=i)
    write_cifar_batch(root / "test_batch", 5, seed=9)
    return tmp_path


def test_digits_shapes_and_split(digits):
    train, test = digits
    assert train.x.shape == (1437, 1, 16, 16) and test.x.shape == (360, 1, 16, 16)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert set(train.y.tolist()) == set(range(10))
    # normalised with the training statistics
    assert abs(train.x.mean().item()) < 1e-4 and abs(train.x.std().item() - 1) < 1e-2
    # the split is fixed: loading twice gives the same test set
    _, test2 = data.load("digits")
    assert torch.equal(test.x, test2.x)
    assert not train.flip and train.translate == 1


def test_validation_split_is_disjoint_and_seeded(digits):
    train, _ = digits
    a, va = train.split(0.1, seed=0)
    b, vb = train.split(0.1, seed=0)
    assert torch.equal(va.x, vb.x) and len(a) + len(va) == len(train) and len(va) == 144
    keys = {tuple(r.tolist()) for r in a.x.flatten(1)[:, ::17]}
    assert not any(tuple(r.tolist()) in keys for r in va.x.flatten(1)[:, ::17])


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_reader_real_format(cifar_root, protocol):
    write_cifar_batch(cifar_root / "cifar-10-batches-py" / "test_batch", 5, seed=9, protocol=protocol)
    train, test = data.load("cifar10", root=cifar_root)
    assert train.x.shape == (30, 3, 32, 32) and test.x.shape == (5, 3, 32, 32)
    raw = write_cifar_batch(cifar_root / "dummy", 6, seed=1)
    x, y = data.read_cifar_batch(cifar_root / "cifar-10-batches-py" / "data_batch_1")
    assert np.array_equal(x.reshape(6, -1), raw[b"data"]) and y.tolist() == raw[b"labels"]
    assert train.flip and train.translate == 2


def test_cifar_missing_folder_and_batch(tmp_path, cifar_root):
    with pytest.raises(ValueError, match="root"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="does not exist"):
        data.load("cifar10", root=tmp_path / "nowhere")
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        data.load("cifar10", root=cifar_root)


def test_cifar_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "data_batch_1"
    with open(evil, "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        data.read_cifar_batch(evil)
    assert not marker.exists()

    class OsPayload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(evil, "wb") as f:
        pickle.dump(OsPayload(), f)
    with pytest.raises(ValueError, match="refusing"):
        data.read_cifar_batch(evil)
    assert not marker.exists()


def test_cifar_malformed_batch(tmp_path):
    bad = tmp_path / "b"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="3072"):
        data.read_cifar_batch(bad)
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError):
        data.read_cifar_batch(bad)


def test_augment_translate_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(data.augment(x, g, flip=False, translate=0), x)
    y = data.augment(x, g, flip=False, translate=1)
    assert y.shape == x.shape
    # every output image is a shift of the input by at most 1 pixel, zero-filled
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        assert any(torch.equal(y[i], padded[:, dy:dy + 4, dx:dx + 4]) for dy in range(3) for dx in range(3))
    flipped = data.augment(x.repeat(64, 1, 1, 1), g, flip=True, translate=0)
    n_flipped = sum(torch.equal(f, x[i % 2].flip(-1)) for i, f in enumerate(flipped))
    assert 34 < n_flipped < 94  # about half of 128


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; known: digits, digits-cluttered, cifar10"):
        data.load("imagenet")


def test_part_names_give_their_dataset():
    assert data.dataset_of("digits-train") == "digits"
    assert data.dataset_of("digits-cluttered-train-val") == "digits-cluttered"
    assert data.dataset_of("cifar10-test") == "cifar10"
    assert data.dataset_of("mystery-train") == "mystery"


def test_digits_and_cluttered_digits_share_the_split(digits):
    images, labels, i_train, i_test = data.digits_source()
    train, test = digits
    assert len(i_train) == len(train) and len(i_test) == len(test)
    assert torch.equal(test.y, torch.from_numpy(labels[i_test]))
    assert images.shape == (1797, 8, 8) and images.max() == 16
