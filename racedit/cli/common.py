"""What every racedit command shares: user errors, ``--debug``, exit codes, messages and progress bars.

A user error (a bad flag, a missing or corrupt file, an invalid config key) is one line on stderr that
names the file or key and the fix, with exit code 2: raise :class:`UserError` or call :func:`fail`; the
traceback appears only under ``--debug`` or ``RACEDIT_DEBUG=1``. Anything else is a bug and keeps its
traceback (exit 1). Messages about the work go to stderr as ``prog: message`` (:func:`say`, safe beside a
progress bar); results (tables, JSON, the paths written) go to stdout. Rank and world size come from
``racedit.distributed.process_state``; the common flags are defined once in ``racedit/cli/args.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from racedit.config.core import ConfigError
from racedit.distributed import exit_command
from racedit.errors import UserError
from racedit.progress import progress, say

__all__ = ["UserError", "add_debug_flag", "entry", "fail", "progress", "run", "say"]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2  # argparse's code for usage errors; ours for every user error


def fail(message: str) -> NoReturn:
    """Stop the command with a user error: ``prog: error: message`` on stderr, exit code 2."""
    raise UserError(message)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("RACEDIT_DEBUG", "") not in ("", "0")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also RACEDIT_DEBUG=1); by default a user error is one line",
    )


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types reported as one line: ours, config errors, and file-system errors naming a path."""
    return (UserError, ConfigError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


def run(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and turn user errors into one stderr line and exit code 2."""
    debug = debug_requested(argv)
    try:
        return int(main(argv) or 0)
    except user_error_types() as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (
        BrokenPipeError
    ):  # the reader of stdout left (`racedit-models | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def entry(main: Callable[[list[str] | None], int], prog: str) -> Callable[[], None]:
    """A console-script entry point: run ``main`` through :func:`run` and leave through ``exit_command``."""

    def _entry() -> None:
        exit_command(run(main, prog))

    return _entry
