"""``python -m racedit.data`` is ``racedit-extract`` (extract / verify / stats)."""

from racedit.data.extract import main

if __name__ == "__main__":
    from racedit.distributed import exit_command

    exit_command(main())
