"""intertwiners align: bring model B into model A's basis and compare interpolation curves."""

from __future__ import annotations

from ..data import DATASETS

NAME = "align"
HELP = ("Align model B to model A through their intertwiner group (beyond the paper). A and B are this package's "
        "model folders or local Hugging Face model folders (config.json + model.safetensors); B in A's basis is "
        "written in the same format to OUT/aligned. For this package's models: loss/accuracy along "
        "(1-alpha)·A + alpha·B for no alignment, permutations only, the full group and the full group + REPAIR, "
        "with both methods (interpolation.csv, interpolation.png, barriers.json). For Hugging Face models: weight "
        "matching traced on token ids, the weight distance before and after, and per space how its element "
        "was found and its residual (alignment.json).")


def add_arguments(p):
    p.add_argument("a", help="model folder (the reference basis): written by `intertwiners train`, or a local "
                             "Hugging Face model folder")
    p.add_argument("b", help="model folder to align to A (the same kind and architecture as A)")
    p.add_argument("--dataset", default="digits", choices=list(DATASETS),
                   help="data of this package's models (not used for Hugging Face folders)")
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default=None, choices=["activations", "weights"],
                   help="method of the aligned model written to OUT/aligned (default: activations for this "
                        "package's models, weights for Hugging Face folders, which are aligned by weights only)")
    p.add_argument("--alphas", type=int, default=11, help="number of interpolation points from 0 to 1 (>= 2)")
    p.add_argument("--align-samples", type=int, default=5000,
                   help="training inputs (the first N) for the activations, the batch-norm statistics and REPAIR's "
                        "statistics")
    p.add_argument("--tokens", type=int, default=8,
                   help="Hugging Face models: length of the token-id example input (2 rows of ids 0, 1, 2, ...) "
                        "the models are traced on")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def weight_distance(model_a, model_b) -> float:
    """||theta_A - theta_B|| / ||theta_A|| over every floating parameter (one tensor at a time)."""
    from ..alignment.canonical import squared_distance

    num = den = 0.0
    pb = dict(model_b.named_parameters())
    for k, p in model_a.named_parameters():
        if p.is_floating_point():
            d, n = squared_distance(p, pb[k])
            num, den = num + d, den + n
    return (num / den) ** 0.5 if den > 0 else float("nan")


def _align_hf(args, fa, fb, stage) -> int:
    """Hugging Face folders: weight matching traced on token ids; OUT/aligned in the Hugging Face format and
    OUT/alignment.json (the weight distance before and after, B's function kept, per space how its element was
    found and its residual)."""
    import json

    import torch

    from .._util import return_freed_memory
    from ..alignment.align import check_runs, check_same_structure
    from ..alignment.checkpoints import token_ids
    from ..alignment.streaming import align_folders, save_streamed

    if args.method == "activations":
        raise ValueError("Hugging Face folders are aligned by their weights (--method weights): there is no "
                         "dataset of inputs for them here")
    return_freed_memory()  # the temporaries of weight matching leave the process when freed (peak memory)
    ids = token_ids(fb.model, args.tokens).to(next(fb.model.parameters()).device)
    check_runs(fa.model, ids, "example_input")
    check_same_structure(fa.model, fb.model)
    before = weight_distance(fa.model, fb.model)  # B may be moved in place by align_folders
    with torch.no_grad():
        out_b = fb.model(ids)
        main_b = (out_b if isinstance(out_b, torch.Tensor) else out_b[0]).clone()
    del out_b
    r = align_folders(fa, fb, ids, monomial=True)  # (perm, scale) pairs: no dense (n, n) elements
    with torch.no_grad():
        out_r = r.model(ids)
    main_r = out_r if isinstance(out_r, torch.Tensor) else out_r[0]
    report = {"method": "weights", "group": "full", "seconds": round(r.seconds, 3), "spaces": len(r.elements),
              "skipped": r.skipped, "example_input": list(ids.shape),
              "relative_weight_distance": {"before": before, "after": weight_distance(fa.model, r.model)},
              "max_output_difference": float((main_b - main_r).abs().max()),
              "found_by": r.found_by, "residual": r.residual}
    save_streamed(r.model, fb, stage / "aligned")
    (stage / "alignment.json").write_text(json.dumps(report, indent=2))
    d = report["relative_weight_distance"]
    print(f"weights aligned in {r.seconds:.1f} s ({len(r.elements)} spaces); relative weight distance to A: "
          f"{d['before']:.4f} before, {d['after']:.4f} after; largest output change of B: "
          f"{report['max_output_difference']:.2e}")
    return 0


def _align_package(args, fa, fb, stage) -> int:
    import csv
    import json
    from pathlib import Path

    import numpy as np

    from .. import data
    from ..alignment.checkpoints import save_like
    from ..alignment.comparison import compare_alignments, plot_curves

    method = args.method or "activations"
    train, test = data.load(args.dataset, args.data_root)
    alphas = np.linspace(0.0, 1.0, args.alphas)
    comparison = compare_alignments(fa.model, fb.model, train.x[:args.align_samples], test, alphas)
    save_like(comparison.aligned[f"full group ({method})"], fb, stage / "aligned")
    with (stage / "interpolation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "alpha", "loss", "accuracy"])
        w.writeheader()
        w.writerows(comparison.rows())
    (stage / "barriers.json").write_text(json.dumps({"barriers": comparison.barriers(),
                                                     "align_seconds": comparison.seconds}, indent=2))
    plot_curves(comparison, stage / "interpolation.png", title=f"{Path(args.a).name} vs {Path(args.b).name}")
    print(f"{'variant':<34} {'loss barrier':>12} {'accuracy barrier':>17} {'align s':>8}")
    for name, b in comparison.barriers().items():
        print(f"{name:<34} {b['loss']:>12.4f} {b['accuracy']:>17.2f} {comparison.seconds[name]:>8.2f}")
    return 0


def run(args) -> int:
    from pathlib import Path

    from .._util import resolve_device
    from ..alignment.checkpoints import HUGGING_FACE, StagedOutput, load_folders

    if args.alphas < 2:
        raise ValueError(f"--alphas must be at least 2, got {args.alphas}")
    if args.align_samples < 2:
        raise ValueError(f"--align-samples must be at least 2, got {args.align_samples}")
    staged = StagedOutput(args.out)  # ValueError now when --out is a file
    device = resolve_device(args.device)
    fa, fb = load_folders([args.a, args.b], device)
    with staged as stage:
        if fa.kind == HUGGING_FACE:
            _align_hf(args, fa, fb, stage)
        else:
            _align_package(args, fa, fb, stage)
    out = Path(args.out)
    written = ["aligned", "alignment.json"] if fa.kind == HUGGING_FACE else [
        "aligned", "interpolation.csv", "interpolation.png", "barriers.json"]
    print("wrote " + ", ".join(str(out / w) for w in written))
    return 0
