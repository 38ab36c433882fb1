"""The one exception type for a user's mistake.

Anything raised as :class:`FcnsegError` is the user's to fix (a missing file, a wrong argument): the CLI prints
its message as one line and exits with status 2. Any other exception is a bug in fcnseg and keeps its traceback.
"""

from __future__ import annotations


class FcnsegError(Exception):
    """A user's mistake; the message names the file or argument and says what was expected."""


class CheckpointError(FcnsegError):
    """A checkpoint that cannot be read or does not fit the model it describes."""


class ImageError(FcnsegError):
    """An image file that cannot be read or decoded."""


def user_message(error: FcnsegError) -> str:
    """The message of ``error`` as the user should read it: one line.

    An FcnsegError raised in a DataLoader worker reaches the main process re-raised by torch, its message replaced
    by "Caught FcnsegError in DataLoader worker process N" and the worker's whole traceback; the user's message is
    the traceback's last line, after the exception's name."""
    text = str(error)
    if not text.startswith("Caught ") or "DataLoader worker process" not in text.split("\n", 1)[0]:
        return text
    for line in reversed(text.splitlines()):
        name, sep, message = line.partition(": ")
        if sep and name.rsplit(".", 1)[-1].endswith("Error") and " " not in name:
            return message
    return text.split("\n", 1)[0]
