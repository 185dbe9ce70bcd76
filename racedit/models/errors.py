"""The error a checkpoint reader raises: a leaf module, so every format reader can share it."""


class CheckpointError(ValueError):
    """A file is not a checkpoint we can load; the message says what was expected."""
