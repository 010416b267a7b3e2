"""The method flags of ``thinslice upsample`` and ``thinslice batch``, generated from the one option table
(:data:`thinslice.infer.options.METHOD_FLAGS`): both commands offer the same flags with the same ranges and help."""

from __future__ import annotations

import argparse

from thinslice.cli.checks import ranged
from thinslice.infer.options import METHOD_FLAGS, MethodFlag


def add_method_arguments(parser: argparse.ArgumentParser, acquisition: argparse._ActionsContainer,
                         learned_title: str) -> None:
    """Every row of the option table as a flag: the acquisition ones into ``acquisition`` (a parser or group), the
    others into a group titled ``learned_title``, then the free ``--option KEY=VALUE``."""
    learned = parser.add_argument_group(learned_title)
    for row in METHOD_FLAGS:
        _add(acquisition if row.group == "acquisition" else learned, row)
    learned.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="extra method-specific option (repeatable)")


def _add(container: argparse._ActionsContainer, row: MethodFlag) -> None:
    """One flag; unset flags stay None, so that only what the user gave reaches the method."""
    if row.kind is None:
        container.add_argument(row.flag, action="store_true", default=None, help=row.help)
        return
    kind = ranged(row.kind, *row.bounds) if row.bounds is not None else row.kind
    container.add_argument(row.flag, type=kind, default=None, help=row.help, choices=row.choices or None,
                           metavar=row.metavar, nargs=row.nargs)
