"""intertwiners stitch: stitching penalties over a zoo (pairs x sites x kinds), CSV and the Fig. 1 plot."""

from __future__ import annotations

import csv
from pathlib import Path

from . import _args

NAME = "stitch"
HELP = ("Stitch pairs of trained models (from `intertwiners train`) at every site with every kind; write "
        "OUT/stitch.csv and the Fig. 1 plot OUT/stitch.png.")


def add_arguments(p):
    p.add_argument("zoo", nargs="+", help="zoo folder(s): OUT/<arch>-<dataset> (holding seed<k>/) or OUT; give "
                   "several (e.g. one per LeakyReLU slope) for the slope sweep")
    p.add_argument("--pairs", type=_args.nonneg_int, default=4,
                   help="distinct model pairs drawn per zoo (0, or more than exist: all pairs)")
    p.add_argument("--pair-seed", type=int, default=0, help="seed of the pair draw")
    p.add_argument("--sites", default="all", help="comma-separated activation sites, or 'all' stitchable ones")
    p.add_argument("--kinds", default="full,low_rank:1,low_rank:4,grelu",
                   help="comma-separated: full, low_rank:R, grelu, permutation, orthogonal, identity")
    p.add_argument("--settings", default="default", choices=["default", "authors"],
                   help="default: Adam lr 1e-3, 5 epochs; authors: SGD lr 1e-3, wd 1e-4, 20 epochs, "
                   "G_ReLU permutation first")
    p.add_argument("--epochs", type=_args.positive_int, default=None, help="override the settings' epochs")
    p.add_argument("--lr", type=_args.positive_float, default=None, help="override the settings' learning rate")
    p.add_argument("--batch-size", type=_args.positive_int, default=None)
    p.add_argument("--init", default=None, choices=["match", "identity", "barycenter"],
                   help="initial layer (default: the closed-form match)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stitch")
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/stitch")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _check(args) -> tuple[list[str], list[str] | None, dict[str, list]]:
    """Every argument, before anything is written: kinds, zoo folders, sites (on the first model), device, --out."""
    from .. import models
    from ..stitching.layers import parse_kind
    from ..stitching.stitch import stitchable_sites
    from ..stitching.sweep import model_folders

    kinds = _args.names(args.kinds, "--kinds")
    if not kinds:
        raise ValueError("--kinds is empty; give e.g. full,low_rank:1,grelu")
    for k in kinds:
        parse_kind(k)
    _args.device(args.device)
    folders = {zoo: model_folders(zoo) for zoo in args.zoo}
    for zoo, found in folders.items():
        if len(found) < 2:
            raise ValueError(f"{zoo}: stitching needs at least 2 trained models, found {len(found)}")
    sites = None if args.sites.strip() == "all" else _args.names(args.sites, "--sites")
    if sites == []:
        raise ValueError("--sites is empty; give activation sites or 'all'")
    for zoo, found in folders.items():
        available = stitchable_sites(models.load(found[0]))
        bad = [s for s in sites or [] if s not in available]
        if bad:
            raise ValueError(f"--sites: {', '.join(map(repr, bad))} not stitchable in {zoo}; stitchable sites: "
                             f"{', '.join(available)}")
    _args.out_dir(args.out)
    return kinds, sites, folders


def run(args) -> int:
    from ..stitching.plot import plot_penalties, plot_slope_sweep
    from ..stitching.sweep import ROW_KEYS, slope_of, stitch_sweep, summarize

    kinds, sites, zoo_folders = _check(args)
    out = Path(args.out)
    csv_path = out / "stitch.csv"
    overrides = {k: v for k, v in dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                       init=args.init).items() if v is not None}
    rows: list[dict] = []
    # rows go to a temporary file as they come and replace OUT/stitch.csv only when the sweep is complete:
    # an error never truncates the CSV of an earlier run (the rows done before it stay in stitch.partial.csv)
    with _args.atomic_write(csv_path, newline="", keep_partial=out / "stitch.partial.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=["zoo", *ROW_KEYS])
        writer.writeheader()
        for zoo in args.zoo:
            folders = zoo_folders[zoo]
            available = len(folders) * (len(folders) - 1) // 2
            n_pairs = available if args.pairs == 0 else min(args.pairs, available)
            if not args.quiet:
                print(f"{zoo}: {len(folders)} models, {n_pairs} pair(s)"
                      + (f" (only {available} distinct pairs exist)" if args.pairs > available else ""))

            def on_row(row, zoo=zoo):
                row = {"zoo": str(zoo), **row}
                writer.writerow(row)
                fh.flush()
                rows.append(row)
                if not args.quiet:
                    print(f"  pair {row['pair']} {row['site']:>16} {row['kind']:>12}: accuracy "
                          f"{row['accuracy']:.2f}%  penalty {row['penalty']:+.2f}", flush=True)

            stitch_sweep(folders, sites, kinds, n_pairs=n_pairs,
                         pair_seed=args.pair_seed, seed=args.seed, data_root=args.data_root, device=args.device,
                         on_row=on_row, settings=args.settings, **overrides)
    activations = list(dict.fromkeys(str(r["activation"]) for r in rows))
    figures = []
    if len(activations) == 1:
        figures.append(out / "stitch.png")
        plot_penalties(rows, figures[-1])
    else:
        for act in activations:
            figures.append(out / f"stitch_{act.replace(':', '_')}.png")
            plot_penalties([r for r in rows if str(r["activation"]) == act], figures[-1],
                           title=f"Stitching penalties, {act}")
        if all(slope_of(a) is not None for a in activations):
            figures.append(out / "stitch_slopes.png")
            plot_slope_sweep(rows, figures[-1])
    for s in summarize(rows, by=("activation", "kind", "site")):
        print(f"{s['activation']:>16} {s['kind']:>12} {s['site']:>16}: penalty {s['mean']:+6.2f} "
              f"[{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] (n={s['n']})")
    print(f"wrote {csv_path} and {', '.join(str(f) for f in figures)}")
    return 0
