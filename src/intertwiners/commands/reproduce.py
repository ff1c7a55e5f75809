"""intertwiners reproduce: the whole paper as resumable jobs, results in DIR/results.sqlite."""

from __future__ import annotations

from ..experiments.plan import EXPERIMENT_NAMES
from . import _args

NAME = "reproduce"
HELP = ("Run every experiment of the paper (zoo, rotation penalties, stitching, LeakyReLU sweep, Procrustes, "
        "CKA, dissection) as resumable jobs in OUT/results.sqlite, then write OUT/report.md and the figures.")


def add_arguments(p):
    p.add_argument("--scale", default="small",
                   help="smoke (a pipeline check, ~60-80 s on 2 cores), small (~7-10 min on 2 cores) or paper "
                        "(CIFAR-10, GPU/cluster)")
    p.add_argument("--dataset", default=None, choices=["digits", "digits-cluttered", "cifar10"],
                   help="every experiment on this dataset; default: the scale's (digits for smoke/small, cifar10 "
                        "for paper)")
    p.add_argument("--cluttered", action="store_true",
                   help="Fig. 4 (rotation penalty) on digits-cluttered, where digits is too easy for its effect; "
                        "the rest as the scale says (the same jobs). At small: about 22 min more on 2 cores "
                        "(docs/reproduce.md)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated experiments to run (with the jobs they depend on): "
                        + ", ".join(EXPERIMENT_NAMES))
    p.add_argument("--data-root", default=None, help="folder with the CIFAR-10 python batches")
    p.add_argument("--backend", default="local", choices=["local", "ray", "inline"],
                   help="local: worker processes here; ray: a Ray cluster (or a local Ray instance)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local instance)")
    p.add_argument("--gpus-per-job", type=_args.nonneg_float, default=0,
                   help="ray backend: GPUs each job asks the cluster for (e.g. 0.25 to share one GPU by four)")
    p.add_argument("--workers", type=_args.nonneg_int, default=None,
                   help="jobs in flight (default: the CPU cores here, or the Ray cluster's CPUs)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (results.sqlite, artifacts, report)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (resolved in each worker)")
    p.add_argument("--list", action="store_true", help="print the plan's jobs and exit")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..experiments import build_plan, reproduce
    from ..experiments.plan import CLUTTERED, SCALES
    from ..experiments.runner import closure

    if args.scale not in (*SCALES, "test"):
        raise ValueError(f"unknown scale {args.scale!r}; choose one of {', '.join(SCALES)}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    datasets = CLUTTERED if args.cluttered else None
    only = None if args.only is None else _args.names(args.only, "--only", EXPERIMENT_NAMES)
    if args.list:
        plan = build_plan(args.scale, args.dataset, datasets=datasets, only=only)
        for job in closure(plan.jobs):
            print(f"{job.id}  {job.label}")
        for name, reason in plan.missing.items():
            print(f"missing: {name} ({reason})")
        return 0
    # every argument is checked before the results folder is opened or written
    _args.device(args.device)
    if args.data_root is not None:
        _args.input_path(args.data_root, "--data-root", "dir")
    if args.ray_address is not None and args.backend != "ray":
        raise ValueError("--ray-address needs --backend ray")
    if args.gpus_per_job and args.backend != "ray":
        raise ValueError("--gpus-per-job needs --backend ray")
    plan = build_plan(args.scale, args.dataset, datasets=datasets, only=only)
    if "cifar10" in plan.datasets and args.data_root is None:
        raise ValueError("this plan trains on CIFAR-10: pass --data-root DIR (the folder with data_batch_1..5 and "
                         "test_batch; nothing is downloaded), or use --dataset digits")
    _args.out_dir(args.out)
    summary = reproduce(args.out, args.scale, dataset=args.dataset, data_root=args.data_root,
                        backend=args.backend, workers=args.workers, ray_address=args.ray_address,
                        device=args.device, progress=not args.quiet, report=not args.no_report,
                        gpus_per_job=args.gpus_per_job, datasets=datasets, only=only)
    print(summary.line())
    for label, error in summary.failures:
        print(f"failed: {label}: {error}")
    if not args.no_report:
        print(f"report: {args.out}/report.md")
    return 1 if summary.failed or summary.blocked else 0
