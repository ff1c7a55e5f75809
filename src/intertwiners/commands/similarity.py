"""intertwiners similarity: layer x layer CKA matrices and per-layer Procrustes between two saved models."""

from __future__ import annotations

import json

from ..data import DATASETS
from . import _args

NAME = "similarity"
HELP = ("Compare two saved models on a dataset: layer x layer similarity matrices (CSV + heatmap PNG), "
        "Procrustes similarity per layer (paper section 5), and permutation-test p-values of the same-layer "
        "similarities (is each score above chance?).")

NULL_MEASURES = {"grelu_cka": "grelu_cka", "cka": "linear_cka", "linear_cka": "linear_cka", "rbf_cka": "rbf_cka"}


def _list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def add_arguments(p):
    p.add_argument("model_a", help="folder (or .safetensors file) written by `intertwiners train`")
    p.add_argument("model_b", help="the second model (e.g. another seed)")
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
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
    p.add_argument("--permutations", type=int, default=1000,
                   help="shuffles of the samples in the permutation test of each same-layer similarity (0: none)")
    p.add_argument("--permutation-samples", type=int, default=1000,
                   help="first N samples used by the permutation tests (full N x N Gram matrices; at most "
                        "--max-samples)")
    p.add_argument("--chance-corrected", action="store_true",
                   help="also print the chance-corrected scores (statistic - mean of the permutation null)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/similarity", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from .. import data as data_mod
    from .. import models
    from ..similarity import layer_similarity_matrix, procrustes_per_layer
    from ..similarity.plots import plot_matrices, save_heatmap, write_matrix_csv
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
    if args.permutations < 0 or args.permutation_samples < 4:
        raise ValueError(f"--permutations must be >= 0 (got {args.permutations}) and --permutation-samples >= 4 "
                         f"(got {args.permutation_samples})")
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
    panels = {}
    for measure in measures:
        m, sa, sb = layer_similarity_matrix(model_a, model_b, ds, sites_a, sites_b, measure=measure,
                                            estimator=args.estimator, return_sites=True, **common)
        csv_path = write_matrix_csv(m, sa, sb, out / f"{measure}.csv")
        png_path = save_heatmap(m, sa, sb, out / f"{measure}.png", title=f"{measure} ({args.estimator} HSIC)")
        summary["files"] += [str(csv_path), str(png_path)]
        panels[measure] = (m, sa, sb)
        print(f"{measure}: diagonal {[round(float(v), 4) for v in m.diagonal()]} -> {csv_path}, {png_path}")
    if len(panels) > 1:   # the figure of the report's Figs. 2 and 5: every measure side by side
        _, sa, sb = next(iter(panels.values()))
        summary["files"].append(str(plot_matrices({k: v[0] for k, v in panels.items()}, sa, sb,
                                                  out / "similarity.png")))
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
    if args.permutations > 0:
        summary["permutation_tests"] = _null_tests(args, model_a, model_b, ds, sites_a, sites_b, measures, groups,
                                                   out)
        summary["files"].append(str(out / "pvalues.csv"))
    with _args.atomic_write(out / "similarity.json") as f:
        f.write(json.dumps(summary, indent=2))
    return 0


def _null_tests(args, model_a, model_b, ds, sites_a, sites_b, cka_measures, groups, out) -> dict:
    """Permutation tests of site k of A against site k of B for every measure; printed and in pvalues.csv."""
    from ..features import activation_sites
    from ..similarity.permutation import same_layer_tests

    sa = sites_a or activation_sites(model_a, ds.x[:2])
    sb = sites_b or (sa if sites_a is not None else activation_sites(model_b, ds.x[:2]))
    if len(sa) != len(sb):
        raise ValueError(f"permutation tests pair sites one to one, got {len(sa)} and {len(sb)} sites; pass "
                         "--sites-a/--sites-b of equal length or --permutations 0")
    measures = [NULL_MEASURES[m] for m in cka_measures if m in NULL_MEASURES]
    measures += [f"procrustes_{g}" for g in groups or []]
    n = min(args.permutation_samples, len(ds.x), args.max_samples or len(ds.x))
    tests = same_layer_tests(model_a, model_b, ds, sa, sb, measures, args.permutations, n, args.seed,
                             device=args.device, drop_dead=not args.keep_dead)
    print(f"permutation tests ({args.permutations} shuffles of the first {n} samples; p = (1 + #null >= "
          f"observed) / (1 + shuffles)):")
    with _args.atomic_write(out / "pvalues.csv") as f:
        f.write("site_a,site_b,measure,statistic,pvalue,chance_corrected\n")
        for m, r in tests.items():
            for i, (a, b) in enumerate(zip(sa, sb)):
                f.write(f"{a},{b},{m},{r['statistic'][i]:.6f},{r['pvalue'][i]:.6g},{r['chance_corrected'][i]:.6f}\n")
                extra = f"  chance-corrected {r['chance_corrected'][i]:+.4f}" if args.chance_corrected else ""
                print(f"  {a:>16} {m:>22}: {r['statistic'][i]:.4f}  p = {r['pvalue'][i]:.4g}{extra}")
    return tests
