"""intertwiners verify: trace a model's weight-space symmetries and check them on its outputs."""

from __future__ import annotations

import json

NAME = "verify"
HELP = ("Find a model's weight-space symmetries by tracing (spaces, groups, pinned spaces) and print the "
        "per-space max abs/relative output error of randomly transformed copies, in eval and train mode.")

ARCHS = ("myrtle_cnn", "resnet20", "mlp")


def add_arguments(p):
    p.add_argument("model", help="a saved model folder (or its model.safetensors), or an architecture name: "
                                 + ", ".join(ARCHS))
    p.add_argument("--activation", default=None, help="for an architecture name, e.g. relu, tanh, leaky_relu:0.2")
    p.add_argument("--shortcut", default=None, choices=["A", "B"], help="resnet20 shortcut option")
    p.add_argument("--width", type=int, default=None, help="myrtle_cnn width (default 16)")
    p.add_argument("--no-batch-norm", action="store_true", help="myrtle_cnn without batch norm")
    p.add_argument("--in-features", type=int, default=64, help="mlp input size")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the model's, 32 for resnet20)")
    p.add_argument("--batch", type=int, default=8, help="size of the random input batch")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--trials", type=int, default=2, help="random elements per space")
    p.add_argument("--warmup", type=int, default=3,
                   help="train-mode forwards on random batches first, so batch norm has non-trivial running "
                        "statistics (on a copy; a loaded model is never changed on disk)")
    p.add_argument("--rtol", type=float, default=None,
                   help="max relative error to pass (default 1e-9 for float64, 1e-4 for float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def build_model(args):
    """(model, input shape without the batch axis) from a saved folder or an architecture name."""
    from pathlib import Path

    from .. import models

    if args.model in ARCHS:
        kwargs = {}
        if args.activation:
            kwargs["activation"] = args.activation
        if args.model == "myrtle_cnn":
            kwargs.update(width=args.width or 16, batch_norm=not args.no_batch_norm)
            if args.input_size:
                kwargs["input_size"] = args.input_size
        elif args.model == "resnet20":
            if args.shortcut:
                kwargs["shortcut"] = args.shortcut
        else:
            kwargs["in_features"] = args.in_features
        model = models.ARCHITECTURES[args.model](**kwargs)
    elif Path(args.model).exists():
        model = models.load(args.model)
    else:
        raise ValueError(f"{args.model!r} is neither a saved model folder nor an architecture ({', '.join(ARCHS)})")
    cfg = getattr(model, "intertwiners_config", {"arch": "", "kwargs": {}})
    kw = cfg.get("kwargs", {})
    if cfg.get("arch") == "mlp":
        shape = (kw["in_features"],)
    elif cfg.get("arch") == "myrtle_cnn":
        side = kw.get("input_size", 32)
        shape = (kw.get("in_channels", 3), side, side)
    else:
        side = args.input_size or 32
        shape = (kw.get("in_channels", 3), side, side)
    return model, shape


def run(args) -> int:
    import torch

    from .._util import resolve_device
    from ..features import eval_mode
    from ..symmetries import symmetry_spec, verify_symmetry

    if args.batch < 2:
        raise ValueError("--batch must be at least 2 (train-mode batch norm needs more than one sample)")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    rtol = args.rtol if args.rtol is not None else (1e-9 if dtype == torch.float64 else 1e-4)
    device = resolve_device(args.device)
    model, shape = build_model(args)
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *shape, generator=g, dtype=dtype).to(device)
    with torch.no_grad(), eval_mode(model, True):
        for k in range(args.warmup):
            model(1.5 * torch.randn(args.batch, *shape, generator=g, dtype=dtype).to(device) + 0.2 * (k + 1))
    spec = symmetry_spec(model, x)
    report = verify_symmetry(model, x, spec=spec, generator=g, trials=args.trials)
    failures = report.failures(rtol)
    if args.json:
        print(json.dumps({
            "spaces": {n: {"size": s.size, "kind": s.kind, "sites": s.sites} for n, s in spec.spaces.items()},
            "pinned": spec.pinned,
            "errors": [r.__dict__ for r in report.rows],
            "max_abs": report.max_abs, "max_rel": report.max_rel, "rtol": rtol, "ok": not failures}))
    else:
        print(spec.summary())
        print()
        print(report)
        if failures:
            print(f"FAILED: {len(failures)} row(s) above rtol {rtol:g}: "
                  + ", ".join(f"{r.space} ({r.mode})" for r in failures))
        else:
            print(f"OK: every space within rtol {rtol:g}")
    return 1 if failures else 0
