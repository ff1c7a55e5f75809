"""Subcommands of the ``intertwiners`` CLI (see :mod:`intertwiners.cli`)."""
