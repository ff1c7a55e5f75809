"""intertwiners similarity: layer x layer CKA matrices and per-layer Procrustes between two saved models."""

from __future__ import annotations

import json

from . import _args

NAME = "similarity"
HELP = ("Compare two saved models on a dataset: layer x layer similarity matrices (CSV + heatmap PNG) and "
        "Procrustes similarity per layer (paper section 5).")


def _list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def add_arguments(p):
    p.add_argument("model_a", help="folder (or .safetensors file) written by `intertwiners train`")
    p.add_argument("model_b", help="the second model (e.g. another seed)")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--max-samples", type=_args.positive_int, default=None, help="use only the first N samples")
    p.add_argument("--measures", default="grelu_cka,cka",
                   help="comma list of layer x layer measures: grelu_cka, cka (linear), rbf_cka")
    p.add_argument("--estimator", default="unbiased", choices=["unbiased", "biased"],
                   help="HSIC estimator (unbiased = HSIC_1 of Nguyen, Raghu & Kornblith 2021)")
    p.add_argument("--procrustes", default="grelu,orthogonal",
                   help="comma list of Procrustes groups (grelu, orthogonal, permutation) per layer; '' for none")
    p.add_argument("--center", action="store_true", help="centre columns before Procrustes")
    p.add_argument("--sites-a", default=None, help="comma list of activation sites of model A (default: all)")
    p.add_argument("--sites-b", default=None, help="comma list of sites of model B (default: same as A / all)")
    p.add_argument("--batch-size", type=_args.positive_int, default=256,
                   help="minibatch size for the streaming estimates")
    p.add_argument("--keep-dead", action="store_true",
                   help="raise on dead units instead of dropping them from the G_ReLU measures")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/similarity", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from .. import data as data_mod
    from .. import models
    from ..similarity import layer_similarity_matrix, procrustes_per_layer
    from ..similarity.plots import save_heatmap, write_matrix_csv
    from ..similarity.procrustes import GROUPS
    from ..similarity.streaming import _CKA_MEASURES

    # every argument is checked before a model is loaded or a file written
    measures = _args.names(args.measures, "--measures", _CKA_MEASURES)
    groups = _args.names(args.procrustes, "--procrustes", GROUPS)
    if not measures and not groups:
        raise ValueError("nothing to compute: --measures and --procrustes are both empty")
    if args.estimator == "unbiased" and args.batch_size < 4:
        raise ValueError(f"--batch-size {args.batch_size}: the unbiased estimator needs batches of at least 4")
    _args.device(args.device)
    if args.dataset == "cifar10" and args.data_root is None:
        raise ValueError("--dataset cifar10 needs --data-root DIR (nothing is downloaded)")
    model_a, model_b = models.load(args.model_a), models.load(args.model_b)
    out = _args.out_dir(args.out)
    train, test = data_mod.load(args.dataset, args.data_root)
    ds = test if args.split == "test" else train
    sites_a, sites_b = _list(args.sites_a), _list(args.sites_b)
    if sites_b is None and sites_a is not None:
        sites_b = sites_a
    common = dict(batch_size=args.batch_size, device=args.device, max_samples=args.max_samples,
                  drop_dead=not args.keep_dead, progress=not args.quiet)
    summary: dict = {"model_a": str(args.model_a), "model_b": str(args.model_b), "dataset": args.dataset,
                     "split": args.split, "files": []}
    for measure in measures:
        m, sa, sb = layer_similarity_matrix(model_a, model_b, ds, sites_a, sites_b, measure=measure,
                                            estimator=args.estimator, return_sites=True, **common)
        csv_path = write_matrix_csv(m, sa, sb, out / f"{measure}.csv")
        png_path = save_heatmap(m, sa, sb, out / f"{measure}.png", title=f"{measure} ({args.estimator} HSIC)")
        summary["files"] += [str(csv_path), str(png_path)]
        print(f"{measure}: diagonal {[round(float(v), 4) for v in m.diagonal()]} -> {csv_path}, {png_path}")
    if groups:
        table = procrustes_per_layer(model_a, model_b, ds, sites_a, sites_b, groups=groups, center=args.center,
                                     **common)
        path = out / "procrustes.csv"
        with _args.atomic_write(path) as f:
            f.write("site," + ",".join(groups) + "\n")
            for site, vals in table.items():
                f.write(site + "," + ",".join(f"{vals[g]:.6f}" for g in groups) + "\n")
        width = max(len(s) for s in table)
        print(f"{'site':<{width}}  " + "  ".join(f"{g:>11}" for g in groups))
        for site, vals in table.items():
            print(f"{site:<{width}}  " + "  ".join(f"{vals[g]:>11.4f}" for g in groups))
        summary["procrustes"] = table
        summary["files"].append(str(path))
    with _args.atomic_write(out / "similarity.json") as f:
        f.write(json.dumps(summary, indent=2))
    return 0
