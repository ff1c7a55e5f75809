"""The report is drawn from results.sqlite alone, and its yes/no sentences follow the data."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from intertwiners import cli
from intertwiners.experiments import ResultsStore, run_jobs
from intertwiners.experiments.backends import InlineBackend
from intertwiners.experiments.figures import SECTIONS
from intertwiners.experiments.plan import probe_plan
from intertwiners.experiments.report import PlanView
from intertwiners.stats import mean_ci

SITES = ["relu1", "relu2", "relu3", "relu4"]


def fill(out: Path, grelu_better: bool, n_pairs: int = 3, noise: float = 0.01, seed: int = 0,
         accuracy: float = 98.0, nulls: bool = False, cluttered: bool = False) -> None:
    """Synthetic rows of every experiment kind; ``grelu_better`` decides every G_ReLU-vs-other claim.

    ``noise`` adds Gaussian noise (seeded) to every number, so that intervals have width (equal values never
    decide a claim); ``accuracy`` is every model's test accuracy (10 classes: 10% is chance); ``nulls`` adds
    permutation-test results; ``cluttered`` stores Fig. 4 and D.3 as run on ``digits-cluttered`` and the rest
    on ``digits`` (``reproduce --cluttered``).
    """
    n = 0
    rng = np.random.default_rng(seed)

    def jitter(v):
        return float(v + noise * rng.normal())

    def rec(kind, config, result, deps=None):
        nonlocal n
        n += 1
        if cluttered and kind != "dissection_model" and kind != "dissection":
            moved = kind == "rotation_penalty" or config.get("experiment") == "d3"
            config = {"dataset": "digits-cluttered" if moved else "digits", **config}
        store.record(id=f"{kind}{n:04d}", kind=kind, label=f"{kind} {n}", config=config, deps=deps or {},
                     status="done", result=result, wall_s=0.1)

    with ResultsStore(out) as store:
        store.set_meta("plan", {"name": "synthetic", "scale": {"dataset": "digits"}, "jobs": 0,
                                "missing": {"fig0_nothing": "module intertwiners.nothing is not available"}})
        for seed_ in range(n_pairs + 1):
            rec("zoo", {"arch": "myrtle_cnn", "dataset": "digits", "seeds": [seed_], "epochs": 3, "arch_kwargs": {}},
                {"parts": {f"seed{seed_}": {"test_accuracy": accuracy + 0.1 * seed_, "epochs": 3}}})
        g, o = (1.0, 5.0) if grelu_better else (5.0, 1.0)
        accs = {"front_accuracy": accuracy, "back_accuracy": accuracy}
        for pair in range(n_pairs):
            deps = {"front": f"zoo{pair + 1:04d}:seed{pair}", "back": f"zoo{pair + 2:04d}:seed{pair + 1}"}
            for i, site in enumerate(SITES):
                kinds = {kind: {"penalty": jitter(pen + 0.1 * pair), **accs}
                         for kind, pen in [("full", 0.5), ("low_rank:1", 30.0 + i), ("grelu", 10 * g)]}
                rec("stitch", {"experiment": "fig1", "site": site, "kinds": list(kinds)}, {"kinds": kinds}, deps)
            for slope in (0.0, 0.5, 1.0):
                grelu = (20.0 if slope == 1.0 else 5.0) if grelu_better else (2.0 if slope == 1.0 else 5.0)
                kinds = {kind: {"penalty": jitter(pen + 0.1 * pair), **accs} for kind, pen in [("full", 1.0),
                                                                                                ("grelu", grelu)]}
                rec("stitch", {"experiment": "d3", "site": "layer1.1.relu2", "kinds": list(kinds), "slope": slope},
                    {"kinds": kinds}, deps)
            for layer in ("conv1", "conv2", "conv3"):
                transforms = [("grelu", g), ("orthogonal", o)]
                rec("rotation_penalty", {"layer": layer, "transforms": [t for t, _ in transforms], "seeds": [pair]},
                    {"runs": [{"transform": t, "seed": pair, "penalty": jitter(pen + 0.1 * pair),
                               "baseline_accuracy": accuracy} for t, pen in transforms]})
                # sigmoid: P·D is no symmetry, so it loses its advantage (when the paper's claims hold)
                rec("rotation_penalty", {"layer": layer, "transforms": [t for t, _ in transforms], "seeds": [pair],
                                         "activation": "sigmoid"},
                    {"runs": [{"transform": t, "seed": pair, "baseline_accuracy": accuracy,
                               "penalty": jitter(3.0 if grelu_better else (0.0 if t == "grelu" else 10.0))}
                              for t, _ in transforms]})
            null = {m: {"pvalue": [0.002 if grelu_better else 0.4] * 4, "statistic": [0.5] * 4,
                        "chance_corrected": [0.3] * 4} for m in ("procrustes_grelu", "procrustes_orthogonal")}
            rec("procrustes", {"experiment": "table2"},
                {"sites": SITES, "grelu": [jitter(0.5 * g / 5) for _ in SITES],
                 "orthogonal": [jitter(0.5 * o / 5) for _ in SITES], **({"null": null} if nulls else {})},
                {"a": deps["front"], "b": deps["back"]})
            # diagonal-dominant matrices when the paper's claims should hold, anti-diagonal ones otherwise
            top = [[1.0 if (i == j) == grelu_better and (i + j == 3 or grelu_better) else 0.2 for j in range(4)]
                   for i in range(4)]
            top = [[jitter(v) for v in row] for row in top]
            half = [[0.5 * v for v in row] for row in top]
            cnull = {m: {**null["procrustes_grelu"]} for m in ("grelu_cka", "linear_cka")}
            for experiment in ("fig5", "fig2"):
                rec("cka", {"experiment": experiment}, {"sites": SITES, "linear": top if grelu_better else half,
                                                        "grelu": half if grelu_better else top,
                                                        **({"null": cnull} if nulls else {})},
                    {"a": deps["front"], "b": deps["back"]})
            for arch, act in [("resnet", True), ("resnet_noact", False)]:
                drop = 0.3 if (act == grelu_better) else -0.1
                rec("dissection_model", {"arch": arch, "seed": pair}, {"arch": arch, "probe_accuracy": 90.0})
                points = [{"alpha": a, "rotation": r, "fraction": jitter(0.5 - drop * a + 0.01 * r) if a else 0.5}
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


def claims(text: str) -> list[tuple[str, str]]:
    """(claim, answer) for every claim sentence of a report."""
    return [(c, a) for c, a, _ in re.findall(r"^- (.*): \*\*(yes|no|inconclusive|not testable)\*\* \((.*)\)\.$",
                                            text, flags=re.M)]


def test_report_renders_every_figure_from_the_database_alone(tmp_path):
    fill(tmp_path, grelu_better=True, noise=0.01)  # equal values give no interval
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
    fill(tmp_path, grelu_better=False, noise=0.01)
    found = dict(claims(render_alone(tmp_path)))
    assert found["- Full (affine) stitching has the lowest penalty at every layer"[2:]] == "yes"
    negative = {k: v for k, v in found.items() if not k.startswith("Full")}
    assert negative and all(v == "no" for v in negative.values()), found


def test_report_from_a_real_run_without_its_artifacts(tmp_path):
    run_jobs(probe_plan(sleep_s=0).jobs, tmp_path, InlineBackend(), progress=False)
    text = render_alone(tmp_path)
    assert (tmp_path / "figures" / "probe.png").is_file()
    assert "9 jobs done, 0 failed" in text


def test_one_pair_decides_nothing(tmp_path):
    """With one pair (or one repeat) no interval exists: every claim is inconclusive, never yes or no (the
    synthetic dissection has two rotations, so its claims can still be decided)."""
    fill(tmp_path, grelu_better=True, n_pairs=1)
    found = [(c, a) for c, a in claims(render_alone(tmp_path)) if "dissected site" not in c]
    assert len(found) == 10 and all(a == "inconclusive" for _, a in found), found


def test_models_at_chance_make_the_claims_not_testable(tmp_path):
    fill(tmp_path, grelu_better=True, accuracy=12.0)
    text = render_alone(tmp_path)
    found = dict(claims(text))
    assert all(v == "not testable" for k, v in found.items() if "dissected site" not in k), found
    assert "at chance" in text and "**not testable** (" in text


def test_nulls_are_shown_and_decide_the_above_chance_claims(tmp_path):
    fill(tmp_path, grelu_better=True, nulls=True)
    text = render_alone(tmp_path)
    found = dict(claims(text))
    above = {k: v for k, v in found.items() if "above chance" in k}
    assert len(above) == 3 and all(v == "yes" for v in above.values()), found   # Table 2, Figs. 5 and 2
    assert "p ≤ 0.002" in text
    fill(tmp_path / "n", grelu_better=False, nulls=True)
    above = {k: v for k, v in claims(render_alone(tmp_path / "n")) if "above chance" in k}
    assert all(v == "inconclusive" for v in above.values())   # a large p is no evidence of chance


@pytest.mark.filterwarnings("ignore:Precision loss occurred")
def test_no_claim_says_yes_or_no_against_its_own_interval(tmp_path, scipy_side):
    """Over random synthetic results (1-4 pairs, noise, either direction): every yes has all of its intervals
    on the claimed side and every no has one wholly on the other side (intervals recomputed by scipy);
    the sentence in report.md carries the same answer."""
    rng = np.random.default_rng(12)
    answers = set()
    for k in range(10):
        out = tmp_path / f"r{k}"
        fill(out, grelu_better=bool(rng.integers(2)), n_pairs=int(rng.integers(1, 5)),
             noise=float(rng.choice([0.0, 0.05, 0.5, 3.0])), seed=k)
        with ResultsStore(out, readonly=True) as raw:
            view = PlanView(raw)
            found = [c for make in SECTIONS for c in make(view, None).claims]   # None: no figures
        for c in found:
            answers.add(c.answer)
            sides = [scipy_side(e) for e in c.evidence]
            if c.answer == "yes":
                assert sides and all(v > 0 for v in sides), c
            if c.answer == "no":
                assert any(v < 0 for v in sides), c
        if k == 0:
            written = dict(claims(render_alone(out)))
            assert written == {c.text: c.answer for c in found}
    assert {"yes", "no", "inconclusive"} <= answers


def test_the_report_and_the_stitch_command_give_the_same_interval():
    from intertwiners.stitching.sweep import summarize

    vals = [1.0, 2.5, 4.0]
    s = summarize([{"kind": "grelu", "site": "relu1", "penalty": v} for v in vals])[0]
    iv = mean_ci(vals)
    assert (s["ci_low"], s["ci_high"]) == (iv.low, iv.high)


def test_zoo_table_gives_the_paper_accuracy_to_relu_models_of_any_width():
    """The paper's CIFAR-10 accuracy stands beside the ReLU models of an architecture (with or without batch norm,
    whatever their widths), never beside another activation."""
    from types import SimpleNamespace

    from intertwiners.experiments.figures import zoo

    def row(arch, **kw):
        return SimpleNamespace(config={"arch": arch, "dataset": "digits", "arch_kwargs": kw},
                               result={"parts": {"seed0": {"test_accuracy": 97.0}}})

    rows = [row("resnet20", activation="relu", widths=[8, 16, 32]), row("resnet20", activation="leaky_relu:0.5"),
            row("myrtle_cnn", batch_norm=False), row("myrtle_cnn", activation="sigmoid", batch_norm=False)]
    view = SimpleNamespace(rows=lambda kind=None, status=None: rows)
    text = zoo.section(view, None).body
    lines = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in text.splitlines()
             if line.startswith("| resnet20") or line.startswith("| myrtle_cnn")}
    assert lines == {"activation=relu-widths=[8, 16, 32]": "89.9 (CIFAR-10)", "activation=leaky_relu:0.5": "–",
                     "batch_norm=False": "87.4 (CIFAR-10)", "activation=sigmoid-batch_norm=False": "–"}


def test_each_section_names_its_data_and_mixed_claims_name_theirs(tmp_path):
    fill(tmp_path, grelu_better=True, cluttered=True)
    text = render_alone(tmp_path)
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")}
    data = {title.split(" — ")[0]: re.search(r"^Data: (.*)\.$", body, flags=re.M) for title, body in sections.items()}
    assert data["Fig. 4"].group(1) == data["Appendix D.3"].group(1) == "`digits-cluttered`"
    assert data["Fig. 1"].group(1) == data["Table 2"].group(1) == "`digits`"
    summary = sections["Summary: the paper's claims on this data"]
    rotation = [line for line in summary.splitlines() if "rotation penalty below" in line]
    assert rotation == ["- ReLU: G_ReLU rotation penalty below the orthogonal one at every layer "
                        "(on `digits-cluttered`)"]
    assert "reproduce --cluttered" not in sections["Fig. 4 — rotation penalties (Myrtle CNN without batch norm)"]
    assert all(line.endswith(("(on `digits`)", "(on `digits-cluttered`)")) for line in summary.splitlines()
               if line.startswith("- ") and "dissected" not in line), summary
    one = tmp_path / "one"
    fill(one, grelu_better=True)           # one dataset (or none named): the claims stay as the paper says them
    assert "(on `" not in render_alone(one)
    digits = tmp_path / "digits"
    fill(digits, grelu_better=True, cluttered=True)
    with ResultsStore(digits) as store:      # Fig. 4 on digits: its section points to --cluttered
        for row in store.rows():
            if row.config.get("dataset") == "digits-cluttered":
                store.record(id=row.id, kind=row.kind, label=row.label, config={**row.config, "dataset": "digits"},
                             deps=row.deps, status="done", result=row.result, wall_s=0.1)
    text = render_alone(digits)
    assert text.count("`intertwiners reproduce --cluttered` runs this experiment") == 1
    assert text.index("reproduce --cluttered") < text.index("## Appendix D.3")
