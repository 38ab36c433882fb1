"""Atomic file writes: a file is written under a temporary name in its folder and renamed into place."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

# Test hook: FCNSEG_TEST_CRASH_AT=NAME[@N] makes the process kill itself (SIGKILL, as kill -9 would) the Nth time
# (default 1st) it reaches the point NAME, so that the crash-safety tests can stop a real run inside a chosen
# window (e.g. ``write:best.pt``: best.pt's temporary file is complete but not yet renamed into place).
_CRASH_ENV = "FCNSEG_TEST_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here with SIGKILL if the test hook names this point (see ``FCNSEG_TEST_CRASH_AT``); else nothing."""
    wanted = os.environ.get(_CRASH_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it to ``path``.

    A crash or an exception leaves ``path`` as it was (absent or the previous version), never half written.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that writes of ``names`` in ``folder`` left when a process was killed mid-write
    (``.NAME.*.tmp``, as :func:`atomic_write` names them); returns what was removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed
