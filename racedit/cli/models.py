"""``racedit-models`` / ``python -m racedit.models``: print the model zoo (``racedit/models/zoo.py``)."""

from __future__ import annotations

import argparse
import json

from racedit.cli.args import Parser, add_debug, add_json, positive_int
from racedit.cli.common import entry, fail, run
from racedit.models.zoo import format_markdown, zoo_table

PROG = "racedit-models"
CONVENTION = (
    "Parameters of the transformer blocks (attention, MLP or MoE experts, routers, adaLN; the Race-DiT paper's "
    "convention; training-only PLR target heads excluded), total and activated per token; full model = every "
    "parameter. GFLOPs: one forward of one sample, one multiply-add = one FLOP (the DiT paper's convention), "
    "activated experts only."
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Print every registered model: architecture, parameter counts and GFLOPs. " + CONVENTION,
    )
    add_json(p, "a list of objects, one per model,")
    p.add_argument("--filter", default=None, metavar="REGEX", help="only models whose name matches REGEX")
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="latent side for GFLOPs (32 = 256x256 images through SD-VAE)",
    )
    p.add_argument(
        "--no-connections", action="store_true", help="omit the hyper/frac-connection variants from the table"
    )
    add_debug(p)
    return p


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = zoo_table(args.filter, args.input_size, connections=not args.no_connections)
    if not rows:
        fail(f"--filter {args.filter!r} matches no registered model; run {PROG} without it to list them all")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_markdown(rows))
        print(f"\n{CONVENTION} Input: {args.input_size}x{args.input_size} latents.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: user errors are one stderr line and exit code 2 (``--debug``: the traceback)."""
    return run(_main, PROG, argv)


cli = entry(_main, PROG)  # the console script racedit-models

if __name__ == "__main__":
    cli()
