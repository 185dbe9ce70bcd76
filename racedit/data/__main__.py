"""``python -m racedit.data`` is ``racedit-extract`` (extract / verify / stats)."""

import sys

from racedit.data.extract import main

if __name__ == "__main__":
    sys.exit(main())
