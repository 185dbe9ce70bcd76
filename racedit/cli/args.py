"""The parser every command uses, its argument types, and the flags that mean the same in every command.

Common flags (each added by one function below, so its meaning and help are the same everywhere):

- ``--config FILE``   a run config YAML (``configs/*.yaml``);
- ``--out DIR``       the command's output folder, created if needed, with fixed file names inside;
- ``--ckpt PATH``     a model: an exported folder, a training checkpoint folder, or an official DiT .pt;
- ``--seed N``        the seed of the command's random draws (results are a function of it);
- ``--device DEV``    the torch device (default: this process's GPU under a launcher, else cuda when
                      present, else cpu);
- ``--batch-size N``  images per forward pass (results do not depend on it unless a help says so);
- ``--json``          print the result as JSON on stdout instead of a table;
- ``--no-progress``   no progress bars (off a terminal they already draw a line every 30 s at most);
- ``--overwrite``     redo work whose output already exists, instead of refusing or skipping it;
- ``--debug``         the full traceback of an error (``racedit/cli/common.py``).

Argument types refuse bad numbers when the command line is parsed.

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

from racedit.cli.common import EXIT_USAGE, add_debug_flag

DEVICE_HELP = (
    "torch device, e.g. cpu, cuda, cuda:1 (default: this process's GPU under torchrun / accelerate launch, "
    "else cuda when present, else cpu)"
)


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs with line breaks kept as written (examples), one-line ones wrapped; a
    flag's default appended to its help when it has one (not None or False) and the help does not already
    say it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one stderr line pointing at ``--help`` (exit 2), with
    :class:`HelpFormatter` unless told otherwise.

    Sub-commands made with ``add_subparsers`` are of this class too (argparse uses the parent's class).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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


# ------------------------------------------------------------------------------------------- common flags


def add_config(p: argparse.ArgumentParser | argparse._ArgumentGroup, required: bool, what: str) -> None:
    p.add_argument(
        "--config", required=required, default=None, metavar="FILE", help=f"run config YAML: {what}"
    )


def add_out(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    contents: str,
    default: str | None = None,
    required: bool = False,
) -> None:
    """``--out DIR``: the output folder; ``contents`` names the files written inside it."""
    extra = f" (default: {default})" if default is not None and "default" not in contents else ""
    p.add_argument(
        "--out",
        metavar="DIR",
        default=default,
        required=required,
        help=f"output folder, created if needed: {contents}{extra}",
    )


def add_seed(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str, default: int | None = 0
) -> None:
    p.add_argument("--seed", type=non_negative_int, default=default, metavar="N", help=f"seed of {what}")


def add_device(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default=None, metavar="DEV", help=DEVICE_HELP)


def add_json(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout instead of a table")


def add_no_progress(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (off a terminal they draw a line every 30 s at most)",
    )


def add_debug(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    add_debug_flag(p)  # type: ignore[arg-type]
