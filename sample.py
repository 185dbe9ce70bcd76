"""Sample from a (Race-)DiT checkpoint: a labelled grid, or a 50k-sample .npz for FID.

Thin wrapper over ``racedit.cli.sample`` (also installed as ``racedit-sample``); see ``--help``.
"""

from racedit.cli.sample import cli

if __name__ == "__main__":
    cli()
