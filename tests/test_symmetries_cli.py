"""`intertwiners verify` on an architecture name and on a saved model folder."""

import json

from intertwiners import cli, models


def test_verify_architecture_name(capsys):
    rc = cli.main(["verify", "resnet20", "--shortcut", "A", "--batch", "2", "--trials", "1", "--input-size", "8",
                   "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and out["max_rel"] <= 1e-9
    assert len(out["spaces"]) == 12 and out["pinned"] == {}
    assert {r["mode"] for r in out["errors"]} == {"eval", "train"}


def test_verify_saved_folder(tmp_path, capsys):
    folder = models.save(models.myrtle_cnn(4, activation="gaussian", input_size=8), tmp_path / "m")
    rc = cli.main(["verify", str(folder), "--dtype", "float32", "--batch", "4", "--trials", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "signed_permutation" in text and "OK: every space within rtol 0.0001" in text
    assert "relu1" in text and "<all spaces>" in text


def test_verify_bad_model(capsys):
    assert cli.main(["verify", "no_such_model"]) == 2
    assert "neither a saved model folder nor an architecture" in capsys.readouterr().err
