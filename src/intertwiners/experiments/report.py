"""Figures (PNG) and ``DIR/report.md``, rendered from ``DIR/results.sqlite`` alone.

Each section puts our numbers beside the paper's (from the authors' CIFAR-10 runs, see
``REFERENCE.md``) and ends with a plain sentence saying whether the paper's claim holds on this data.
Nothing but the database is read: the trained models and other artifacts may be gone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .store import JobRow, ResultsStore

FIGURES = "figures"

# The paper's numbers (Myrtle CNN / ResNet20 on CIFAR-10; REFERENCE.md).
MYRTLE_PAPER_LAYERS = {"relu1": 3, "relu2": 6, "relu3": 10, "relu4": 14}
PAPER_STITCHING = {  # penalty in accuracy points at layers 3/6/10/14
    "full": [1.5, 1.7, 2.7, 2.5], "low_rank:4": [8.7, 14.0, 26.5, 16.0],
    "low_rank:1": [42.0, 53.0, 57.0, 62.0], "grelu": [8.3, 7.5, 17.0, 6.0]}
PAPER_ROTATION = {"layers": ["conv1", "conv2", "conv3"], "paper_layers": [0, 2, 5],
                  "grelu": [0.0, 1.7, 1.3], "orthogonal": [0.7, 4.6, 8.3]}
PAPER_PROCRUSTES = {"grelu": [0.6208, 0.5106, 0.4432, 0.4899], "orthogonal": [0.7724, 0.5743, 0.5087, 0.5825]}
PAPER_CKA_DIAGONAL = {"grelu": [0.84, 0.61, 0.45, 0.43], "linear": [0.98, 0.97, 0.92, 0.93]}
PAPER_ACCURACY = {"myrtle_cnn": 91.4, "myrtle_cnn-batch_norm=False": 87.4, "resnet20": 89.9}


# ----------------------------------------------------------------------------------------------------------
# small statistics helpers


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of the 95% t confidence interval (0 for one value) and the count."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), 0.0, 1
    from scipy.stats import t

    half = float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return float(v.mean()), half, int(v.size)


def fmt(mean: float, half: float | None = None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if half is None or half == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def yes_no(flag: bool | None) -> str:
    return "n/a (not enough data)" if flag is None else ("**yes**" if flag else "**no**")


def _kind_name(config: dict) -> str:
    return config["kind"] if config.get("rank") is None else f"{config['kind']}:{config['rank']}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# sections


def section_zoo(store: PlanView, figdir: Path) -> str:
    rows = store.rows(kind="zoo", status="done")
    if not rows:
        return "## Model zoo\n\nNo trained models in the database.\n"
    groups: dict[tuple, list[JobRow]] = defaultdict(list)
    for r in rows:
        kw = r.config.get("arch_kwargs", {})
        tag = "-".join(f"{k}={v}" for k, v in sorted(kw.items()) if k != "width")
        groups[(r.config["arch"], tag, r.config["dataset"])].append(r)
    table = []
    for (arch, tag, ds), rs in sorted(groups.items()):
        m, h, n = mean_ci(r.result["test_accuracy"] for r in rs)
        ref_key = arch + ("-batch_norm=False" if "batch_norm=False" in tag else "")
        ref = PAPER_ACCURACY.get(ref_key) if "activation" not in tag or "activation=relu" == tag else None
        table.append([arch, tag or "default", ds, n, fmt(m, h, 1), rs[0].result.get("epochs", "–"),
                      f"{ref} (CIFAR-10)" if ref else "–"])
    return ("## Model zoo\n\nTest accuracy (%) of the trained models (mean ± 95% CI over seeds).\n\n"
            + _table(["architecture", "variant", "dataset", "models", "test accuracy", "epochs", "paper"], table)
            + "\n")


def section_stitching(store: PlanView, figdir: Path) -> str:
    rows = [r for r in store.rows(kind="stitch", status="done") if r.config.get("experiment") == "fig1"]
    head = "## Fig. 1 — stitching penalties (Myrtle CNN)\n\n"
    if not rows:
        return head + "No stitching results in the database.\n"
    data: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        data[_kind_name(r.config)][r.config["site"]].append(r.result["penalty"])
    sites = sorted({r.config["site"] for r in rows}, key=lambda s: MYRTLE_PAPER_LAYERS.get(s, 99))
    kinds = sorted(data, key=lambda k: ["full", "low_rank:4", "low_rank:2", "low_rank:1", "grelu"].index(k)
                   if k in ["full", "low_rank:4", "low_rank:2", "low_rank:1", "grelu"] else 9)
    stats = {k: [mean_ci(data[k][s]) for s in sites] for k in kinds}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(sites))
    for k in kinds:
        m = [s[0] for s in stats[k]]
        h = [s[1] for s in stats[k]]
        line = ax.errorbar(x, m, yerr=h, marker="o", capsize=3, label=f"{k} (ours)")
        if k in PAPER_STITCHING and all(s in MYRTLE_PAPER_LAYERS for s in sites):
            ref = [PAPER_STITCHING[k][list(MYRTLE_PAPER_LAYERS).index(s)] for s in sites]
            ax.plot(x, ref, ls="--", color=line[0].get_color(), alpha=0.6, label=f"{k} (paper, CIFAR-10)")
    ax.set_xticks(x, [f"{s}\n(layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites])
    ax.set_ylabel("stitching penalty (accuracy points)")
    ax.set_title("Stitching penalties, Myrtle CNN")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "fig1_stitching.png", dpi=120)
    plt.close(fig)
    n_pairs = len({(r.deps["front"], r.deps["back"]) for r in rows})
    table = []
    for k in kinds:
        ours = [fmt(m, h, 1) for m, h, _ in stats[k]]
        paper = ([str(PAPER_STITCHING[k][list(MYRTLE_PAPER_LAYERS).index(s)]) for s in sites]
                 if k in PAPER_STITCHING else ["–"] * len(sites))
        table.append([k] + [f"{o} (paper {p})" for o, p in zip(ours, paper)])
    means = {k: [s[0] for s in stats[k]] for k in kinds}
    full_lowest = (all(means["full"][i] <= min(means[k][i] for k in kinds) for i in range(len(sites)))
                   if "full" in means else None)
    grelu_vs_r1 = (all(a < b for a, b in zip(means["grelu"], means["low_rank:1"]))
                   if "grelu" in means and "low_rank:1" in means else None)
    return (head + f"![Fig. 1](figures/fig1_stitching.png)\n\nPenalty = mean accuracy of the two models − "
            f"stitched accuracy, in points, mean ± 95% CI over {n_pairs} pair(s).\n\n"
            + _table(["kind"] + [f"{s} (layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites], table)
            + "\n\n"
            + f"- Full (affine) stitching has the lowest penalty at every layer: {yes_no(full_lowest)}.\n"
            + f"- G_ReLU stitching penalty below the rank-1 penalty at every layer (although rank-1 layers have "
              f"more parameters than G_ReLU): {yes_no(grelu_vs_r1)}.\n")


def _rotation_figure(data: dict, layers: list[str], transforms: list[str], figdir: Path) -> None:
    plt = _plt()
    acts = sorted(data, key=lambda a: (a != "relu", a))
    fig, axes = plt.subplots(1, len(acts), figsize=(6 * len(acts), 4), squeeze=False)
    x = np.arange(len(layers))
    width = 0.8 / max(1, len(transforms))
    for ax, act in zip(axes[0], acts):
        for i, t in enumerate(transforms):
            st = [mean_ci(data[act][t][la]) for la in layers]
            bars = ax.bar(x + i * width, [v[0] for v in st], width, yerr=[v[1] for v in st], capsize=3,
                          label=f"{t} (ours)")
            if act == "relu" and t in PAPER_ROTATION:
                ref = [PAPER_ROTATION[t][PAPER_ROTATION["layers"].index(la)] if la in PAPER_ROTATION["layers"]
                       else np.nan for la in layers]
                ax.scatter(x + i * width, ref, marker="_", s=400, linewidths=3, zorder=3,
                           color=bars.patches[0].get_facecolor(), label=f"{t} (paper, CIFAR-10)")
        ax.set_xticks(x + width * (len(transforms) - 1) / 2, layers)
        ax.set_ylabel("rotation penalty (accuracy points)")
        ax.set_title(f"Myrtle CNN without batch norm, {act}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "fig4_rotation_penalty.png", dpi=120)
    plt.close(fig)


def section_rotation(store: PlanView, figdir: Path) -> str:
    rows = store.rows(kind="rotation_penalty", status="done")
    head = "## Fig. 4 — rotation penalties (Myrtle CNN without batch norm)\n\n"
    if not rows:
        return head + "No rotation-penalty results in the database.\n"
    data: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        data[r.config.get("activation", "relu")][r.config["transform"]][r.config["layer"]].append(r.result["penalty"])
    layers = sorted({r.config["layer"] for r in rows})
    found = {r.config["transform"] for r in rows}
    transforms = [t for t in ("grelu", "orthogonal") if t in found] + sorted(found - {"grelu", "orthogonal"})
    _rotation_figure(data, layers, transforms, figdir)
    table = []
    for act in sorted(data, key=lambda a: (a != "relu", a)):
        for t in transforms:
            cells = []
            for layer in layers:
                m, h, n = mean_ci(data[act][t][layer])
                ref = (PAPER_ROTATION[t][PAPER_ROTATION["layers"].index(layer)]
                       if act == "relu" and t in PAPER_ROTATION and layer in PAPER_ROTATION["layers"] else "–")
                cells.append(f"{fmt(m, h)} (n={n}; paper {ref})")
            table.append([act, t] + cells)

    def advantage(act: str) -> float | None:
        if not {"grelu", "orthogonal"} <= set(data.get(act, {})):
            return None
        return float(np.mean([np.mean(data[act]["orthogonal"][la]) - np.mean(data[act]["grelu"][la])
                              for la in layers]))

    claim = None
    if "relu" in data and {"grelu", "orthogonal"} <= set(data["relu"]):
        claim = all(np.mean(data["relu"]["grelu"][la]) < np.mean(data["relu"]["orthogonal"][la]) for la in layers)
    text = (head + "![Fig. 4](figures/fig4_rotation_penalty.png)\n\nPenalty = baseline accuracy − accuracy after "
            "inserting a fixed transform (a G_ReLU element P·D, or a random orthogonal matrix) before the "
            "activation and fine-tuning the layers after it; mean ± 95% CI over repeats. The `identity` "
            "transform, where present, measures what fine-tuning alone does to accuracy.\n\n"
            + _table(["activation", "transform"] + layers, table) + "\n\n"
            + f"- ReLU: G_ReLU rotation penalty below the orthogonal one at every layer: {yes_no(claim)}.\n")
    if "sigmoid" in data and advantage("relu") is not None and advantage("sigmoid") is not None:
        a_relu, a_sig = advantage("relu"), advantage("sigmoid")
        text += (f"- Sigmoid (P·D with D ≠ I is not in G_sigmoid, so theory gives P·D no special status): the "
                 f"advantage of the P·D transform over the orthogonal one (orthogonal − P·D penalty, mean over "
                 f"layers) is smaller than with ReLU (sigmoid {a_sig:.2f}, ReLU {a_relu:.2f} points): "
                 f"{yes_no(a_sig < a_relu)}.\n")
    return text


def section_slopes(store: PlanView, figdir: Path) -> str:
    rows = [r for r in store.rows(kind="stitch", status="done") if r.config.get("experiment") == "d3"]
    head = "## Appendix D.3 — ResNet20 with LeakyReLU: stitching penalty against the negative slope\n\n"
    if not rows:
        return head + "No LeakyReLU-sweep results in the database.\n"
    data: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        data[_kind_name(r.config)][float(r.config["slope"])].append(r.result["penalty"])
    slopes = sorted({float(r.config["slope"]) for r in rows})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    table = []
    for k in sorted(data):
        st = [mean_ci(data[k][s]) for s in slopes]
        ax.errorbar(slopes, [s[0] for s in st], yerr=[s[1] for s in st], marker="o", capsize=3, label=k)
        table.append([k] + [fmt(m, h, 1) for m, h, _ in st])
    ax.set_xlabel("LeakyReLU negative slope (0 = ReLU, 1 = linear)")
    ax.set_ylabel("stitching penalty (accuracy points), mean over sites and pairs")
    ax.set_title("ResNet20, stitching penalty against the slope")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "d3_leaky_relu.png", dpi=120)
    plt.close(fig)
    claim = None
    if "grelu" in data and 1.0 in data["grelu"] and any(s < 1 for s in data["grelu"]):
        at_one = np.mean(data["grelu"][1.0])
        below = [np.mean(v) for s, v in data["grelu"].items() if s < 1]
        claim = bool(at_one > max(below))
    return (head + "![D.3](figures/d3_leaky_relu.png)\n\nThe paper finds similar G_ReLU stitching penalties for "
            "every slope below 1 and a change at slope 1, where the activation is linear and its intertwiner "
            "group is all of GL_n rather than G_ReLU (Table 1). Mean ± 95% CI over sites and pairs:\n\n"
            + _table(["kind"] + [f"slope {s:g}" for s in slopes], table) + "\n\n"
            + f"- G_ReLU stitching penalty at slope 1 above its value at every slope below 1: {yes_no(claim)}.\n")


def section_procrustes(store: PlanView, figdir: Path) -> str:
    rows = store.rows(kind="procrustes", status="done")
    head = "## Table 2 — G_ReLU and orthogonal Procrustes similarity per layer (Myrtle CNN)\n\n"
    if not rows:
        return head + "No Procrustes results in the database.\n"
    sites = rows[0].result["sites"]
    groups = [g for g in ("grelu", "orthogonal") if g in rows[0].result]
    stats = {g: [mean_ci(r.result[g][i] for r in rows) for i in range(len(sites))] for g in groups}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(sites))
    for g in groups:
        line = ax.errorbar(x, [s[0] for s in stats[g]], yerr=[s[1] for s in stats[g]], marker="o", capsize=3,
                           label=f"{g} (ours)")
        if all(s in MYRTLE_PAPER_LAYERS for s in sites):
            ax.plot(x, [PAPER_PROCRUSTES[g][list(MYRTLE_PAPER_LAYERS).index(s)] for s in sites], ls="--",
                    color=line[0].get_color(), alpha=0.6, label=f"{g} (paper, CIFAR-10)")
    ax.set_xticks(x, [f"{s}\n(layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites])
    ax.set_ylabel("Procrustes similarity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "table2_procrustes.png", dpi=120)
    plt.close(fig)
    table = []
    for g in groups:
        cells = []
        for s, (m, h, _) in zip(sites, stats[g]):
            ref = PAPER_PROCRUSTES[g][list(MYRTLE_PAPER_LAYERS).index(s)] if s in MYRTLE_PAPER_LAYERS else "–"
            cells.append(f"{fmt(m, h, 3)} (paper {ref})")
        table.append([g] + cells)
    claim = None
    if len(groups) == 2:
        claim = all(a[0] < b[0] for a, b in zip(stats["grelu"], stats["orthogonal"]))
    return (head + f"![Table 2](figures/table2_procrustes.png)\n\nMean ± 95% CI over {len(rows)} pair(s); "
            "features are the ReLU outputs on test images, channels as columns.\n\n"
            + _table(["group"] + [f"{s} (layer {MYRTLE_PAPER_LAYERS.get(s, '?')})" for s in sites], table)
            + "\n\n" + f"- G_ReLU-Procrustes similarity below orthogonal Procrustes at every layer: "
            f"{yes_no(claim)}.\n")


def section_cka(store: PlanView, figdir: Path, experiment: str) -> str:
    rows = [r for r in store.rows(kind="cka", status="done") if r.config.get("experiment") == experiment]
    title = {"fig5": "Fig. 5 — G_ReLU-CKA and linear CKA between two Myrtle CNNs",
             "fig2": "Fig. 2 — G_ReLU-CKA and linear CKA between two ResNet20s"}[experiment]
    head = f"## {title}\n\n"
    if not rows:
        return head + "No CKA results in the database.\n"
    sites = rows[0].result["sites"]
    measures = [m for m in ("grelu", "linear") if m in rows[0].result]
    mats = {m: np.mean([np.asarray(r.result[m], dtype=float) for r in rows], axis=0) for m in measures}
    plt = _plt()
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4.4), squeeze=False)
    # as in the paper's Fig. 2, '*' marks layers inside residual blocks (ResNet20's relu1 sites)
    short = [s.replace("layer", "L").replace(".relu", ".r") + ("*" if s.endswith(".relu1") and s.startswith("layer")
                                                                 else "") for s in sites]
    for ax, m in zip(axes[0], measures):
        im = ax.imshow(mats[m], vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_title({"grelu": "(a) G_ReLU-CKA", "linear": "(b) linear CKA"}[m])
        ax.set_xticks(range(len(sites)), short, rotation=90, fontsize=6)
        ax.set_yticks(range(len(sites)), short, fontsize=6)
        ax.set_xlabel("model B")
        ax.set_ylabel("model A")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    name = f"{experiment}_cka.png"
    fig.savefig(figdir / name, dpi=120)
    plt.close(fig)
    diag = {m: np.diag(mats[m]) for m in measures}
    lines = []
    if experiment == "fig5" and all(s in MYRTLE_PAPER_LAYERS for s in sites):
        table = [[m] + [f"{d:.3f} (paper {PAPER_CKA_DIAGONAL[m][list(MYRTLE_PAPER_LAYERS).index(s)]})"
                        for s, d in zip(sites, diag[m])] for m in measures]
        lines.append(_table(["measure"] + [f"{s} (layer {MYRTLE_PAPER_LAYERS[s]})" for s in sites], table))
    else:
        table = [[m] + [f"{d:.3f}" for d in diag[m]] for m in measures]
        lines.append(_table(["measure (diagonal)"] + short, table))
    claim_lower = (bool(np.all(diag["grelu"] < diag["linear"])) if len(measures) == 2 else None)
    n = len(sites)
    off = ~np.eye(n, dtype=bool)
    same = {m: float(np.mean(np.diag(mats[m]))) for m in measures}
    other = {m: float(mats[m][off].mean()) if n > 1 else float("nan") for m in measures}
    near = {m: float(np.mean([abs(int(np.argmax(mats[m][i])) - i) <= 1 for i in range(n)])) for m in measures}
    claim_diag = all(same[m] > other[m] for m in measures) if n > 1 else None
    text = (head + f"![{title}](figures/{name})\n\nAveraged over {len(rows)} pair(s); features are the "
            "activation outputs on test images (eval mode); '*' marks layers inside residual blocks. "
            "Diagonal (same layer in both models):\n\n"
            + "\n".join(lines) + "\n\n"
            + f"- G_ReLU-CKA below linear CKA on the diagonal at every layer (as in the paper): "
              f"{yes_no(claim_lower)}.\n"
            + "- Layers at the same depth are more similar than layers at different depths (mean over the "
              "diagonal against mean off the diagonal: "
              + ", ".join(f"{m} {same[m]:.3f} vs {other[m]:.3f}" for m in measures)
              + "; rows whose most similar layer is within one of the same depth: "
              + ", ".join(f"{m} {100 * near[m]:.0f}%" for m in measures)
              + f"): {yes_no(claim_diag)}.\n")
    return text


def section_dissection(store: PlanView, figdir: Path) -> str:
    rows = store.rows(kind="dissection", status="done")
    head = "## Fig. 3 — interpretable units under rotation of the basis (dissection)\n\n"
    if not rows:
        return head + "No dissection results in the database.\n"
    models = {r.id: r for r in store.rows(kind="dissection_model", status="done")}
    data: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    has_act: dict[str, bool] = {}
    for r in rows:
        arch = models[r.deps["model"]].config["arch"] if r.deps.get("model") in models else r.config.get("arch", "?")
        name = f"{arch} {r.result['site']} [{r.result['layer']}]"
        has_act[name] = bool(r.result.get("activation_at_site"))
        for point in r.result["rows"]:
            data[name][float(point["alpha"])].append(float(point["fraction"]))
    alphas = sorted({a for d in data.values() for a in d})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    table = []
    for name in sorted(data):
        st = [mean_ci(data[name][a]) for a in alphas]
        ax.errorbar(alphas, [s[0] for s in st], yerr=[s[1] for s in st], marker="o", capsize=3, label=name,
                    ls="-" if has_act[name] else "--")
        table.append([name] + [fmt(m, h, 3) for m, h, _ in st])
    ax.set_xlabel("rotation power alpha (0 = unit basis, 1 = random rotation Q)")
    ax.set_ylabel("fraction of interpretable units")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figdir / "fig3_dissection.png", dpi=120)
    plt.close(fig)
    claims = []
    for name in sorted(data):
        if 0.0 in data[name] and 1.0 in data[name]:
            drop = float(np.mean(data[name][0.0]) - np.mean(data[name][1.0]))
            if has_act[name]:
                claims.append(f"- {name} (ReLU at the dissected site): fewer interpretable units in a rotated "
                              f"basis (alpha 1) than in the unit basis (change {-drop:+.3f}): "
                              f"{yes_no(drop > 0)}.\n")
            else:
                claims.append(f"- {name} (no activation at the dissected site): interpretability does not drop "
                              f"under rotation (by more than 0.02; change {-drop:+.3f}): "
                              f"{yes_no(drop <= 0.02)}.\n")
    return (head + "![Fig. 3](figures/fig3_dissection.png)\n\nThe paper (ImageNet, Broden) finds that rotating "
            "a ReLU layer's basis lowers the number of interpretable units, while layers without an activation "
            "(modified ResNet-50, ConvNeXt) do not lose interpretability. Here: small stand-in models trained on "
            "the synthetic Broden-layout dataset; fraction of interpretable units, mean ± 95% CI over random "
            "rotations.\n\n"
            + _table(["model, site [layer]"] + [f"alpha {a:g}" for a in alphas], table) + "\n\n" + "".join(claims))


def section_probe(store: PlanView, figdir: Path) -> str:
    rows = store.rows(kind="probe", status="done")
    if not rows:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(len(rows)), [r.result["value"] for r in rows])
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(figdir / "probe.png", dpi=80)
    plt.close(fig)
    return ("## Probe jobs (machinery test)\n\n![probe](figures/probe.png)\n\n"
            + _table(["job", "value"], [[r.label, f"{r.result['value']:g}"] for r in rows]) + "\n")


def section_runs(store: PlanView) -> str:
    rows = store.rows()
    n_done, n_failed = sum(r.status == "done" for r in rows), sum(r.status == "failed" for r in rows)
    compute = sum(r.wall_s or 0 for r in rows)
    lines = ["## Runs and jobs\n", f"{n_done} jobs done, {n_failed} failed; {compute:.0f} s of job compute time "
             "in total (summed over workers).\n"]
    by_kind: dict[str, list[JobRow]] = defaultdict(list)
    for r in rows:
        by_kind[r.kind].append(r)
    lines.append(_table(["job kind", "done", "failed", "compute (s)", "mean per job (s)"], [
        [k, sum(r.status == "done" for r in rs), sum(r.status == "failed" for r in rs),
         f"{sum(r.wall_s or 0 for r in rs):.1f}", f"{np.mean([r.wall_s or 0 for r in rs]):.2f}"]
        for k, rs in sorted(by_kind.items())]))
    runs = store.runs()
    if runs:
        lines.append("\n\nRuns (each `reproduce` invocation):\n")
        lines.append(_table(["run", "backend", "planned", "already done", "executed", "failed", "wall (s)"], [
            [r["run_id"], r["backend"], r["planned"], r["skipped"], r["executed"] if r["executed"] is not None
             else "interrupted", r["failed"] if r["failed"] is not None else "–",
             f"{r['finished_at'] - r['started_at']:.0f}" if r["finished_at"] else "–"] for r in runs]))
    if store.hidden:
        lines.append(f"\n\n{store.hidden} rows of earlier plans (other scales or settings) are kept in the "
                     "database and not shown.")
    failed = store.rows(status="failed")
    if failed:
        lines.append("\n\nFailed jobs (retried by the next run):\n")
        for r in failed:
            last = (r.error or "").strip().splitlines()[-1:] or ["unknown error"]
            lines.append(f"- `{r.label}` (attempts: {r.attempts}): {last[0]}")
    return "\n".join(lines) + "\n"


class PlanView:
    """The store's rows restricted to the jobs of the last plan run in it (all rows when it is unknown)."""

    def __init__(self, store: ResultsStore):
        self.store = store
        ids = store.get_meta("plan_ids")
        self.ids = None if ids is None else set(ids)
        self.hidden = 0 if self.ids is None else sum(r.id not in self.ids for r in store.rows())

    def rows(self, kind: str | None = None, status: str | None = None) -> list[JobRow]:
        rows = self.store.rows(kind=kind, status=status)
        return rows if self.ids is None else [r for r in rows if r.id in self.ids]

    def runs(self) -> list[dict]:
        return self.store.runs()


def write_report(out: str | Path) -> Path:
    """Render the figures into ``out/figures/`` and write ``out/report.md`` from ``out/results.sqlite``."""
    out = Path(out)
    with ResultsStore(out, readonly=True) as raw:
        store = PlanView(raw)
        figdir = out / FIGURES
        figdir.mkdir(parents=True, exist_ok=True)
        plan = raw.get_meta("plan", {}) or {}
        parts = ["# Reproduction report\n",
                 "Godfrey et al., *On the Symmetries of Deep Learning Models and their Internal Representations* "
                 "(NeurIPS 2022). Rendered from `results.sqlite` alone by `intertwiners report`. The paper's "
                 "numbers are from CIFAR-10 at full scale; at smaller scales or on `digits` only the "
                 "qualitative claims are comparable.\n"]
        if plan:
            scale = plan.get("scale", {})
            parts.append(f"Plan: scale `{plan.get('name')}`, dataset `{scale.get('dataset', '–')}`, "
                         f"{plan.get('jobs', '–')} jobs.\n")
            if plan.get("missing"):
                parts.append("Experiments **not run** because their code is missing here:\n\n"
                             + "\n".join(f"- {k}: {v}" for k, v in plan["missing"].items()) + "\n")
        parts.append(section_zoo(store, figdir))
        parts.append(section_stitching(store, figdir))
        parts.append(section_rotation(store, figdir))
        parts.append(section_slopes(store, figdir))
        parts.append(section_procrustes(store, figdir))
        parts.append(section_cka(store, figdir, "fig5"))
        parts.append(section_cka(store, figdir, "fig2"))
        parts.append(section_dissection(store, figdir))
        parts.append(section_probe(store, figdir))
        parts.append(section_runs(store))
    path = out / "report.md"
    tmp = path.with_suffix(".md.partial")
    tmp.write_text("\n".join(p for p in parts if p))
    tmp.replace(path)
    return path
