"""The one base class of every error a user can cause (a bad file, option, model or run).

The command line catches `QkatlasError` once and prints its message as one line (exit 2);
anything else is a bug and keeps its traceback."""


class QkatlasError(Exception):
    """A user-facing error: the message names the input and what to do."""
