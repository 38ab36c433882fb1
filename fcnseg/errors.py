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
