"""`intertwiners align A B --dataset digits --out DIR`: outputs, the aligned model's function, bad input."""

import csv
import json

import torch

from intertwiners import data, models
from intertwiners.cli import main


def test_align_cli_writes_model_csv_plot_and_barriers(tmp_path, capsys):
    torch.manual_seed(0)
    for name in ("a", "b"):
        models.save(models.myrtle_cnn(width=2, in_channels=1, input_size=16), tmp_path / name)
    out = tmp_path / "out"
    rc = main(["align", str(tmp_path / "a"), str(tmp_path / "b"), "--dataset", "digits", "--out", str(out),
               "--alphas", "3", "--align-samples", "200"])
    assert rc == 0
    rows = list(csv.DictReader((out / "interpolation.csv").open()))
    variants = {r["variant"] for r in rows}
    assert len(rows) == 15 and len(variants) == 5 and "none" in variants
    assert all(0 <= float(r["accuracy"]) <= 100 for r in rows)
    assert (out / "interpolation.png").stat().st_size > 0
    barriers = json.loads((out / "barriers.json").read_text())["barriers"]
    assert set(barriers) == variants and all(set(b) == {"loss", "accuracy"} for b in barriers.values())
    aligned, b = models.load(out / "aligned").eval(), models.load(tmp_path / "b").eval()
    _, test = data.load("digits")
    with torch.no_grad():
        assert torch.allclose(aligned(test.x[:32]), b(test.x[:32]), atol=1e-4)
    assert not any(p.name.endswith(".partial") or ".partial." in p.name for p in out.iterdir())
    assert "full group (activations)" in capsys.readouterr().out


def test_align_cli_bad_input_is_one_line(tmp_path, capsys):
    models.save(models.mlp(256, hidden=(4,)), tmp_path / "a")
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("intertwiners align: error:") and "\n" not in err
    models.save(models.mlp(256, hidden=(5,)), tmp_path / "b")
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--alphas", "1"]) == 2
