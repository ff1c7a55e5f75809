"""intertwiners merge: bring several models into one basis and average them."""

from __future__ import annotations

NAME = "merge"
HELP = ("Merge two or more models of one architecture (beyond the paper): align them into one basis "
        "(MergeMany rounds for three or more), average the weights, recompute batch norm. The models are this "
        "package's folders or local Hugging Face model folders; the merged model is written in the same format "
        "to OUT/merged, with OUT/merge.json (for this package's models: test accuracy of the merged model, of "
        "each model and of their unaligned average).")


def add_arguments(p):
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folders (two or more, one architecture): written by `intertwiners train`, or local "
                        "Hugging Face model folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"],
                   help="data of this package's models (not used for Hugging Face folders)")
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--method", default=None, choices=["activations", "weights"],
                   help="alignment method (default: activations for this package's models, weights for Hugging "
                        "Face folders, which are aligned by weights only)")
    p.add_argument("--group", default="full", choices=["full", "permutation"],
                   help="the group of the first alignment of every model to the first one")
    p.add_argument("--max-rounds", type=int, default=5, help="MergeMany rounds at most (0: align to the first only)")
    p.add_argument("--align-samples", type=int, default=5000,
                   help="training inputs used for the activations (the first N)")
    p.add_argument("--tokens", type=int, default=8,
                   help="Hugging Face models: length of the token-id example input (2 rows of ids 0, 1, 2, ...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run(args) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from .. import data
    from .._util import resolve_device
    from ..alignment import merge
    from ..alignment.checkpoints import HUGGING_FACE, StagedOutput, load_folders, save_like, token_ids

    if len(args.models) < 2:
        raise ValueError(f"merge needs at least two model folders, got {len(args.models)}")
    if args.max_rounds < 0:
        raise ValueError(f"--max-rounds must be >= 0, got {args.max_rounds}")
    if args.align_samples < 2:
        raise ValueError(f"--align-samples must be at least 2, got {args.align_samples}")
    staged = StagedOutput(args.out)
    device = resolve_device(args.device)
    found = load_folders(args.models, device)
    models = [f.model for f in found]
    if found[0].kind == HUGGING_FACE:
        if args.method == "activations":
            raise ValueError("Hugging Face folders are merged by their weights (--method weights): there is no "
                             "dataset of inputs for them here")
        ids = token_ids(models[0], args.tokens).to(next(models[0].parameters()).device)
        merged = merge(models, None, method="weights", group=args.group, example_input=ids,
                       max_rounds=args.max_rounds)
    else:
        train, test = data.load(args.dataset, args.data_root)
        merged = merge(models, train.x[:args.align_samples], method=args.method or "activations", group=args.group,
                       train_data=train, eval_data=test, max_rounds=args.max_rounds)
    report = merged.merge_report
    with staged as stage:
        save_like(merged, found[0], stage / "merged")
        (stage / "merge.json").write_text(json.dumps({"models": [str(f.path) for f in found], **asdict(report)},
                                                     indent=2))
    for row in report.rows():
        print(f"{row['model']:<20} accuracy {row['accuracy']:6.2f}%  loss {row['loss']:.4f}")
    print(f"{report.rounds} MergeMany round(s), models moved per round {report.moved}"
          f"{'' if report.converged else ' (not converged)'}; {report.seconds:.1f} s")
    out = Path(args.out)
    print(f"wrote {out / 'merged'}, {out / 'merge.json'}")
    return 0
