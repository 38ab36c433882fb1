"""Atomic file writes (a file is written under a temporary name in its folder and renamed into place), and the
YAML reader for the files and values a user writes."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import clipped

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


def current_umask() -> int:
    """The process's file-mode creation mask: read from /proc where Linux shows it, else set and restored (the
    only portable way to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: an existing file's own, else 0666 less the umask. mkstemp makes its
    file 0600 (private while it is written), and a rename keeps that mode, so it is set before the rename."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def staged_path(path: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary file beside ``path`` (``.NAME.*.tmp``) for the block to write; if the block succeeds it
    is synced to the disk (:func:`sync_file`), gets the mode a plain write gives (:func:`_final_mode`) and is
    renamed to ``path``, else it is removed.

    Creating it raises OSError before the block runs; ``path``'s folder must exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        sync_file(tmp)
        with contextlib.suppress(OSError):  # a file system without modes (some network or FUSE mounts)
            os.chmod(tmp, _final_mode(path))
        crash_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (:func:`staged_path`); on success close, sync and rename it to ``path``.

    A crash or an exception leaves ``path`` as it was (absent or the previous version), never half written. The
    file ends with the mode a plain write gives: the previous version's, or what the umask leaves of 0666.
    """
    with staged_path(path) as tmp, open(tmp, mode) as f:
        yield f


_NO_SYNC = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP}


def sync_file(path: str | os.PathLike) -> None:
    """Wait until ``path``'s data is on the disk. Before a rename into place: with delayed allocation, ext4 may
    commit the rename before the data (its documentation's ``auto_da_alloc`` covers only a rename over an existing
    file), and a power cut in between leaves the name on an empty or partly written file. Where the file cannot be
    synced (fsync(2) fails with EINVAL, ENOSYS or ENOTSUP) there is nothing to wait for; a failed write-back (EIO,
    ENOSPC) is raised. Opened for writing: Windows syncs no read-only descriptor."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_SYNC:
            raise
    finally:
        os.close(fd)


def lock_exclusive(f: IO, blocking: bool = True) -> bool:
    """An exclusive ``flock`` of the open file ``f``, released when it is closed; True where it is held or the OS
    has no ``flock``, False where it cannot be taken (held elsewhere, with ``blocking=False``)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def scratch_folder(workdir: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """``workdir`` when given (kept); else a new temporary folder, removed with all it holds on leaving. The
    execution paths export hundreds of megabytes there (a full FCN's ONNX file), which their built sessions no
    longer read once made: left behind, every prediction would leave a copy."""
    if workdir is not None:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as folder:
        yield Path(folder)


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


# ------------------------------------------------------------------------------------------------ YAML


@functools.cache
def _plain_loader() -> type:
    import yaml

    class PlainLoader(yaml.SafeLoader):
        """SafeLoader without aliases: an option file never needs ``*name``, and nested aliases ("billion laughs")
        make a few hundred bytes stand for gigabytes once anything walks the result."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} found; aliases are not accepted, write the value out",
                    event.start_mark,
                )  # fmt: skip
            return super().compose_node(parent, index)

    return PlainLoader


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` without aliases; every failure is a ``yaml.YAMLError``: a document nested too deeply
    (a RecursionError otherwise) and a value the safe constructors cannot build (a ValueError or OverflowError
    otherwise: an impossible date such as 2001-13-45, an integer of more digits than Python converts)."""
    import yaml

    try:
        return yaml.load(text, Loader=_plain_loader())  # a SafeLoader subclass: plain data only
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except (ValueError, OverflowError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise yaml.YAMLError(f"a value that cannot be read ({clipped(reason)})") from None


def cache_root() -> Path:
    """fcnseg's cache folder: ``$FCNSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/fcnseg``, else ``~/.cache/fcnseg``."""
    root = os.environ.get("FCNSEG_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcnseg"
    return Path(root).expanduser()
