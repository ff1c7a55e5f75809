"""intertwiners align: bring model B into model A's basis and compare interpolation curves."""

from __future__ import annotations

from ..data import DATASETS

NAME = "align"
HELP = ("Align model B to model A through their intertwiner group (beyond the paper): writes B in A's basis "
        "(safetensors + config), and loss/accuracy along (1-alpha)·A + alpha·B for no alignment, permutations "
        "only and the full group, with both methods (CSV, PNG, barriers.json).")


def add_arguments(p):
    p.add_argument("a", help="model folder written by `intertwiners train` (the reference basis)")
    p.add_argument("b", help="model folder to align to A")
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="activations", choices=["activations", "weights"],
                   help="method of the aligned model written to OUT/aligned")
    p.add_argument("--alphas", type=int, default=11, help="number of interpolation points from 0 to 1 (>= 2)")
    p.add_argument("--align-samples", type=int, default=5000,
                   help="training inputs used for the activations (the first N)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run(args) -> int:
    import csv
    import json
    import shutil
    from pathlib import Path

    import numpy as np

    from .. import data, models
    from .._util import resolve_device
    from ..alignment.comparison import compare_alignments, plot_curves

    if args.alphas < 2:
        raise ValueError(f"--alphas must be at least 2, got {args.alphas}")
    if args.align_samples < 2:
        raise ValueError(f"--align-samples must be at least 2, got {args.align_samples}")
    for path in (args.a, args.b):
        models.read_config(path)  # ValueError when not a model folder
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    device = resolve_device(args.device)
    model_a = models.load(args.a).to(device).eval()
    model_b = models.load(args.b).to(device).eval()
    train, test = data.load(args.dataset, args.data_root)
    alphas = np.linspace(0.0, 1.0, args.alphas)
    comparison = compare_alignments(model_a, model_b, train, test, alphas,
                                    align_inputs=train.x[:args.align_samples])
    out.mkdir(parents=True, exist_ok=True)
    label = f"full group ({args.method})"
    tmp = out / "aligned.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    models.save(comparison.aligned[label].cpu(), tmp)
    shutil.rmtree(out / "aligned", ignore_errors=True)
    tmp.rename(out / "aligned")
    part = out / "interpolation.csv.partial"
    with part.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "alpha", "loss", "accuracy"])
        w.writeheader()
        w.writerows(comparison.rows())
    part.rename(out / "interpolation.csv")
    part = out / "barriers.json.partial"
    part.write_text(json.dumps({"barriers": comparison.barriers(), "align_seconds": comparison.seconds}, indent=2))
    part.rename(out / "barriers.json")
    plot_curves(comparison, out / "interpolation.partial.png", title=f"{Path(args.a).name} vs {Path(args.b).name}")
    (out / "interpolation.partial.png").rename(out / "interpolation.png")
    print(f"{'variant':<28} {'loss barrier':>12} {'accuracy barrier':>17} {'align s':>8}")
    for name, b in comparison.barriers().items():
        print(f"{name:<28} {b['loss']:>12.4f} {b['accuracy']:>17.2f} {comparison.seconds[name]:>8.2f}")
    print(f"wrote {out / 'aligned'}, {out / 'interpolation.csv'}, {out / 'interpolation.png'}, "
          f"{out / 'barriers.json'}")
    return 0
