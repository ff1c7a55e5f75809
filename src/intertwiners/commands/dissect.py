"""intertwiners dissect: network dissection of a saved model, in rotated bases, or the Fig. 3 experiment."""

from __future__ import annotations

import json
from pathlib import Path

from . import _args

NAME = "dissect"
HELP = ("Network dissection (paper §6): dissect SITE of a saved model on a Broden-layout dataset, optionally "
        "in rotated bases Q**alpha; or run the Fig. 3 experiment on a synthetic dataset (--fig3). Writes CSV + PNG.")


def _floats(text: str) -> list[float]:
    import math

    try:
        values = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--alphas must be finite numbers, got {text!r}")
    return values


def add_arguments(p):
    p.add_argument("--model", default=None, help="folder (or .safetensors) written by `intertwiners train` or "
                   "by --fig3 --save-models")
    p.add_argument("--site", default=None, help="activation site (e.g. layer3.2.relu2, block:relu) or any "
                   "submodule name (its output)")
    p.add_argument("--data", default=None, help="dataset root in the Broden layout (index.csv, ...). For --fig3 "
                   "(and with --make-synthetic) a synthetic one is written there when missing")
    p.add_argument("--split", default=None, help="only images of this split (e.g. val)")
    p.add_argument("--make-synthetic", action="store_true", help="write a synthetic dataset to --data first")
    p.add_argument("--images", type=_args.positive_int, default=1600, help="synthetic dataset size")
    p.add_argument("--image-size", type=_args.positive_int, default=None,
                   help="resize images to this side (default: as stored; "
                   "synthetic: 32)")
    p.add_argument("--fig3", action="store_true", help="train the three Fig. 3 models on the synthetic data and "
                   "dissect them under rotations")
    p.add_argument("--steps", type=_args.positive_int, default=500, help="--fig3 training steps (batches of 32)")
    p.add_argument("--save-models", action="store_true", help="--fig3: keep the trained models in OUT/models")
    p.add_argument("--alphas", default=None, help="rotation powers, e.g. 0,0.25,0.5,0.75,1 (default: 0 for "
                   "--model, 0,0.25,0.5,0.75,1 for --fig3)")
    p.add_argument("--rotations", type=_args.positive_int, default=3, help="random rotations per alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantile", type=_args.open_fraction, default=None,
                   help="top activation quantile per unit (default 0.005; "
                   "0.05 for --fig3, whose synthetic concepts are large)")
    p.add_argument("--iou-threshold", type=_args.fraction, default=None,
                   help="interpretable when best IoU exceeds this "
                   "(default 0.04; 0.1 for --fig3)")
    p.add_argument("--batch-size", type=_args.positive_int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/dissect")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from ..dissection import BrodenDataset, dissect, make_synthetic_broden
    from ..dissection.experiment import (
        DEFAULT_ALPHAS,
        fig3_experiment,
        plot_fig3,
        plot_units,
        rotation_curve,
        summarize,
        write_rows_csv,
    )
    from ..dissection.fig3_models import load_any

    if args.data is None:
        raise ValueError("--data ROOT is required (a Broden-layout dataset, or where to write a synthetic one)")
    root = Path(args.data)
    # every argument is checked before anything is loaded, trained or written
    _args.device(args.device)
    if args.alphas:
        _floats(args.alphas)
    if not (args.fig3 or args.make_synthetic):
        if args.model is None or args.site is None:
            raise ValueError("give --model DIR and --site NAME (or --fig3, or --make-synthetic)")
        _args.input_path(args.data, "--data", "dir")
    if args.model is not None:
        _args.input_path(args.model, "--model")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--data {root} exists and is not a folder")
    out = _args.out_dir(args.out)
    if args.fig3:
        alphas = _floats(args.alphas) if args.alphas else list(DEFAULT_ALPHAS)
        rows = fig3_experiment(root, alphas, args.rotations, n_images=args.images, image_size=args.image_size or 32,
                               steps=args.steps, seed=args.seed, device=args.device,
                               quantile=0.05 if args.quantile is None else args.quantile,
                               iou_threshold=0.1 if args.iou_threshold is None else args.iou_threshold,
                               regenerate=args.make_synthetic,
                               models_out=out / "models" if args.save_models else None,
                               progress=not args.quiet)
        write_rows_csv(rows, out / "fig3_rows.csv")
        write_rows_csv(summarize(rows), out / "fig3_summary.csv")
        plot_fig3(rows, out / "fig3.png")
        for s in summarize(rows):
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}))
        print(f"wrote {out / 'fig3_rows.csv'}, {out / 'fig3_summary.csv'}, {out / 'fig3.png'}")
        return 0
    if args.make_synthetic:
        make_synthetic_broden(root, n_images=args.images, seed=args.seed, image_size=args.image_size or 32)
        print(f"wrote a synthetic Broden-layout dataset of {args.images} images to {root}")
        if args.model is None:
            return 0
    if args.model is None or args.site is None:
        raise ValueError("give --model DIR and --site NAME (or --fig3, or --make-synthetic)")
    model = load_any(args.model)
    ds = BrodenDataset(root, split=args.split)
    quantile = 0.005 if args.quantile is None else args.quantile
    iou_threshold = 0.04 if args.iou_threshold is None else args.iou_threshold
    kwargs = dict(batch_size=args.batch_size, device=args.device, image_size=args.image_size,
                  progress=not args.quiet)
    alphas = _floats(args.alphas) if args.alphas else [0.0]
    res = dissect(model, args.site, ds, quantile=quantile, iou_threshold=iou_threshold, **kwargs)
    safe = args.site.replace("/", "_").replace(":", "_")
    res.to_csv(out / f"units_{safe}.csv")
    plot_units(res, out / f"units_{safe}.png")
    summary = {"site": args.site, "n_units": len(res.units), "interpretable_units": res.interpretable_units,
               "unique_concepts": res.unique_concepts, "by_category": res.counts_by_category(),
               "quantile": quantile, "iou_threshold": iou_threshold, "n_images": res.n_images}
    print(json.dumps(summary))
    if alphas != [0.0]:
        rows = rotation_curve(model, args.site, ds, alphas, args.rotations, seed=args.seed, quantile=quantile,
                              iou_threshold=iou_threshold, **kwargs)
        rows = [{"arch": Path(args.model).name, "layer": args.site, **r} for r in rows]
        write_rows_csv(rows, out / f"rotation_{safe}.csv")
        plot_fig3(rows, out / f"rotation_{safe}.png")
        for s in summarize(rows):
            print(json.dumps({k: s[k] for k in ("alpha", "fraction_mean", "fraction_std", "unique_mean")}))
    print(f"wrote results to {out}")
    return 0
