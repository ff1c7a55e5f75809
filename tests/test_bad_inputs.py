"""The bad-input suite: every bad input a clear ValueError (CLI: one line on stderr, non-zero exit, no
traceback), nothing lost, and every valid extreme accepted with the right value.

Each case is a row of a table: the input, the error it must raise (a regular expression on the message), and
a check that no result was lost (files that existed are byte-for-byte unchanged). CLI cases run
``intertwiners.cli.main`` in-process; a few run the console script in a subprocess.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from intertwiners import cli, data, models
from intertwiners import similarity as sim
from intertwiners._util import max_nan, parse_seeds, resolve_device

# ---------------------------------------------------------------------------------------------------------------
# helpers


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: compared before and after a failure (nothing lost)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, match: str | None = None) -> None:
    assert code != 0, "a user mistake must give a non-zero exit status"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "error" in lines[0]
    if match is not None:
        import re
        assert re.search(match, lines[0], flags=re.I), lines[0]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: one validation layer, every failure a ValueError naming the file


def tiny_model():
    return models.mlp(4, hidden=(3,), num_classes=2)


@pytest.fixture()
def ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    models.save(tiny_model(), folder)
    return folder


def _weights(folder):
    return folder / "model.safetensors"


def _config(folder):
    return folder / "config.json"


def _write_config(folder, obj):
    _config(folder).write_text(json.dumps(obj))


def _good_config(folder):
    return json.loads(_config(folder).read_text())


class _Boom:
    """A pickle payload: unpickling it would create a file named by ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _truncate(k):
    def f(folder):
        raw = _weights(folder).read_bytes()
        _weights(folder).write_bytes(raw[:k] if k >= 0 else raw[:len(raw) + k])
    return f


def _tensors(change):
    def f(folder):
        from safetensors.torch import load_file
        state = load_file(str(_weights(folder)))
        change(state)
        save_file(state, str(_weights(folder)))
    return f


def _kwargs(change):
    def f(folder):
        cfg = _good_config(folder)
        change(cfg["kwargs"])
        _write_config(folder, cfg)
    return f


def _set(key, value):
    return lambda kw: kw.__setitem__(key, value)


def _del(key):
    return lambda kw: kw.pop(key)


def _torch_save(folder):
    torch.save(tiny_model().state_dict(), _weights(folder))   # a zip archive holding pickles


def _pickle(folder):
    _weights(folder).write_bytes(pickle.dumps(_Boom(folder.parent / "PWNED")))


CHECKPOINT_CASES = {
    # damaged or foreign weights files
    "empty weights": (lambda f: _weights(f).write_bytes(b""), "empty"),
    "truncated to 4 bytes": (_truncate(4), "truncated|not a safetensors"),
    "truncated to 8 bytes": (_truncate(8), "truncated|not a safetensors"),
    "truncated to 20 bytes": (_truncate(20), "truncated|not a safetensors"),
    "truncated by 1 byte": (_truncate(-1), "damaged|truncated"),
    "truncated by 40 bytes": (_truncate(-40), "damaged|truncated"),
    "garbage weights": (lambda f: _weights(f).write_bytes(os.urandom(300)), "safetensors|damaged|truncated"),
    "text weights": (lambda f: _weights(f).write_text("hello world, not weights"), "safetensors|truncated"),
    "a pickle in place of safetensors": (_pickle, "pickle"),
    "a torch.save file in place of safetensors": (_torch_save, "torch.save|zip"),
    "a zip archive": (lambda f: zipfile.ZipFile(_weights(f), "w").close(), "zip"),
    "header length beyond the file": (lambda f: _weights(f).write_bytes((10**6).to_bytes(8, "little") + b"{}"),
                                      "truncated|not a safetensors"),
    "header not JSON": (lambda f: _weights(f).write_bytes((5).to_bytes(8, "little") + b"{{{{{"), "header"),
    "header a JSON list": (lambda f: _weights(f).write_bytes((2).to_bytes(8, "little") + b"[]"), "header"),
    "weights is a folder": (lambda f: (_weights(f).unlink(), _weights(f).mkdir()), "no weights|does not exist"),
    "weights missing": (lambda f: _weights(f).unlink(), "no weights|does not exist"),
    # tensors that do not match the config
    "missing tensor": (_tensors(lambda s: s.pop("head.bias")), "lacks.*head.bias"),
    "extra tensor": (_tensors(lambda s: s.__setitem__("extra.weight", torch.zeros(2))), "extra.weight"),
    "wrong shape": (_tensors(lambda s: s.__setitem__("head.bias", torch.zeros(5))), "shape"),
    "integer tensor": (_tensors(lambda s: s.__setitem__("head.bias", torch.zeros(2, dtype=torch.int64))),
                       "head.bias"),
    "NaN weights": (_tensors(lambda s: s["head.bias"].fill_(float("nan"))), "NaN"),
    "Inf weights": (_tensors(lambda s: s["fc1.weight"].fill_(float("inf"))), "NaN/Inf"),
    "no tensors at all": (_tensors(lambda s: s.clear()), "lacks"),
    # configs
    "config missing": (lambda f: _config(f).unlink(), "no config.json"),
    "config empty": (lambda f: _config(f).write_text(""), "not valid JSON"),
    "config garbage": (lambda f: _config(f).write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "config truncated": (lambda f: _config(f).write_text(_config(f).read_text()[:15]), "not valid JSON"),
    "config a list": (lambda f: _write_config(f, [1, 2]), "JSON object.*list"),
    "config null": (lambda f: _write_config(f, None), "null"),
    "config a string": (lambda f: _write_config(f, "mlp"), "str"),
    "config a number": (lambda f: _write_config(f, 3), "int"),
    "config without arch": (lambda f: _write_config(f, {"kwargs": {}}), "architecture"),
    "config unknown arch": (lambda f: _write_config(f, {"arch": "vgg", "kwargs": {}}), "unknown architecture"),
    "config arch a list": (lambda f: _write_config(f, {"arch": ["mlp"], "kwargs": {}}), "unknown architecture"),
    "config without kwargs": (lambda f: _write_config(f, {"arch": "mlp"}), "kwargs"),
    "kwargs a list": (lambda f: _write_config(f, {"arch": "mlp", "kwargs": [4, 2]}), "kwargs.*list"),
    "kwargs a string": (lambda f: _write_config(f, {"arch": "mlp", "kwargs": "in_features=4"}), "kwargs.*str"),
    "kwargs null": (lambda f: _write_config(f, {"arch": "mlp", "kwargs": None}), "kwargs"),
    "kwargs extra": (_kwargs(_set("depth", 3)), "no argument.*depth"),
    "kwargs missing in_features": (_kwargs(_del("in_features")), "lacks.*in_features"),
    "kwargs missing activation": (_kwargs(_del("activation")), "lacks.*activation"),
    "in_features a string": (_kwargs(_set("in_features", "4")), "in_features"),
    "in_features zero": (_kwargs(_set("in_features", 0)), "in_features"),
    "in_features negative": (_kwargs(_set("in_features", -4)), "in_features"),
    "in_features a float": (_kwargs(_set("in_features", 4.0)), "in_features"),
    "in_features a bool": (_kwargs(_set("in_features", True)), "in_features"),
    "in_features huge": (_kwargs(_set("in_features", 10**12)), "shape"),
    "hidden a string": (_kwargs(_set("hidden", "3")), "hidden"),
    "hidden with a zero": (_kwargs(_set("hidden", [0])), "hidden"),
    "hidden nested": (_kwargs(_set("hidden", [[3]])), "hidden"),
    "num_classes null": (_kwargs(_set("num_classes", None)), "num_classes"),
    "activation unknown": (_kwargs(_set("activation", "swishy")), "activation"),
    "activation leaky_relu:nan": (_kwargs(_set("activation", "leaky_relu:nan")), "finite"),
    "activation leaky_relu:inf": (_kwargs(_set("activation", "leaky_relu:inf")), "finite"),
    "activation a number": (_kwargs(_set("activation", 3)), "activation"),
    "activation empty": (_kwargs(_set("activation", "")), "activation"),
    "different width than the weights": (_kwargs(_set("hidden", [7])), "shape"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_a_value_error_naming_the_file(ckpt, case):
    damage, match = CHECKPOINT_CASES[case]
    damage(ckpt)
    before = snapshot(ckpt)
    for target in (ckpt, _weights(ckpt)):
        with pytest.raises(ValueError, match=match) as info:
            models.load(target)
        assert str(ckpt) in str(info.value), "the message names the file"
    assert snapshot(ckpt) == before, "loading never changes the checkpoint"
    assert not (ckpt.parent / "PWNED").exists(), "nothing was unpickled"


def test_the_same_checkpoint_loads_when_undamaged(ckpt):
    model = models.load(ckpt)
    x = torch.randn(3, 4)
    assert model(x).shape == (3, 2)


BAD_DEVICES = ["tpu", "cuda:99", "gpu", "", "cpu:x", "cuda:-1", "meta", "xla", "nonsense:3", 3, 1.5, ["cpu"]]
if torch.cuda.is_available():
    BAD_DEVICES.remove("cuda:-1")


@pytest.mark.parametrize("device", BAD_DEVICES, ids=str)
def test_bad_devices_are_value_errors(ckpt, device):
    with pytest.raises(ValueError, match="device"):
        resolve_device(device)
    with pytest.raises(ValueError, match="device"):
        models.load(ckpt, map_location=device)


@pytest.mark.parametrize("path", [None, 3, ["a"]], ids=str)
def test_load_and_save_paths_of_the_wrong_type(path):
    with pytest.raises(ValueError, match="path"):
        models.load(path)
    with pytest.raises(ValueError, match="path"):
        models.save(tiny_model(), path)


def test_load_of_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        models.load(tmp_path / "nothing")


def test_save_refuses_a_file_path_and_nan_weights_and_keeps_the_old_checkpoint(tmp_path, ckpt):
    f = tmp_path / "a_file"
    f.write_text("precious")
    with pytest.raises(ValueError, match="not a folder"):
        models.save(tiny_model(), f)
    assert f.read_text() == "precious"
    before = snapshot(ckpt)
    bad = tiny_model()
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        models.save(bad, ckpt)
    assert snapshot(ckpt) == before
    with pytest.raises(ValueError, match="intertwiners_config"):
        models.save(torch.nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.parametrize("activation", ["leaky_relu:nan", "leaky_relu:inf", "leaky_relu:-inf", "bogus", 3])
def test_constructors_refuse_bad_activations(activation):
    for build in (lambda: models.mlp(4, activation=activation), lambda: models.myrtle_cnn(4, activation=activation),
                  lambda: models.resnet20(activation=activation)):
        with pytest.raises(ValueError):
            build()


# ---------------------------------------------------------------------------------------------------------------
# small helpers of the library


@pytest.mark.parametrize("text", ["a", "3-1", "", ",", "-1", "1.5", "0-x", "0-1000000", [], [1.5], [True], "0--2"],
                         ids=str)
def test_bad_seeds(text):
    with pytest.raises(ValueError, match="seed"):
        parse_seeds(text)


def test_max_nan_propagates_nan():
    assert math.isnan(max_nan(0.0, float("nan"), 1.0))
    assert math.isnan(max_nan(float("nan")))
    assert max_nan(0.0, 2.0, 1.0) == 2.0
    assert max_nan(0.0, float("inf")) == float("inf")


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 batches: never unpickle arbitrary objects, never truncate labels


def _batch(path, data=None, labels=None, *, obj=None):
    if obj is None:
        obj = {b"data": np.zeros((3, 3072), np.uint8) if data is None else data,
               b"labels": [0, 1, 2] if labels is None else labels}
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


CIFAR_CASES = {
    "float labels 0.5": (dict(labels=[0.5, 1.7, 2.0]), "integers"),
    "float labels 1.0": (dict(labels=[0.0, 1.0, 2.0]), "integers"),
    "string labels": (dict(labels=["a", "b", "c"]), "integers"),
    "bool labels": (dict(labels=[True, False, True]), "integers"),
    "nested labels": (dict(labels=[[0], [1], [2]]), "integers|labels"),
    "label 10": (dict(labels=[0, 1, 10]), "0..9"),
    "label -1": (dict(labels=[0, -1, 2]), "0..9"),
    "too few labels": (dict(labels=[0, 1]), "matching"),
    "zero rows": (dict(data=np.zeros((0, 3072), np.uint8), labels=[]), "no images|integers|refusing"),
    "float data": (dict(data=np.zeros((3, 3072), np.float32)), "uint8"),
    "wrong width": (dict(data=np.zeros((3, 100), np.uint8)), "3072"),
    "3-d data": (dict(data=np.zeros((3, 3, 1024), np.uint8)), "3072"),
    "not a dict": (dict(obj=[1, 2, 3]), "dict"),
    "no labels key": (dict(obj={b"data": np.zeros((3, 3072), np.uint8)}), "labels"),
    "an evil global": (dict(obj=_Boom("/tmp/intertwiners-cifar-pwned")), "refusing"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_CASES))
def test_bad_cifar_batches(tmp_path, case):
    kwargs, match = CIFAR_CASES[case]
    path = _batch(tmp_path / "data_batch_1", **kwargs)
    with pytest.raises(ValueError, match=match):
        data.read_cifar_batch(path)
    assert not Path("/tmp/intertwiners-cifar-pwned").exists()


@pytest.mark.parametrize("content", [b"", b"\x80", b"garbage" * 10, pickle.dumps({b"data": 1})[:-3]], ids=str)
def test_unreadable_cifar_files(tmp_path, content):
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        data.read_cifar_batch(path)


def test_good_cifar_batch_keeps_integer_labels(tmp_path):
    x, y = data.read_cifar_batch(_batch(tmp_path / "b", labels=np.array([0, 9, 3], np.uint8)))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 9, 3] and y.dtype == np.int64


def tiny_data(n=40):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    return data.ArrayDataset(x, y, 10, "digits-train"), data.ArrayDataset(x[:10], y[:10], 10, "digits-test")


def test_zero_row_datasets_are_errors():
    from intertwiners.training import accuracy, train_one
    train, test = tiny_data()
    empty = test.subset(torch.arange(0))
    with pytest.raises(ValueError, match="empty"):
        accuracy(models.mlp(256, hidden=(4,)), empty, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        accuracy(models.mlp(256, hidden=(4,)), test, device="cpu", batch_size=0)
    for parts in ((empty, test), (train, empty), (train.subset(torch.arange(1)), test)):
        with pytest.raises(ValueError, match="empty|at least 2"):
            train_one("mlp", "digits", 0, epochs=1, device="cpu", progress=False, data=parts)


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_subset=0), "train_subset"), (dict(train_subset=-3), "train_subset"),
    (dict(train_subset=1.5), "train_subset"), (dict(epochs=0), "epochs"), (dict(epochs=2.5), "epochs"),
    (dict(lr=float("nan")), "lr"), (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=1.0), "val_fraction"), (dict(val_fraction=0.0), "val_fraction"),
    (dict(finetune="some"), "finetune"), (dict(device="tpu"), "device")], ids=str)
def test_rotation_penalty_settings(kwargs, match):
    from intertwiners.rotation_penalty import rotation_penalty
    train, test = tiny_data()
    model = models.myrtle_cnn(width=2, in_channels=1, input_size=16, batch_norm=False)
    with pytest.raises(ValueError, match=match):
        rotation_penalty(model, "conv1", "grelu", train, test, **{"epochs": 1, **kwargs})


@pytest.mark.parametrize("inputs", [torch.zeros(0, 1, 16, 16), torch.tensor(3.0), [torch.zeros(0, 1, 16, 16)], [()],
                                    "abc", None, 42], ids=str)
def test_feature_extraction_of_empty_or_foreign_inputs(inputs):
    from intertwiners import extract_features
    model = models.myrtle_cnn(width=2, in_channels=1, input_size=16)
    with pytest.raises(ValueError):
        extract_features(model, ["relu1"], inputs, device="cpu")


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_feature_extraction_batch_size(batch_size):
    from intertwiners import extract_features
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(models.mlp(4, hidden=(3,)), ["act1"], torch.randn(5, 4), device="cpu",
                         batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------
# similarity measures: bad input -> ValueError, never NaN; valid extremes -> the right value

_rng = np.random.default_rng(0)
X0 = _rng.standard_normal((12, 5))
Y0 = X0 @ _rng.standard_normal((5, 5)) + 0.3 * _rng.standard_normal((12, 5))
X0c = np.maximum(_rng.standard_normal((8, 3, 2, 2)), 0) + 0.1


def _cka(kernel, estimator):
    return lambda x, y: sim.cka(x, y, kernel=kernel, estimator=estimator)


def _procrustes(group, center=False):
    return lambda x, y: sim.procrustes(x, y, group=group, center=center)


def _minibatch(kernel, estimator):
    def f(x, y):
        m = sim.MinibatchCKA(kernel=kernel, estimator=estimator)
        m.update(x, y)
        return m.compute()
    return f


MEASURES = {
    **{f"cka_{k}_{e}": _cka(k, e) for k in ("linear", "rbf", "max") for e in ("unbiased", "biased")},
    "grelu_cka": lambda x, y: sim.grelu_cka(x, y),
    **{f"procrustes_{g}": _procrustes(g) for g in ("orthogonal", "permutation", "grelu")},
    "procrustes_grelu_centred": _procrustes("grelu", True),
    **{f"minibatch_{k}_{e}": _minibatch(k, e) for k in ("linear", "max") for e in ("unbiased", "biased")},
}
SCALE_INVARIANT = MEASURES  # every measure above is invariant to a positive scale of X (and of Y)

nan_x = X0.copy()
nan_x[3, 2] = np.nan
inf_x = X0.copy()
inf_x[0, 0] = np.inf
BAD_FEATURES = {
    "NaN entry": (nan_x, Y0, "NaN"),
    "Inf entry": (inf_x, Y0, "NaN or infinite"),
    "-Inf entry": (-inf_x, Y0, "NaN or infinite"),
    "different N": (X0[:10], Y0, "samples"),
    "N = 1": (X0[:1], Y0[:1], "sample"),
    "1-d input": (X0[:, 0], Y0[:, 0], "shape"),
    "0-d input": (np.float64(1.0), np.float64(2.0), "shape"),
    "empty": (np.zeros((0, 5)), np.zeros((0, 5)), "empty"),
    "no features": (np.zeros((12, 0)), Y0, "empty"),
    "string": ("features", Y0, "array|tensor"),
    "None": (None, Y0, "array|tensor"),
    "object array": (np.array([[1, "a"]] * 12, dtype=object), Y0, "object"),
    "complex": (X0.astype(np.complex128), Y0, "complex"),
    "ragged list": ([[1.0, 2.0], [3.0]] * 6, Y0, ""),
    "dict": ({"a": 1}, Y0, "array|tensor"),
}


@pytest.mark.parametrize("measure", sorted(MEASURES))
@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_bad_features_are_value_errors(measure, case):
    x, y, match = BAD_FEATURES[case]
    with pytest.raises(ValueError, match=match):
        MEASURES[measure](x, y)
    with pytest.raises(ValueError, match=match):          # and in the other argument
        MEASURES[measure](y if isinstance(y, np.ndarray) and case not in ("N = 1", "different N") else Y0, x)


@pytest.mark.parametrize("measure", sorted(m for m in MEASURES if not m.startswith("procrustes_o")
                                           and not m.startswith("procrustes_p") and m != "procrustes_grelu"))
@pytest.mark.parametrize("value", [0.0, 1.0, -3.5, 1e30])
def test_constant_features_have_no_similarity(measure, value):
    """All-constant X: CKA (and centred Procrustes) is undefined -> ValueError, never a tiny number."""
    with pytest.raises(ValueError, match="constant|identical|zero|dead|not positive"):
        MEASURES[measure](np.full((12, 5), value), Y0)


@pytest.mark.parametrize("group", ["orthogonal", "permutation", "grelu"])
def test_zero_features_cannot_be_normalised(group):
    with pytest.raises(ValueError, match="zero|Frobenius|dead"):
        sim.procrustes(np.zeros((12, 5)), Y0, group=group)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("measure", sorted(m for m in MEASURES if m.endswith("unbiased")) + ["grelu_cka"])
def test_too_few_samples_for_the_unbiased_estimator(measure, n):
    with pytest.raises(ValueError, match="at least 4"):
        MEASURES[measure](X0[:n], Y0[:n])


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_valid_extremes_give_the_right_value(measure):
    """float16/bfloat16, requires_grad, non-contiguous, integer and 1e+-30 scaled inputs: the clean value."""
    f = MEASURES[measure]
    xs = X0c if "max" in measure or "grelu" in measure else X0
    ys = xs * 2.0 + 0.05 * _rng.standard_normal(xs.shape) if xs is X0c else Y0
    xs32 = torch.tensor(xs, dtype=torch.float32)
    ys32 = torch.tensor(ys, dtype=torch.float32)
    ref = f(xs32.double(), ys32.double())
    assert math.isfinite(ref)
    variants = {
        "float32": (xs32, ys32, 1e-5),
        "requires_grad": (xs32.clone().requires_grad_(True), ys32.clone().requires_grad_(True), 1e-5),
        "non-contiguous": (xs32.T.contiguous().T, torch.flip(torch.flip(ys32, [0]), [0])[:, ...], 1e-5),
        "strided numpy": (np.asfortranarray(xs), ys[::1], 1e-6),
        "scaled 1e30": (xs32 * 1e30, ys32, 1e-5),
        "scaled 1e-30": (xs32 * 1e-30, ys32 * 1e-30, 1e-5),
        "scaled 1e-38": (xs32 * 1e-38, ys32, 1e-3),
        "scaled 3e38 / max": (xs32 / xs32.abs().max() * 3e38, ys32, 1e-5),
        "float64 1e200": (xs32.double() * 1e200, ys32.double() * 1e-200, 1e-6),
    }
    if "max" not in measure and "grelu" not in measure:   # half precision rounds the data: loose tolerance
        variants["float16"] = (xs32.half(), ys32.half(), 3e-3)
        variants["bfloat16"] = (xs32.bfloat16(), ys32.bfloat16(), 3e-2)
    for name, (x, y, tol) in variants.items():
        value = f(x, y)
        assert math.isfinite(value), name
        assert value == pytest.approx(ref, abs=tol), name


def test_non_contiguous_view_with_a_gap():
    big = torch.tensor(np.concatenate([X0, X0], axis=1), dtype=torch.float64)
    view = big[:, ::2]                                  # non-contiguous, every other column
    assert not view.is_contiguous()
    assert sim.cka(view, Y0) == pytest.approx(sim.cka(view.contiguous(), Y0), abs=1e-12)
    assert sim.procrustes(view, Y0, "grelu") == pytest.approx(sim.procrustes(view.contiguous(), Y0, "grelu"),
                                                               abs=1e-12)


@given(st.integers(min_value=-35, max_value=35), st.integers(min_value=-35, max_value=35),
       st.sampled_from(sorted(SCALE_INVARIANT)))
def test_scale_invariant_measures_accept_any_finite_scale(ex, ey, measure):
    f = MEASURES[measure]
    xs = X0c if "max" in measure or "grelu" in measure else X0
    ys = np.abs(xs) + 0.5 * xs * xs if xs is X0c else Y0
    x, y = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)
    ref = f(x.double(), y.double())
    assert f(x * 10.0 ** ex, y * 10.0 ** ey) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_grelu_procrustes_of_x_p_d_is_exactly_one(dtype, center, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(300, 12, generator=g, dtype=dtype)
    P = torch.eye(12, dtype=dtype)[torch.randperm(12, generator=g)]
    D = torch.diag(torch.rand(12, generator=g, dtype=dtype) + 0.25)
    assert sim.procrustes(X, X @ P @ D, group="grelu", center=center) == 1.0
    assert sim.procrustes(X, X @ P, group="permutation", center=center) == 1.0
    Q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0].to(dtype)
    assert sim.procrustes(X, X @ Q, group="orthogonal", center=center) == pytest.approx(1.0, abs=1e-6)
    assert sim.procrustes(X, X, group="orthogonal", center=center) == 1.0
    # and a genuinely different Y stays below 1
    assert sim.procrustes(X, X @ P @ D + 0.1 * torch.randn(300, 12, generator=g, dtype=dtype), "grelu") < 0.999


def test_max_kernel_refuses_overflow_but_takes_grad_and_half():
    x = torch.tensor(X0, dtype=torch.float32)
    with pytest.raises(ValueError, match="range"):
        sim.max_kernel(x * 1e30)
    assert np.isfinite(sim.max_kernel(x.double() * 1e30)).all()
    k = sim.max_kernel(x.clone().requires_grad_(True))
    assert torch.allclose(k, sim.max_kernel(x))
    assert torch.allclose(sim.max_kernel(x.half()), sim.max_kernel(x.half().float()))
    with pytest.raises(ValueError, match="NaN"):
        sim.max_kernel(torch.tensor(nan_x))


@pytest.mark.parametrize("k, match", [
    (torch.full((5, 5), float("nan")), "NaN"), (torch.ones(4, 5), "square"), (torch.ones(5), "square"),
    (torch.ones(3, 3), "at least 4"), (torch.ones(5, 5, dtype=torch.complex64), "complex")], ids=str)
def test_bad_gram_matrices(k, match):
    from intertwiners.similarity.hsic import hsic
    good = torch.eye(k.shape[0] if k.ndim == 2 and k.shape[0] == k.shape[-1] else 5)
    with pytest.raises(ValueError, match=match):
        hsic(k, good if good.shape == k.shape else k, "unbiased")


def test_u_centre_leaves_the_callers_matrix_alone():
    from intertwiners.similarity.hsic import u_centre
    k = torch.rand(6, 6, dtype=torch.float64)
    k = k + k.T
    before = k.clone()
    u_centre(k)
    assert torch.equal(k, before)


def test_minibatch_cka_bad_use():
    m = sim.MinibatchCKA()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="at least 4"):
        m.update(X0[:3], Y0[:3])
    with pytest.raises(ValueError, match="NaN"):
        m.update(nan_x, Y0)
    assert m.n_batches == 0                           # a refused batch changes nothing
    m.update(X0, Y0)
    assert m.compute() == pytest.approx(sim.cka(X0, Y0), abs=1e-12)
    for kwargs in (dict(kernel="poly"), dict(estimator="unbiassed")):
        with pytest.raises(ValueError):
            sim.MinibatchCKA(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the group check: NaN never passes


@pytest.mark.parametrize("name", ["leaky_relu:nan", "leaky_relu:inf", "power:2000"])
def test_group_check_never_passes_on_nan_or_overflow(capsys, name):
    code, out, err = run_cli(capsys, "group", name)
    assert code != 0
    assert "PASS" not in out
    assert "Traceback" not in err


def test_group_check_propagates_nan():
    from intertwiners.commands.group import check_intertwining, passes
    from intertwiners.groups import intertwiner_group

    G = intertwiner_group("relu")

    class NaNSigma:
        def __getattr__(self, k):
            return getattr(G, k)

        def sigma(self, t):
            out = torch.relu(t)
            out.view(-1)[0] = float("nan")
            return out

    check = check_intertwining(NaNSigma(), 3, 5, 0)
    assert math.isnan(check["max_rel_error"]) or math.isnan(check["max_lemma_error"])
    assert not passes(check)


# ---------------------------------------------------------------------------------------------------------------
# the CLI: one line on stderr, a non-zero exit, no traceback, nothing lost


@pytest.fixture()
def zoo(tmp_path):
    """Two untrained tiny models in the layout `intertwiners train` writes (enough for argument checks)."""
    root = tmp_path / "zoo" / "myrtle_cnn-digits"
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = models.save(models.myrtle_cnn(width=2, in_channels=1, input_size=16), root / f"seed{seed}")
        (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 10.0}))
    return root


@pytest.fixture()
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    return f


def _cli_cases(tmp, zoo, a_file):
    """(argv, match) rows; ``tmp`` is a fresh folder, ``zoo`` a tiny zoo, ``a_file`` an existing file."""
    m0 = zoo / "seed0"
    damaged = tmp / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"\x80\x04garbage")
    (damaged / "config.json").write_text("[]")
    out = tmp / "out"
    return [
        # top level
        ([], "required"), (["nonsense"], "invalid choice"), (["--bogus"], "required|unrecognized"),
        # train
        (["train", "--device", "tpu", "--out", out], "device"),
        (["train", "--device", "cuda:99", "--out", out], "device|CUDA"),
        (["train", "--epochs", "0", "--out", out], "positive"),
        (["train", "--epochs", "-2", "--out", out], "positive"),
        (["train", "--epochs", "x", "--out", out], "integer"),
        (["train", "--width", "0", "--out", out], "positive"),
        (["train", "--seeds", "a", "--out", out], "seed"),
        (["train", "--seeds", "3-1", "--out", out], "seed"),
        (["train", "--seeds", "", "--out", out], "seed"),
        (["train", "--activation", "leaky_relu:nan", "--out", out], "finite"),
        (["train", "--activation", "leaky_relu:inf", "--out", out], "finite"),
        (["train", "--activation", "bogus", "--out", out], "activation"),
        (["train", "--arch", "vgg", "--out", out], "invalid choice"),
        (["train", "--out", a_file], "not a folder"),
        (["train", "--out", "/proc/intertwiners-x"], "cannot write"),
        (["train", "--out", a_file / "sub"], "cannot write|not a folder"),
        (["train", "--dataset", "cifar10", "--out", out], "data-root"),
        (["train", "--dataset", "cifar10", "--data-root", tmp / "nope", "--out", out], "does not exist"),
        # group
        (["group", "bogus"], "unknown"), (["group", "relu", "--n", "0"], "positive"),
        (["group", "relu", "--samples", "-1"], "positive"), (["group", "relu", "--n", "x"], "integer"),
        # stitch
        (["stitch", zoo, "--kinds", "nonsense", "--out", out], "kind"),
        (["stitch", zoo, "--kinds", "", "--out", out], "kinds"),
        (["stitch", zoo, "--sites", "typo", "--out", out], "typo"),
        (["stitch", zoo, "--sites", ",", "--out", out], "sites"),
        (["stitch", zoo, "--pairs", "-1", "--out", out], ">= 0"),
        (["stitch", zoo, "--epochs", "0", "--out", out], "positive"),
        (["stitch", zoo, "--lr", "nan", "--out", out], "finite"),
        (["stitch", zoo, "--lr", "-1", "--out", out], "> 0"),
        (["stitch", zoo, "--batch-size", "0", "--out", out], "positive"),
        (["stitch", zoo, "--device", "tpu", "--out", out], "device"),
        (["stitch", tmp / "nozoo", "--out", out], "does not exist"),
        (["stitch", tmp, "--out", out], "no trained models|several"),
        (["stitch", zoo, "--out", a_file], "not a folder"),
        (["stitch", zoo, "--out", "/proc/intertwiners-x"], "cannot write"),
        # similarity
        (["similarity", damaged, m0, "--out", out], "damaged|pickle"),
        (["similarity", m0, tmp / "missing", "--out", out], "does not exist"),
        (["similarity", m0, m0, "--measures", "bogus", "--out", out], "bogus"),
        (["similarity", m0, m0, "--procrustes", "bogus", "--out", out], "bogus"),
        (["similarity", m0, m0, "--measures", "", "--procrustes", "", "--out", out], "nothing"),
        (["similarity", m0, m0, "--batch-size", "0", "--out", out], "positive"),
        (["similarity", m0, m0, "--batch-size", "2", "--out", out], "at least 4"),
        (["similarity", m0, m0, "--max-samples", "0", "--out", out], "positive"),
        (["similarity", m0, m0, "--device", "tpu", "--out", out], "device"),
        (["similarity", m0, m0, "--out", a_file], "not a folder"),
        (["similarity", m0, m0, "--dataset", "cifar10", "--out", out], "data-root"),
        # rotation-penalty
        (["rotation-penalty", "--train-subset", "0", "--out", out], "positive"),
        (["rotation-penalty", "--train-subset", "-5", "--out", out], "positive"),
        (["rotation-penalty", "--epochs", "0", "--out", out], "positive"),
        (["rotation-penalty", "--transforms", "bogus", "--out", out], "bogus"),
        (["rotation-penalty", "--transforms", "", "--out", out], "transforms"),
        (["rotation-penalty", "--layers", "", "--out", out], "layers"),
        (["rotation-penalty", "--activations", "leaky_relu:nan", "--out", out], "finite"),
        (["rotation-penalty", "--seeds", "x", "--out", out], "seed"),
        (["rotation-penalty", "--device", "tpu", "--out", out], "device"),
        (["rotation-penalty", "--model", tmp / "missing", "--out", out], "does not exist"),
        (["rotation-penalty", "--model", damaged, "--out", out], "JSON object"),
        (["rotation-penalty", "--out", a_file], "not a folder"),
        (["rotation-penalty", "--out", "/proc/intertwiners-x"], "cannot write"),
        # dissect
        (["dissect", "--out", out], "--data"),
        (["dissect", "--data", tmp, "--out", out], "--model"),
        (["dissect", "--data", tmp, "--fig3", "--quantile", "2", "--out", out], "between 0 and 1"),
        (["dissect", "--data", tmp, "--fig3", "--iou-threshold", "nan", "--out", out], "finite"),
        (["dissect", "--data", tmp, "--fig3", "--alphas", "nan", "--out", out], "finite"),
        (["dissect", "--data", tmp, "--fig3", "--alphas", "x", "--out", out], "alphas"),
        (["dissect", "--data", tmp, "--fig3", "--images", "0", "--out", out], "positive"),
        (["dissect", "--data", tmp, "--fig3", "--device", "tpu", "--out", out], "device"),
        (["dissect", "--data", tmp, "--model", tmp / "missing", "--site", "relu1", "--out", out], "does not exist"),
        (["dissect", "--data", a_file, "--fig3", "--out", out], "not a folder"),
        (["dissect", "--data", tmp, "--fig3", "--out", a_file], "not a folder"),
        # reproduce
        (["reproduce", "--scale", "huge", "--out", out], "scale"),
        (["reproduce", "--scale", "paper", "--out", out], "data-root"),
        (["reproduce", "--workers", "-1", "--out", out], ">= 0"),
        (["reproduce", "--device", "tpu", "--out", out], "device"),
        (["reproduce", "--gpus-per-job", "-1", "--out", out], ">= 0"),
        (["reproduce", "--gpus-per-job", "0.5", "--out", out], "backend ray"),
        (["reproduce", "--ray-address", "127.0.0.1:1", "--out", out], "backend ray"),
        (["reproduce", "--data-root", tmp / "nope", "--out", out], "does not exist"),
        (["reproduce", "--backend", "slurm", "--out", out], "invalid choice"),
        (["reproduce", "--out", a_file], "not a folder"),
        (["reproduce", "--out", "/proc/intertwiners-x"], "cannot write"),
        # more argparse-level mistakes: still one line
        (["train", "--shortcut", "C", "--out", out], "invalid choice"),
        (["similarity", m0], "required"),
        (["group", "relu", "--seed", "x"], "invalid"),
        (["stitch", zoo, "--settings", "fast", "--out", out], "invalid choice"),
        (["dissect", "--data", tmp, "--fig3", "--steps", "0", "--out", out], "positive"),
        (["rotation-penalty", "--finetune", "some", "--out", out], "invalid choice"),
        (["rotation-penalty", "--width", "0", "--out", out], "positive"),
        (["reproduce", "--dataset", "mnist", "--out", out], "invalid choice"),
        # report
        (["report", tmp / "missing"], "not a folder"),
        (["report", tmp], "results.sqlite"),
        (["report", a_file], "not a folder"),
    ]


def test_cli_user_mistakes_are_one_line(capsys, tmp_path, zoo, a_file):
    tmp = tmp_path / "t"
    tmp.mkdir()
    cases = _cli_cases(tmp, zoo, a_file)
    before = snapshot(tmp_path)
    failures = []
    for argv, match in cases:
        start = time.perf_counter()
        code, out, err = run_cli(capsys, *argv)
        try:
            assert_one_line_error(code, err, match)
            assert time.perf_counter() - start < 20, "checked before any work"
        except AssertionError as e:
            failures.append(f"{argv}: {e}")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 90
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "no existing file was changed"
    assert not (tmp / "out").exists() or not any((tmp / "out").rglob("*.csv")), "nothing was written"


def test_stitch_with_a_typo_keeps_the_existing_csv(capsys, tmp_path, zoo):
    out = tmp_path / "S"
    out.mkdir()
    (out / "stitch.csv").write_text("zoo,pair\nprecious,0\n")
    code, _, err = run_cli(capsys, "stitch", zoo, "--sites", "typo", "--out", out)
    assert_one_line_error(code, err, "typo")
    assert (out / "stitch.csv").read_text() == "zoo,pair\nprecious,0\n"
    assert sorted(p.name for p in out.iterdir()) == ["stitch.csv"]


def test_an_error_mid_stitch_keeps_the_old_csv_and_the_new_rows(capsys, tmp_path, zoo, monkeypatch):
    import intertwiners.stitching.sweep as sweep

    def fake_sweep(folders, sites, kinds, on_row=None, **kwargs):
        on_row({k: 0 for k in sweep.ROW_KEYS} | {"site": "relu1", "kind": "full", "activation": "relu"})
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "S" / "x"))

    monkeypatch.setattr(sweep, "stitch_sweep", fake_sweep)
    out = tmp_path / "S"
    out.mkdir()
    (out / "stitch.csv").write_text("old\n")
    code, _, err = run_cli(capsys, "stitch", zoo, "--sites", "relu1", "--kinds", "full", "--out", out, "--quiet")
    assert_one_line_error(code, err, "disk full")
    assert (out / "stitch.csv").read_text() == "old\n"
    assert "relu1" in (out / "stitch.partial.csv").read_text()   # the row computed before the error is kept


@pytest.mark.parametrize("exc, match", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/y"), "disk full.*/x/y"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/z"), "Permission denied"),
    (sqlite3.OperationalError("database or disk is full"), "disk is full"),
    (sqlite3.DatabaseError("file is not a database"), "damaged"),
    (MemoryError(), "out of memory"),
    (ValueError("a\nmulti-line\nmessage"), "a multi-line message"),
], ids=str)
def test_expected_failures_become_one_line(capsys, monkeypatch, exc, match):
    import intertwiners.commands.group as group

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(group, "check_intertwining", boom)
    code, _, err = run_cli(capsys, "group", "relu")
    assert_one_line_error(code, err, match)


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    import intertwiners.commands.group as group

    monkeypatch.setattr(group, "check_intertwining", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["group", "relu"])


def test_help_and_version_exit_zero(capsys):
    assert cli.main(["--version"]) == 0
    assert cli.main(["train", "--help"]) == 0
    capsys.readouterr()


def test_train_with_a_bad_out_fails_before_training(tmp_path, a_file):
    """Via the console script: one line, a non-zero status, and it fails in seconds, not after training."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "intertwiners.cli", "train", "--out", str(a_file), "--epochs", "50"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.perf_counter() - start < 60
    assert a_file.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# the results store and the runner


def _make_store(folder: Path) -> Path:
    from intertwiners.experiments import ResultsStore
    with ResultsStore(folder) as store:
        store.set_meta("plan", {"name": "x"})
        for k in range(40):
            store.record(id=f"j{k}", kind="probe", label=f"j{k}", config={"k": k, "pad": "x" * 200}, deps={},
                         status="done", result={"value": k})
    return folder / "results.sqlite"


def _damage_db(kind: str):
    def f(path: Path):
        raw = path.read_bytes()
        if kind == "garbage":
            path.write_bytes(os.urandom(len(raw)))
        elif kind == "truncated":
            path.write_bytes(raw[: len(raw) // 2 + 7])
        elif kind == "header only":
            path.write_bytes(raw[:100])
        elif kind == "text":
            path.write_text("results: none\n" * 50)
        elif kind == "zeroed pages":
            path.write_bytes(raw[:4096] + b"\0" * (len(raw) - 4096))
        elif kind == "a foreign database":
            path.unlink()
            con = sqlite3.connect(path)
            con.execute("CREATE TABLE other (a)")
            con.commit()
            con.close()
        elif kind == "a folder":
            path.unlink()
            path.mkdir()
        elif kind == "json in a row":
            con = sqlite3.connect(path)
            con.execute("UPDATE jobs SET result='{not json' WHERE id='j3'")
            con.commit()
            con.close()
    return f


DB_DAMAGE = ["garbage", "truncated", "header only", "text", "zeroed pages", "a foreign database", "a folder",
             "json in a row"]


@pytest.mark.parametrize("kind", DB_DAMAGE)
def test_damaged_results_database(capsys, tmp_path, kind):
    from intertwiners.experiments import ResultsStore

    path = _make_store(tmp_path)
    _damage_db(kind)(path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="results|database|damaged|folder|not a file"):
        with ResultsStore(tmp_path, readonly=True) as store:
            store.rows()
    for argv in (["report", tmp_path], ["reproduce", "--scale", "test", "--out", tmp_path, "--quiet"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err)
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a damaged database is never overwritten"


def test_a_refused_second_driver_does_not_rewrite_the_plan(tmp_path):
    from intertwiners.experiments import ResultsStore, reproduce
    from intertwiners.experiments.runner import driver_lock

    reproduce(tmp_path, "test", backend="inline", progress=False, report=False)
    with ResultsStore(tmp_path, readonly=True) as store:
        plan, ids = store.get_meta("plan"), store.get_meta("plan_ids")
    with driver_lock(tmp_path):
        with pytest.raises(ValueError, match="another driver"):
            reproduce(tmp_path, "smoke", backend="inline", progress=False, report=False)
    with ResultsStore(tmp_path, readonly=True) as store:
        assert store.get_meta("plan") == plan and store.get_meta("plan_ids") == ids


@pytest.mark.parametrize("damage", ["delete", "truncate", "extend", "rmdir", "rename"])
def test_a_done_job_whose_artifact_file_is_damaged_is_recomputed(tmp_path, damage):
    from intertwiners.experiments import ResultsStore, run_jobs
    from intertwiners.experiments.backends import InlineBackend
    from intertwiners.experiments.plan import probe_plan

    plan = probe_plan(sleep_s=0)
    run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    root = plan.jobs[0]
    with ResultsStore(tmp_path) as store:
        folder = tmp_path / store.get(root.id).artifact
        assert store.manifest(root.id) == {"probe.txt": (folder / "probe.txt").stat().st_size}
    good = (folder / "probe.txt").read_bytes()
    f = folder / "probe.txt"
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(good[:2])
    elif damage == "extend":
        f.write_bytes(good + b"junk")
    elif damage == "rmdir":
        f.unlink()
        folder.rmdir()
    else:
        f.rename(folder / "other.txt")
    again = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    assert again.executed == 1 and again.failed == 0
    assert (folder / "probe.txt").read_bytes() == good


def test_ray_address_that_nobody_listens_on_fails_fast():
    pytest.importorskip("ray")
    from intertwiners.experiments.backends import check_reachable

    start = time.perf_counter()
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ValueError, match="cannot reach"):
            check_reachable(address)
    for address in ("nohost", "127.0.0.1:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            check_reachable(address)
    assert time.perf_counter() - start < 15


def test_reproduce_with_an_unreachable_ray_cluster_is_one_line(capsys, tmp_path):
    pytest.importorskip("ray")
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "reproduce", "--backend", "ray", "--ray-address", "127.0.0.1:1", "--scale", "test",
                           "--out", tmp_path, "--quiet", "--no-report")
    assert_one_line_error(code, err, "cannot reach")
    assert time.perf_counter() - start < 30


def test_parent_death_signal_is_set_in_local_workers():
    """The worker initializer asks the kernel for SIGKILL when the driver dies (checked in a forked child)."""
    import ctypes

    from intertwiners._worker import set_parent_death_signal
    if not sys.platform.startswith("linux"):
        pytest.skip("prctl is Linux only")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = set_parent_death_signal()
            v = ctypes.c_int()
            ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)      # PR_GET_PDEATHSIG
            os.write(write_end, f"{int(ok)} {v.value}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == "1 9"                              # set, and the signal is SIGKILL


def test_io_buffer_helpers_are_atomic(tmp_path):
    from intertwiners.commands._args import atomic_write, write_csv
    target = tmp_path / "t.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write("new, half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    write_csv(target, ["a"], [{"a": 1}])
    assert target.read_text().splitlines() == ["a", "1"]


# ---------------------------------------------------------------------------------------------------------------
# the rest of the API surface owned here: constructors, datasets, training, features, streaming similarity

API_CASES = {
    "myrtle width a string": lambda: models.myrtle_cnn(width="a"),
    "myrtle width 0": lambda: models.myrtle_cnn(width=0),
    "myrtle width 1.5": lambda: models.myrtle_cnn(width=1.5),
    "myrtle input_size a string": lambda: models.myrtle_cnn(input_size="32"),
    "myrtle input_size 12": lambda: models.myrtle_cnn(input_size=12),
    "myrtle batch_norm a string": lambda: models.myrtle_cnn(batch_norm="no"),
    "resnet two widths": lambda: models.resnet20(widths=(1, 2)),
    "resnet widths a string": lambda: models.resnet20(widths="abc"),
    "resnet num_classes 0": lambda: models.resnet20(num_classes=0),
    "resnet shortcut C": lambda: models.resnet20(shortcut="C"),
    "mlp in_features 0": lambda: models.mlp(0),
    "mlp in_features a string": lambda: models.mlp("4"),
    "mlp hidden an int": lambda: models.mlp(4, hidden=3),
    "mlp hidden negative": lambda: models.mlp(4, hidden=(-3,)),
    "mlp num_classes -1": lambda: models.mlp(4, num_classes=-1),
    "build a list": lambda: models.build([1]),
    "data.load None": lambda: data.load(None),
    "data.load unknown": lambda: data.load("mnist"),
    "cifar10 root a file": lambda: data.load("cifar10", root="/etc/hostname"),
    "cifar10 root missing": lambda: data.load("cifar10", root="/nonexistent/cifar"),
    "cifar10 no root": lambda: data.load("cifar10"),
    "digits size 7": lambda: data.load_digits(size=7),
    "digits size 0": lambda: data.load_digits(size=0),
    "digits test_fraction 2": lambda: data.load_digits(test_fraction=2),
    "ArrayDataset mismatched": lambda: data.ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2), 10, "x"),
    "ArrayDataset lists": lambda: data.ArrayDataset([1], [1], 10, "x"),
    "split 0": lambda: tiny_data()[0].split(0),
    "split 1": lambda: tiny_data()[0].split(1.0),
    "train_one unknown arch": lambda: __import__("intertwiners.training").training.train_one(
        "vgg", epochs=1, progress=False, data=tiny_data()),
    "train_one epochs 0": lambda: __import__("intertwiners.training").training.train_one(
        "mlp", epochs=0, progress=False, data=tiny_data()),
    "train_one device tpu": lambda: __import__("intertwiners.training").training.train_one(
        "mlp", epochs=1, device="tpu", progress=False, data=tiny_data()),
    "train_one leaky_relu:nan": lambda: __import__("intertwiners.training").training.train_one(
        "mlp", epochs=1, progress=False, data=tiny_data(), activation="leaky_relu:nan"),
    "extract unknown site": lambda: sim_extract(["nope"], torch.randn(3, 4)),
    "extract wrong input shape": lambda: sim_extract(["act1"], torch.randn(3, 5)),
    "extract NaN input": lambda: sim_extract(["act1"], torch.full((3, 4), float("nan"))),
    "cka unknown kernel": lambda: sim.cka(X0, Y0, kernel="poly"),
    "cka unknown estimator": lambda: sim.cka(X0, Y0, estimator="unbiassed"),
    "cka rbf threshold 0": lambda: sim.cka(X0, Y0, kernel="rbf", threshold=0),
    "cka rbf threshold nan": lambda: sim.cka(X0, Y0, kernel="rbf", threshold=float("nan")),
    "cka rbf sigma nan": lambda: sim.cka(X0, Y0, kernel="rbf", sigma=float("nan")),
    "cka rbf sigma 0": lambda: sim.cka(X0, Y0, kernel="rbf", sigma=0.0),
    "cka device tpu": lambda: sim.cka(X0, Y0, device="tpu"),
    "cka linear_route": lambda: sim.cka(X0, Y0, linear_route="fast"),
    "procrustes unknown group": lambda: sim.procrustes(X0, Y0, group="x"),
    "procrustes widths differ": lambda: sim.procrustes(X0, Y0[:, :3], group="grelu"),
    "procrustes chunk_rows 0": lambda: sim.procrustes(X0, Y0, chunk_rows=0),
    "procrustes spatial sizes differ": lambda: sim.procrustes(np.ones((6, 2, 3, 3)), np.ones((6, 2, 2, 2))),
    "max_kernel feature shapes differ": lambda: sim.max_kernel(X0, Y0[:, :3]),
    "max_kernel unknown backend": lambda: sim.max_kernel(X0, backend="cuda"),
    "grelu_cka every column dead": lambda: sim.grelu_cka(np.zeros((6, 2)), X0[:6, :2], drop_dead=True),
    "layer matrix unknown measure": lambda: sim.layer_similarity_matrix(models.mlp(4), models.mlp(4),
                                                                        torch.randn(8, 4), measure="x"),
    "layer matrix batch_size 0": lambda: sim.layer_similarity_matrix(models.mlp(4), models.mlp(4),
                                                                     torch.randn(8, 4), batch_size=0),
    "layer matrix no data": lambda: sim.layer_similarity_matrix(models.mlp(4), models.mlp(4), torch.randn(0, 4)),
    "layer matrix 3 samples": lambda: sim.layer_similarity_matrix(models.mlp(4), models.mlp(4), torch.randn(3, 4)),
    "procrustes per layer unknown group": lambda: sim.procrustes_per_layer(models.mlp(4), models.mlp(4),
                                                                           torch.randn(8, 4), groups=["x"]),
    "procrustes per layer 1 sample": lambda: sim.procrustes_per_layer(models.mlp(4), models.mlp(4),
                                                                      torch.randn(1, 4)),
}


def sim_extract(sites, inputs):
    from intertwiners import extract_features
    return extract_features(models.mlp(4, hidden=(3,)), sites, inputs, device="cpu")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input_is_a_value_error(case):
    with pytest.raises(ValueError):
        API_CASES[case]()


def test_disk_full_during_reproduce_is_one_line(capsys, tmp_path, monkeypatch):
    from intertwiners.experiments import store as store_mod

    def full(self, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store_mod.ResultsStore, "record", full)
    code, _, err = run_cli(capsys, "reproduce", "--scale", "test", "--backend", "inline", "--out", tmp_path,
                           "--quiet", "--no-report")
    assert_one_line_error(code, err, "disk is full")


def test_an_artifact_that_cannot_be_written_is_a_recorded_failure(tmp_path, monkeypatch):
    from intertwiners.experiments import ResultsStore, run_jobs, runner
    from intertwiners.experiments.backends import InlineBackend
    from intertwiners.experiments.plan import probe_plan

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "_write_artifact", full)
    plan = probe_plan(sleep_s=0)
    summary = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)
    assert summary.failed >= 1 and any("No space left" in e for _, e in summary.failures)
    with ResultsStore(tmp_path, readonly=True) as store:
        assert all(r.status == "failed" for r in store.rows() if r.artifact is None and "root" in r.label)
    monkeypatch.undo()
    again = run_jobs(plan.jobs, tmp_path, InlineBackend(), progress=False)   # disk freed: everything completes
    assert again.failed == 0 and again.blocked == 0


@pytest.mark.parametrize("measure", sorted(MEASURES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_value_of_their_rounded_data(measure, dtype):
    f = MEASURES[measure]
    xs = X0c if "max" in measure or "grelu" in measure else X0
    ys = np.abs(xs) + 0.5 * xs * xs if xs is X0c else Y0
    x, y = torch.tensor(xs).to(dtype), torch.tensor(ys).to(dtype)
    assert f(x, y) == pytest.approx(f(x.double(), y.double()), abs=1e-5)
