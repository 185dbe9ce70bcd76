"""Command-line argument types that refuse bad numbers when the command line is parsed.

``--steps 0``, ``--cfg-scale nan`` or ``--batch-size -1`` stop the command before anything is loaded,
with one line naming the flag, the rule and the value given, and exit code 2::

    racedit-sample: error: argument --steps: must be an integer >= 1, got '0' (see racedit-sample --help)

Use them as ``type=`` of ``add_argument`` and build the parser with :class:`Parser`, whose usage errors
are that one line instead of argparse's multi-line usage block.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from racedit.cli.common import EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one stderr line pointing at ``--help`` (exit 2).

    Sub-commands made with ``add_subparsers`` are of this class too (argparse uses the parent's class).
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"  # argparse shows the name in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    return _finite(text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value
