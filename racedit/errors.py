"""The error type every layer may raise for a problem the user can fix (a leaf module: no imports).

Commands (``racedit/cli/common.py``) print it as one stderr line with exit code 2; library callers
catch it like any exception. The message names the file or key and says what to do.
"""


class UserError(Exception):
    """A problem the user can fix. The message names the file or key and says what to do."""
