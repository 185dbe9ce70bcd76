"""``python -m fid``: the ``racedit-fid`` command (``racedit/cli/fid.py``)."""

from racedit.cli.fid import cli

if __name__ == "__main__":
    cli()
