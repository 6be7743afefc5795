"""The command-line programs: ``train.py`` / ``lenet-train`` and ``eval.py`` / ``lenet-eval``.

Each parses its arguments and calls the library; every failure a user can cause ends as
one ``error:`` line and exit code 2 (``lenet_jax.errors``).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one ``error:`` line and exit code 2, like every other
    error of the project."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code argparse ended with (2 after its one error
    line, 0 after --help), so that ``main`` returns rather than exits."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
