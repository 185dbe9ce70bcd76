"""The error a checkpoint reader raises: a leaf module, so every format reader can share it."""

from racedit.errors import UserError


class CheckpointError(UserError, ValueError):
    """A file is not a checkpoint we can load; the message (one line) says what was expected. A
    ``UserError``, so commands show it as one line with exit code 2; a ``ValueError`` for library callers."""
