"""The ``intertwiners`` command line: a thin layer over the library, one module per subcommand.

Each module in :mod:`intertwiners.commands` defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from . import __version__

# Subcommand modules, in the order --help lists them.
COMMANDS = ("train", "group", "verify", "rotation_penalty", "stitch", "similarity", "dissect",
            "reproduce", "report", "align", "merge")


def _load_commands():
    return [importlib.import_module(f"intertwiners.commands.{name}") for name in COMMANDS]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="intertwiners",
        description="Symmetries of deep learning models and their internal representations "
                    "(Godfrey et al., NeurIPS 2022).")
    parser.add_argument("--version", action="version", version=f"intertwiners {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def expected_failure(err: BaseException) -> str | None:
    """The one-line message for an error that a user can cause (bad input, a bad file, a device that does not
    exist, a full disk, a damaged database); None for anything else, which is a bug and keeps its traceback."""
    import sqlite3

    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, sqlite3.DatabaseError):
        what = "the disk is full" if "full" in str(err).lower() else "the results database is damaged or unreadable"
        return f"{what}: {err}"
    if isinstance(err, OSError):
        where = " ".join(f"{f}" for f in (err.filename, err.filename2) if f)
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason = "no space left on the device (disk full)"
        return f"{reason}{': ' + where if where else ''}"
    if isinstance(err, MemoryError):
        return "out of memory; use smaller batches or a smaller scale"
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return f"out of GPU memory; use smaller batches or --device cpu ({str(err).splitlines()[0]})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. Expected failures are one line on stderr and a non-zero status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:            # --help, --version, or a usage error (already printed)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"intertwiners {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = expected_failure(err)
        if message is None:
            raise
        message = " ".join(message.split())   # one line, whatever the message holds
        print(f"intertwiners {args.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, OSError | MemoryError) and not isinstance(err, ValueError) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
