"""``python -m racedit.data`` is ``racedit-extract`` (extract / verify / stats)."""

from racedit.data.extract import cli

if __name__ == "__main__":
    cli()
