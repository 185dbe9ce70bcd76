"""``python -m racedit.data``: the ``racedit-extract`` command (``racedit/cli/extract.py``)."""

from racedit.cli.extract import cli

if __name__ == "__main__":
    cli()
