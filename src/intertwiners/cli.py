"""The ``intertwiners`` command line: a thin layer over the library, one module per subcommand.

Each module in :mod:`intertwiners.commands` defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# Subcommand modules, in the order --help lists them.
COMMANDS = ("train", "group", "verify", "rotation_penalty", "stitch", "similarity", "dissect",
            "reproduce", "report", "align")


def _load_commands():
    return [importlib.import_module(f"intertwiners.commands.{name}") for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intertwiners",
        description="Symmetries of deep learning models and their internal representations "
                    "(Godfrey et al., NeurIPS 2022).")
    parser.add_argument("--version", action="version", version=f"intertwiners {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ValueError as err:
        print(f"intertwiners {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
