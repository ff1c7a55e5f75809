import json

import pytest
import torch

from intertwiners import models
from intertwiners.cli import main
from intertwiners.training import accuracy, train_one, train_zoo


@pytest.fixture(scope="module")
def small_digits(digits):
    train, test = digits
    return train.subset(torch.arange(600)), test


def test_training_is_deterministic_per_seed(small_digits):
    a, ma = train_one("myrtle_cnn", "digits", 3, epochs=1, progress=False, data=small_digits, width=4)
    b, mb = train_one("myrtle_cnn", "digits", 3, epochs=1, progress=False, data=small_digits, width=4)
    c, _ = train_one("myrtle_cnn", "digits", 4, epochs=1, progress=False, data=small_digits, width=4)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert ma["test_accuracy"] == mb["test_accuracy"]
    assert not all(torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_short_digits_run_learns(digits, myrtle8_digits):
    model, m = myrtle8_digits(0)   # train_one("myrtle_cnn", "digits", 0, epochs=3, data=digits, width=8), shared
    # three epochs of an 8-wide mCNN on digits: chance is 10%; measured ~98%
    assert m["test_accuracy"] > 90.0
    assert 0 <= m["train_accuracy"] <= 100 and 0 <= m["val_accuracy"] <= 100
    assert m["epochs"] == 3 and 1 <= m["best_epoch"] <= 3
    assert accuracy(model, digits[1]) == pytest.approx(m["test_accuracy"])


def test_mlp_and_resnet_train_one_epoch(small_digits):
    _, m = train_one("mlp", "digits", 0, epochs=1, progress=False, data=small_digits)
    assert m["test_accuracy"] > 30
    model, m = train_one("resnet20", "digits", 0, epochs=1, progress=False, data=small_digits,
                         widths=(4, 4, 8), activation="leaky_relu:0.2")
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


def test_zoo_folders_and_skip(tmp_path, monkeypatch, small_digits):
    import intertwiners.training as tr

    monkeypatch.setattr(tr, "load_data", lambda name, root=None: small_digits)
    res = train_zoo("myrtle_cnn", "digits", [0, 1], tmp_path, epochs=1, progress=False, width=4)
    folder = tmp_path / "myrtle_cnn-digits" / "seed1"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("test_accuracy", "train_accuracy", "val_accuracy", "epochs"):
        assert key in metrics
    assert metrics == res[1]
    loaded = models.load(folder)
    assert accuracy(loaded, small_digits[1]) == pytest.approx(metrics["test_accuracy"])
    # a second run trains nothing
    calls = []
    monkeypatch.setattr(tr, "train_many", lambda *a, **k: calls.append(a))
    assert train_zoo("myrtle_cnn", "digits", [0, 1], tmp_path, epochs=1, progress=False, width=4) == res
    assert calls == []
    # a half-written folder (no metrics.json) is not taken as complete
    (tmp_path / "myrtle_cnn-digits" / "seed0" / "metrics.json").unlink()
    with pytest.raises(TypeError):  # the stub train_many is called for seed 0 again
        train_zoo("myrtle_cnn", "digits", [0, 1], tmp_path, epochs=1, progress=False, width=4)
    assert len(calls) == 1


def test_cli_train(tmp_path, capsys):
    assert main(["train", "--arch", "mlp", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path),
                 "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["seed"] == 0
    assert (tmp_path / "mlp-digits" / "seed0" / "model.safetensors").is_file()


def test_cli_reports_bad_input(capsys):
    assert main(["train", "--seeds", "3-1", "--out", "/tmp/never"]) == 2
    assert "seed range" in capsys.readouterr().err
