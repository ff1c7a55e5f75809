"""intertwiners rotation-penalty: the §3.3 sanity test (Fig. 4) on batch-norm-free Myrtle CNNs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..data import DATASETS
from . import _args

NAME = "rotation-penalty"
HELP = ("Insert a fixed G_ReLU or orthogonal channel transform before a layer's activation, fine-tune the "
        "later layers, and report the accuracy lost (Fig. 4); writes a CSV and a PNG.")

FIELDS = ("panel", "layer", "conv", "site", "position", "transform", "seed", "channels", "epochs", "finetune",
          "baseline_accuracy", "transformed_accuracy", "finetuned_accuracy", "penalty", "val_accuracy",
          "best_epoch", "wall_time_s")


def add_arguments(p):
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--activations", default="relu,sigmoid",
                   help="comma-separated activations of the batch-norm-free Myrtle CNNs to test")
    p.add_argument("--model", default=None,
                   help="a saved model folder (intertwiners train) to use instead of training one; "
                        "then --activations is ignored")
    p.add_argument("--layers", default="conv1,conv2,conv3",
                   help="layers whose pre-activation is transformed: names or Sequential indices "
                        "(the paper's 0,2,5 are conv1,conv2,conv3)")
    p.add_argument("--transforms", default="grelu,orthogonal,identity",
                   help="comma-separated: grelu, orthogonal, permutation, identity (the identity is the control: "
                        "what fine-tuning alone does)")
    p.add_argument("--seeds", default="0-4", help="repeats, e.g. 0-9")
    p.add_argument("--epochs", type=_args.positive_int, default=10, help="fine-tuning epochs (the paper: 50)")
    p.add_argument("--finetune", default="all", choices=["all", "next"],
                   help="fine-tune all later layers (the paper) or only the next conv/linear")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the trained base model")
    p.add_argument("--model-epochs", type=_args.positive_int, default=None, help="base model epochs (default: recipe)")
    p.add_argument("--width", type=_args.positive_int, default=None,
                   help="Myrtle CNN width (default 16 on digits, 64 else)")
    p.add_argument("--train-subset", type=_args.positive_int, default=None,
                   help="fine-tune on the first k training images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/rotation_penalty")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _base_model(args, activation: str, data, out: Path):
    """Load the base model from OUT/models/<activation> or train (and save) it."""
    from .. import models
    from ..training import is_complete, train_one

    folder = out / "models" / f"myrtle_cnn-nobn-{activation}-seed{args.model_seed}"
    if is_complete(folder):
        return models.load(folder), json.loads((folder / "metrics.json").read_text())
    kwargs = {"batch_norm": False, "activation": activation}
    if args.width is not None:
        kwargs["width"] = args.width
    model, metrics = train_one("myrtle_cnn", args.dataset, args.model_seed, epochs=args.model_epochs,
                               device=args.device, progress=not args.quiet, data=data, **kwargs)
    models.save(model, folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return model, metrics


def _read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's CSV (to resume from); a damaged file is a ValueError naming it."""
    if not path.is_file():
        return []
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for i, r in enumerate(csv.DictReader(f), start=2):
                try:
                    for k in ("position", "seed", "channels", "epochs", "best_epoch"):
                        r[k] = int(r[k])
                    for k in ("baseline_accuracy", "transformed_accuracy", "finetuned_accuracy", "penalty",
                              "val_accuracy", "wall_time_s"):
                        r[k] = float(r[k])
                    for k in ("panel", "layer", "transform"):
                        if not isinstance(r[k], str):
                            raise TypeError(k)
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{path} line {i} is damaged ({type(err).__name__}: {err}); move the file "
                                     "away to start afresh") from None
                r.setdefault("finetune", "all")
                r["finetune"] = r["finetune"] or "all"
                rows.append(r)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a readable CSV ({err}); move the file away to start afresh") from None
    return rows


def run(args) -> int:
    from .. import models
    from .._util import parse_seeds
    from ..data import load as load_data
    from ..rotation_penalty import TRANSFORMS, plot_rotation_penalties, rotation_penalty_sweep, summarize, with_control

    # every argument is checked before anything is loaded, trained or written
    transforms = _args.names(args.transforms, "--transforms", TRANSFORMS)
    if not transforms:
        raise ValueError("--transforms is empty")
    layers = _args.names(args.layers, "--layers")
    if not layers:
        raise ValueError("--layers is empty")
    seeds = parse_seeds(args.seeds)
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    _args.device(args.device)
    activations = _args.names(args.activations, "--activations")
    if args.model:
        # a bad folder or config fails here, before anything is written
        models.check_config(models.read_config(args.model)[1], f"--model {args.model}")
    else:
        if not activations:
            raise ValueError("--activations is empty (or give --model)")
        for act in activations:
            models.check_activation(act, "--activations")
    if args.dataset == "cifar10" and args.data_root is None:
        raise ValueError("--dataset cifar10 needs --data-root DIR (nothing is downloaded)")
    out = _args.out_dir(args.out)
    train, test = load_data(args.dataset, args.data_root)

    if args.model:
        bases = [(Path(args.model).name, models.load(args.model), None)]
    else:
        bases = []
        for act in activations:
            model, metrics = _base_model(args, act, (train, test), out)
            bases.append((act, model, metrics))

    csv_path = out / "rotation_penalty.csv"
    previous = _read_rows(csv_path)  # earlier runs are kept; those with these epochs are resumed from
    rows = [r for r in previous if r["epochs"] == args.epochs and r["finetune"] == args.finetune]
    # the CSV is rewritten atomically after every new row (earlier rows, of any settings, are kept): an error
    # or a kill never truncates it, and the next run resumes from every row written
    written = list(previous)
    for panel, model, _ in bases:
        done = {(r["layer"], r["transform"], r["seed"]) for r in rows if r["panel"] == panel}

        def store(r, panel=panel):
            r["panel"] = panel
            written.append(r)
            _args.write_csv(csv_path, FIELDS, written)
            rows.append(r)
            print(f"{panel:>10} {r['conv']:>6} {r['transform']:>11} seed {r['seed']}: "
                  f"penalty {r['penalty']:+.2f} (baseline {r['baseline_accuracy']:.2f}, "
                  f"after insertion {r['transformed_accuracy']:.2f}, "
                  f"after fine-tuning {r['finetuned_accuracy']:.2f})", flush=True)

        rotation_penalty_sweep(model, layers, transforms, train, test, seeds=seeds, epochs=args.epochs,
                               device=args.device, done=done, callback=store, train_subset=args.train_subset,
                               finetune=args.finetune, progress=not args.quiet)
    if not rows:
        raise ValueError("no rows were computed")

    rows = with_control(rows, "identity")
    by = ("panel", "conv", "transform")
    summary = summarize(rows, by=by)
    relative = {tuple(s[k] for k in by): s for s in summarize(rows, key="penalty_vs_control", by=by)}
    for s in summary:
        rel = relative.get(tuple(s[k] for k in by))
        s["mean_vs_identity"] = rel["mean"] if rel else float("nan")
        s["ci95_vs_identity"] = rel["ci95"] if rel else float("nan")
    _args.write_csv(out / "rotation_penalty_summary.csv", ("panel", "conv", "transform", "mean", "std", "ci95", "n",
                                                          "mean_vs_identity", "ci95_vs_identity"), summary)
    title = f"{args.dataset}, {args.epochs} epochs, fine-tune {args.finetune}"
    plot_rotation_penalties(rows, out / "rotation_penalty.png", title=f"Rotation penalty ({title})")
    figures = [out / "rotation_penalty.png"]
    if relative:
        plot_rotation_penalties(rows, out / "rotation_penalty_vs_identity.png", key="penalty_vs_control",
                                title=f"vs identity control ({title})",
                                ylabel="fine-tuned acc. (identity) - fine-tuned acc. (points)")
        figures.append(out / "rotation_penalty_vs_identity.png")
    print(f"{'model':>10} {'layer':>6} {'transform':>11} {'penalty':>8} {'ci95':>6} {'vs_id':>7} {'ci95':>6} n")
    for s in summary:
        print(f"{s['panel']:>10} {s['conv']:>6} {s['transform']:>11} {s['mean']:+8.2f} {s['ci95']:6.2f} "
              f"{s['mean_vs_identity']:+7.2f} {s['ci95_vs_identity']:6.2f} {s['n']}")
    print(f"wrote {csv_path}, {out / 'rotation_penalty_summary.csv'}, " + ", ".join(map(str, figures)))
    return 0
