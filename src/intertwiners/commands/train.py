"""intertwiners train: a zoo of models, one folder per seed."""

from __future__ import annotations

import json

from ..data import DATASETS
from . import _args

NAME = "train"
HELP = "Train one model per seed (model.safetensors, config.json, metrics.json in OUT/<arch>-<dataset>/seed<k>)."


def add_arguments(p):
    p.add_argument("--arch", default="myrtle_cnn", choices=["myrtle_cnn", "resnet20", "mlp"])
    p.add_argument("--dataset", default="digits", choices=list(DATASETS))
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--seeds", default="0-1", help="e.g. 0-7 or 0,3,5")
    p.add_argument("--epochs", type=_args.positive_int, default=None,
                   help="default: the dataset's recipe (digits and digits-cluttered 12, cifar10 50)")
    p.add_argument("--activation", default=None, help="e.g. relu, sigmoid, leaky_relu:0.3 (default: relu)")
    p.add_argument("--width", type=_args.positive_int, default=None,
                   help="myrtle_cnn width (default 16 on digits, 64 otherwise)")
    p.add_argument("--no-batch-norm", action="store_true", help="myrtle_cnn without batch norm (conv bias on)")
    p.add_argument("--shortcut", default=None, choices=["A", "B"], help="resnet20 shortcut option")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/zoo")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from .._util import parse_seeds
    from ..models import check_activation
    from ..training import train_zoo

    # every argument is checked before anything is loaded, trained or written
    seeds = parse_seeds(args.seeds)
    _args.device(args.device)
    if args.activation:
        check_activation(args.activation, "--activation")
    if args.dataset == "cifar10":
        if args.data_root is None:
            raise ValueError("--dataset cifar10 needs --data-root DIR (the folder with data_batch_1..5 and "
                             "test_batch; nothing is downloaded)")
        _args.input_path(args.data_root, "--data-root", "dir")
    _args.out_dir(args.out)
    kwargs = {}
    if args.activation:
        kwargs["activation"] = args.activation
    if args.width is not None:
        kwargs["width"] = args.width
    if args.no_batch_norm:
        kwargs["batch_norm"] = False
    if args.shortcut:
        kwargs["shortcut"] = args.shortcut
    results = train_zoo(args.arch, args.dataset, seeds, args.out, root=args.data_root,
                        epochs=args.epochs, device=args.device, progress=not args.quiet, **kwargs)
    for m in results:
        print(json.dumps({k: m[k] for k in ("seed", "test_accuracy", "val_accuracy", "train_accuracy",
                                             "epochs", "wall_time_s")}))
    return 0
