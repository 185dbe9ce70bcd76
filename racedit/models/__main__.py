"""``python -m racedit.models`` / ``racedit-models``: print the model zoo."""

from __future__ import annotations

import argparse
import json
import sys

from racedit.models.zoo import format_markdown, zoo_table

CONVENTION = (
    "Parameters of the transformer blocks (attention, MLP or MoE experts, routers, adaLN; the Race-DiT paper's "
    "convention; training-only PLR target heads excluded), total and activated per token; full model = every "
    "parameter. GFLOPs: one forward of one sample, one multiply-add = one FLOP (the DiT paper's convention), "
    "activated experts only."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="racedit-models",
        description="Print every registered model: architecture, parameter counts and GFLOPs. " + CONVENTION,
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    parser.add_argument(
        "--filter", default=None, metavar="REGEX", help="only models whose name matches REGEX"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=32,
        help="latent side for GFLOPs (32 = 256x256 images through SD-VAE)",
    )
    parser.add_argument(
        "--no-connections", action="store_true", help="omit the hyper/frac-connection variants from the table"
    )
    args = parser.parse_args(argv)
    rows = zoo_table(args.filter, args.input_size, connections=not args.no_connections)
    if not rows:
        print(f"no registered model matches {args.filter!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_markdown(rows))
        print(f"\n{CONVENTION} Input: {args.input_size}x{args.input_size} latents.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
