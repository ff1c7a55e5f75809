"""The Fig. 3 models, the experiment's rows and plot, and the `intertwiners dissect` command (tiny settings)."""

import csv
import json

import pytest
import torch

from intertwiners.cli import main
from intertwiners.dissection import BrodenDataset, make_synthetic_broden
from intertwiners.dissection.experiment import fig3_experiment, plot_fig3, rotation_curve, summarize
from intertwiners.dissection.fig3_models import FIG3_ARCHITECTURES, build_fig3_model, load_any, save


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig3_data")
    make_synthetic_broden(root, n_images=32, seed=0, image_size=16)
    return root


@pytest.mark.parametrize("arch", FIG3_ARCHITECTURES)
def test_fig3_models_shapes_sites_and_round_trip(arch, tmp_path):
    from intertwiners.dissection.dissect import SiteReader

    model = build_fig3_model(arch, 4, widths=(4, 8, 8), blocks=2).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 4)
    with torch.no_grad():
        block = SiteReader(model, "stage3.1")(x)
    assert block.shape == (2, 8, 4, 4)
    if arch == "resnet":
        assert (block >= 0).all()  # ReLU on the residual output
    else:
        assert (block < 0).any()   # no activation there
    loaded = load_any(save(model, tmp_path / arch))
    assert torch.equal(loaded(x), model(x))


def test_rotation_curve_rows(tiny_root):
    ds = BrodenDataset(tiny_root)
    model = build_fig3_model("resnet", 4, widths=(4, 8, 8), blocks=1)
    rows = rotation_curve(model, "stage3.0", ds, [0.0, 0.5, 1.0], 2, quantile=0.05, iou_threshold=0.1)
    assert len(rows) == 3 * 2
    assert {(r["alpha"], r["rotation"]) for r in rows} == {(a, r) for a in (0.0, 0.5, 1.0) for r in (0, 1)}
    zero = [r for r in rows if r["alpha"] == 0.0]
    assert zero[0]["interpretable_units"] == zero[1]["interpretable_units"]  # alpha = 0 is the unit basis
    assert all(0 <= r["fraction"] <= 1 and r["n_units"] == 8 for r in rows)


def test_fig3_experiment_tiny_run_and_plot(tmp_path):
    rows = fig3_experiment(tmp_path / "data", alphas=[0, 1], n_rotations=1, archs=["resnet_noact"],
                           n_images=24, image_size=16, steps=2, widths=(4, 8, 8), blocks=2, device="cpu")
    sites = {r["site"] for r in rows}
    assert sites == {"stage3.1", "stage3.1.relu1"} and len(rows) == 4
    assert all(r["arch"] == "resnet_noact" and 0 <= r["val_accuracy"] <= 100 for r in rows)
    assert len(summarize(rows)) == 4
    png = plot_fig3(rows, tmp_path / "fig3.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError):
        fig3_experiment(tmp_path / "data", archs=["vgg"])
    with pytest.raises(ValueError, match="no entry"):
        fig3_experiment(tmp_path / "data", archs=["resnet"], steps={"convnext": 1}, widths=(4, 8, 8))


def test_cli_dissects_a_saved_model(tiny_root, tmp_path, capsys):
    model_dir = save(build_fig3_model("convnext", 4, widths=(4, 8, 8), blocks=1), tmp_path / "model")
    out = tmp_path / "out"
    code = main(["dissect", "--model", str(model_dir), "--site", "stage3.0", "--data", str(tiny_root),
                 "--alphas", "0,1", "--rotations", "1", "--quantile", "0.05", "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["n_units"] == 8 and summary["quantile"] == 0.05
    rows = list(csv.DictReader(open(out / "units_stage3.0.csv")))
    assert len(rows) == 8
    assert (out / "units_stage3.0.png").is_file() and (out / "rotation_stage3.0.png").is_file()
    assert main(["dissect", "--data", str(tiny_root), "--out", str(out)]) == 2  # no --model: a clear error


def test_the_reproduce_job_s_synthetic_dataset_is_removed_when_its_process_exits(tmp_path):
    """Fig. 3's jobs build the synthetic dataset once per worker in a temporary folder; a worker that exits
    (multiprocessing workers end without running ``atexit``) leaves no folder behind."""
    import os
    import subprocess
    import sys

    code = ("import multiprocessing as mp\n"
            "from concurrent.futures import ProcessPoolExecutor\n"
            "from intertwiners.experiments.figures.fig3_dissection import synthetic_broden\n"
            "def make(_):\n"
            "    return synthetic_broden({'n_images': 4, 'image_size': 16, 'data_seed': 0})\n"
            "if __name__ == '__main__':\n"
            "    with ProcessPoolExecutor(1, mp_context=mp.get_context('fork')) as pool:   # as the local backend\n"
            "        child = pool.submit(make, 0).result()\n"
            "    import os; assert os.path.isdir(child) is False, child\n"
            "    print(synthetic_broden({'n_images': 4, 'image_size': 16, 'data_seed': 0}))\n")
    script = tmp_path / "make.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    main_root = out.stdout.strip().splitlines()[-1]
    assert main_root.startswith(str(tmp_path)) and not os.path.exists(main_root)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("intertwiners-broden-")]
