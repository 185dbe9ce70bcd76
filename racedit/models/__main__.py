"""``python -m racedit.models``: the ``racedit-models`` command (``racedit/cli/models.py``)."""

from racedit.cli.models import cli

if __name__ == "__main__":
    cli()
