"""The one exception type for a user's mistake.

Anything raised as :class:`FcnsegError` is the user's to fix (a missing file, a wrong argument): the CLI prints
its message as one line and exits with status 2. Any other exception is a bug in fcnseg and keeps its traceback.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any


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


SHOWN_CHARS = 80
"""At most this many characters of a user's value are quoted in an error message (then its length is said)."""


_LOCATION = re.compile(r"Exception from \S+:\d+:?")  # OpenVINO's first lines: where in its sources it raised


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message that says what went wrong (a library's may run to pages, and
    OpenVINO's begin with lines that only say where it raised), else its type's name."""
    lines = (line.strip() for line in str(error).splitlines())
    return next((line for line in lines if line and not _LOCATION.fullmatch(line)), type(error).__name__)


def clipped(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as it is, or its first ``limit`` characters followed by ``... (N chars)``."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut short: a long string keeps its first ``limit`` characters and says
    how long it was; a container shows its first few items and levels, never its whole expansion (a YAML alias
    bomb's nested lists would repr to hundreds of megabytes)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = short.maxdeque = 6
    try:
        text = short.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= 2 * limit else f"{text[: 2 * limit]}... (cut)"
