"""The report is drawn from results.sqlite alone, and its yes/no sentences follow the data."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from intertwiners import cli
from intertwiners.experiments import ResultsStore, run_jobs
from intertwiners.experiments.backends import InlineBackend
from intertwiners.experiments.plan import probe_plan
from intertwiners.experiments.report import mean_ci

SITES = ["relu1", "relu2", "relu3", "relu4"]


def fill(out: Path, grelu_better: bool) -> None:
    """Synthetic rows of every experiment kind; ``grelu_better`` decides every G_ReLU-vs-other claim."""
    n = 0

    def rec(kind, config, result, deps=None):
        nonlocal n
        n += 1
        store.record(id=f"{kind}{n:04d}", kind=kind, label=f"{kind} {n}", config=config, deps=deps or {},
                     status="done", result=result, wall_s=0.1)

    with ResultsStore(out) as store:
        store.set_meta("plan", {"name": "synthetic", "scale": {"dataset": "digits"}, "jobs": 0,
                                "missing": {"fig0_nothing": "module intertwiners.nothing is not available"}})
        for seed in range(2):
            rec("zoo", {"arch": "myrtle_cnn", "dataset": "digits", "seed": seed, "epochs": 3, "arch_kwargs": {}},
                {"test_accuracy": 98.0 + seed, "epochs": 3})
        g, o = (1.0, 5.0) if grelu_better else (5.0, 1.0)
        for pair in range(3):
            deps = {"front": f"zoo{pair}", "back": f"zoo{pair + 1}"}
            for i, site in enumerate(SITES):
                for kind, rank, pen in [("full", None, 0.5), ("low_rank", 1, 30.0 + i), ("grelu", None, 10 * g)]:
                    rec("stitch", {"experiment": "fig1", "site": site, "kind": kind, "rank": rank},
                        {"penalty": pen + 0.1 * pair}, deps)
            for slope in (0.0, 0.5, 1.0):
                grelu = (20.0 if slope == 1.0 else 5.0) if grelu_better else 5.0
                for kind, pen in [("full", 1.0), ("grelu", grelu)]:
                    rec("stitch", {"experiment": "d3", "site": "layer1.1.relu2", "kind": kind, "rank": None,
                                   "slope": slope}, {"penalty": pen + 0.1 * pair}, deps)
            for layer in ("conv1", "conv2", "conv3"):
                for transform, pen in [("grelu", g), ("orthogonal", o)]:
                    rec("rotation_penalty", {"layer": layer, "transform": transform, "seed": pair},
                        {"penalty": pen + 0.1 * pair})
                    # sigmoid: P·D is no symmetry, so it loses its advantage (when the paper's claims hold)
                    sig = 3.0 if grelu_better else (0.0 if transform == "grelu" else 10.0)
                    rec("rotation_penalty", {"layer": layer, "transform": transform, "seed": pair,
                                             "activation": "sigmoid"}, {"penalty": sig})
            rec("procrustes", {"experiment": "table2"}, {"sites": SITES, "grelu": [0.5 * g / 5] * 4,
                                                         "orthogonal": [0.5 * o / 5] * 4})
            # diagonal-dominant matrices when the paper's claims should hold, anti-diagonal ones otherwise
            top = [[1.0 if (i == j) == grelu_better and (i + j == 3 or grelu_better) else 0.2 for j in range(4)]
                   for i in range(4)]
            half = [[0.5 * v for v in row] for row in top]
            for experiment in ("fig5", "fig2"):
                rec("cka", {"experiment": experiment}, {"sites": SITES, "linear": top if grelu_better else half,
                                                        "grelu": half if grelu_better else top})
            for arch, act in [("resnet", True), ("resnet_noact", False)]:
                drop = 0.3 if (act == grelu_better) else 0.0
                rec("dissection_model", {"arch": arch, "seed": pair}, {"arch": arch})
                points = [{"alpha": a, "rotation": r, "fraction": 0.5 - drop * a + 0.01 * r}
                          for a in (0.0, 0.5, 1.0) for r in range(2)]
                rec("dissection", {"site": "stage3.1", "seed": pair},
                    {"site": "stage3.1", "layer": "relu" if act else "no activation", "activation_at_site": act,
                     "rows": points}, {"model": f"dissection_model{n:04d}"})
        store.record(id="broken", kind="stitch", label="stitch broken", config={}, deps={}, status="failed",
                     error="Traceback ...\nRuntimeError: something went wrong")


FIGURES = ["fig1_stitching.png", "fig4_rotation_penalty.png", "d3_leaky_relu.png", "table2_procrustes.png",
           "fig5_cka.png", "fig2_cka.png", "fig3_dissection.png"]


def render_alone(out: Path) -> str:
    """Delete everything but results.sqlite, run `intertwiners report DIR`, return report.md."""
    for p in out.iterdir():
        if p.name != "results.sqlite":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert cli.main(["report", str(out)]) == 0
    return (out / "report.md").read_text()


def claims(text: str) -> list[str]:
    return re.findall(r"^- (.*): \*\*(yes|no)\*\*\.$", text, flags=re.M)


def test_report_renders_every_figure_from_the_database_alone(tmp_path):
    fill(tmp_path, grelu_better=True)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "junk").write_text("x")
    text = render_alone(tmp_path)
    for name in FIGURES:
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
        assert f"figures/{name}" in text
    found = claims(text)
    assert len(found) == 12 and all(answer == "yes" for _, answer in found), found
    assert "fig0_nothing" in text and "not run" in text  # missing experiments are named
    assert "RuntimeError: something went wrong" in text  # failures are listed with their error
    assert "(paper 0.6208)" in text and "(paper 8.3)" in text  # the paper's numbers beside ours


def test_report_says_no_when_the_data_contradicts_the_paper(tmp_path):
    fill(tmp_path, grelu_better=False)
    found = dict(claims(render_alone(tmp_path)))
    assert found["- Full (affine) stitching has the lowest penalty at every layer"[2:]] == "yes"
    negative = {k: v for k, v in found.items() if not k.startswith("Full")}
    assert negative and all(v == "no" for v in negative.values()), found


def test_report_from_a_real_run_without_its_artifacts(tmp_path):
    run_jobs(probe_plan(sleep_s=0).jobs, tmp_path, InlineBackend(), progress=False)
    text = render_alone(tmp_path)
    assert (tmp_path / "figures" / "probe.png").is_file()
    assert "9 jobs done, 0 failed" in text


def test_mean_ci_matches_the_t_interval():
    m, h, n = mean_ci([1.0, 2.0, 3.0, 4.0])
    # t(0.975, 3) = 3.182446305...; sd = 1.2909944
    assert (m, n) == (2.5, 4) and abs(h - 3.1824463 * 1.2909944 / 2) < 1e-6
    assert mean_ci([7.0]) == (7.0, 0.0, 1)
