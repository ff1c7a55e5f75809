"""intertwiners report: redraw the figures and report.md from DIR/results.sqlite alone."""

from __future__ import annotations

NAME = "report"
HELP = "Redraw the figures (PNG) and DIR/report.md from DIR/results.sqlite alone."


def add_arguments(p):
    p.add_argument("dir", help="the output folder of `intertwiners reproduce` (holding results.sqlite)")


def run(args) -> int:
    from pathlib import Path

    from ..experiments.report import write_report
    from ..experiments.store import STORE_NAME

    folder = Path(args.dir)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (give the --out folder of `intertwiners reproduce`)")
    if not (folder / STORE_NAME).is_file():
        raise ValueError(f"{folder} holds no {STORE_NAME} (give the --out folder of `intertwiners reproduce`)")

    path = write_report(args.dir)
    print(f"report: {path}")
    return 0
