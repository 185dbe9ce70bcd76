"""Sample from a (Race-)DiT checkpoint: a labelled grid, or a 50k-sample .npz for FID.

Thin wrapper over ``racedit.cli.sample`` (also installed as ``racedit-sample``); see ``--help``.
"""

import sys

from racedit.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
