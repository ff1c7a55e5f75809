"""intertwiners report: redraw the figures and report.md from DIR/results.sqlite alone."""

from __future__ import annotations

NAME = "report"
HELP = "Redraw the figures (PNG) and DIR/report.md from DIR/results.sqlite alone."


def add_arguments(p):
    p.add_argument("dir", help="the output folder of `intertwiners reproduce` (holding results.sqlite)")


def run(args) -> int:
    from ..experiments.report import write_report

    path = write_report(args.dir)
    print(f"report: {path}")
    return 0
