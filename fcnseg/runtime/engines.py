"""The files the ONNX Runtime and OpenVINO paths build, kept between processes.

Building ``openvino-int8`` for the full-size FCN-8s takes most of a minute on two cores: the ONNX export (about 20 s)
and NNCF's calibration (about 20 s) dwarf the compilation, which OpenVINO caches itself. Each model's files go to a
folder of its own in fcnseg's cache folder, named by a hash of everything they are made from: the architecture,
every byte of the weights, fcnseg's source code, the versions of the libraries that write them and the CPU features
the int8 recipe follows. A later process with the same model reuses them; a file that depends on calibration images
is named by a hash of those images too. ``FCNSEG_ENGINE_CACHE=0`` turns this off (a temporary folder per build).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..io import cache_root, lock_exclusive, scratch_folder
from .cpu import cpu_features

ENGINE_BUDGET = 4 << 30
"""Bytes of built files kept (one full-size FCN-8s with its int8 files takes about 1.4 GB); the folders used least
recently go beyond it."""
IN_USE_S = 3600.0
"""A folder used this recently is never removed."""
CALIBRATION_SETS = 4
"""Sets of int8 files kept per model, each made from other calibration images (by default the first images each run
predicts): the most recently used."""
LIBRARIES = ("torch", "torchvision", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "openvino", "nncf")
"""The modules whose versions shape the files: the exporter and the backbones, the graph tools, the two quantisers."""
PACKAGE = Path(__file__).resolve().parent.parent
VERSIONED = {"fcnseg", *LIBRARIES}
"""Modules whose code the key covers already: by the hash of fcnseg's sources, or by a library's version."""


def engine_cache_dir() -> Path:
    """``engines`` in fcnseg's cache folder (:func:`~fcnseg.io.cache_root`)."""
    return cache_root() / "engines"


def engine_cache_enabled() -> bool:
    return os.environ.get("FCNSEG_ENGINE_CACHE", "1") != "0"


@functools.cache
def code_fingerprint(root: Path = PACKAGE) -> str:
    """A hash of every Python source file under ``root`` (fcnseg's own, by default), names and contents: files
    built by other code are not reused."""
    h = hashlib.sha256()
    for source in sorted(root.rglob("*.py")):
        h.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def library_versions() -> dict[str, list[str]]:
    """Each of :data:`LIBRARIES`: the version of the distribution of that name, else of those installed that provide
    it under another name (onnxruntime-gpu provides onnxruntime; finding them reads every distribution's files)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = [importlib.metadata.version(name)]
        except importlib.metadata.PackageNotFoundError:
            provided = set(_providers().get(name, []))
            versions[name] = sorted(f"{d} {importlib.metadata.version(d)}" for d in provided)
    return versions


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def model_code(model: nn.Module) -> dict[str, str] | None:
    """A hash of the source file of each class in ``model`` from outside fcnseg and its libraries (a model or
    backbone of the user's own); None where one has no source file to read (defined in a notebook, say)."""
    files = {}
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.split(".")[0] in VERSIONED:
            continue
        try:
            source = Path(inspect.getfile(cls))
            files[f"{cls.__module__}.{cls.__qualname__}"] = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        except (TypeError, OSError):
            return None
    return files


def tensors_digest(tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """A hash of every byte of ``tensors``, with their names, dtypes and shapes."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\0".encode())
        flat = t.detach().cpu().reshape(-1)
        if flat.numel() and flat.stride(0) != 1:  # a single value may keep any stride, and a byte view needs 1
            flat = flat.clone(memory_format=torch.contiguous_format)
        h.update(flat.view(torch.uint8).numpy())  # read in place, not copied
    return h.hexdigest()


def calibration_tag(calibration: Sequence[torch.Tensor]) -> str:
    """A short hash of the calibration images, part of the name of each file made from them."""
    return "cal-" + tensors_digest([(str(i), x.float()) for i, x in enumerate(calibration)])[:12]


def engine_key(model: nn.Module) -> str | None:
    """The name of ``model``'s folder: a hash of its architecture (class, build config, heads, input channels),
    its weights and buffers, fcnseg's code and that of the model's own classes (:func:`model_code`), the
    libraries' versions and the CPU's features. None where the model's code cannot be read."""
    if (own_code := model_code(model)) is None:
        return None
    cls = type(model)
    doc = {
        "model": [f"{cls.__module__}.{cls.__qualname__}", model.build_config, model.heads, model.in_channels],
        "weights": tensors_digest(list(model.state_dict().items())),
        "code": [code_fingerprint(), own_code],
        "libraries": library_versions(),
        "cpu": sorted(cpu_features()),
    }
    name = (model.build_config or {}).get("name", "model")
    return f"{name}-{hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]}"


@contextlib.contextmanager
def build_folder(model: nn.Module, workdir: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """Where a path's files are built: ``workdir`` when given; else ``model``'s folder in the engine cache
    (:func:`engine_key`), held for the build (another process building the same model waits, then reuses what
    this one made), and the cache pruned after it (:func:`prune_engines`); else, with the cache off or not
    writable, or a model whose code cannot be hashed, a temporary folder removed on leaving."""
    key = engine_key(model) if workdir is None and engine_cache_enabled() else None
    with _held(engine_cache_dir() / key) if key else contextlib.nullcontext() as folder:
        if folder is None:
            with scratch_folder(workdir, prefix) as scratch:
                yield scratch
            return
        yield folder
    with contextlib.suppress(OSError):  # another process pruning at the same time
        prune_engines(folder.parent, keep=folder)


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[Path | None]:
    """``folder``, made and marked as used, under an exclusive lock of its ``.lock`` file (where the OS has
    ``flock``), with what killed builds left there removed and only the newest :data:`CALIBRATION_SETS` sets of
    calibration files kept; None where it cannot be written."""
    for _ in range(3):  # the folder may be pruned between opening its lock and holding it: then open it anew
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / ".lock", "a")  # noqa: SIM115 (held across the yield; closed below)
        except OSError:
            yield None
            return
        with lock:
            if lock_exclusive(lock) and os.path.samestat(os.fstat(lock.fileno()), _stat(folder / ".lock")):
                os.utime(folder)  # used now: pruning goes by this time
                _tidy(folder)
                yield folder
                return
    yield None


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def reused(path: Path) -> bool:
    """Whether ``path`` is there to reuse, marked as used now where it is (calibration files are pruned by that
    time). An empty file is removed and counts as absent: what a power cut can leave of a file renamed into place
    before its data reached the disk."""
    try:
        if path.stat().st_size == 0:
            path.unlink()
            return False
        os.utime(path)
    except OSError:
        return False
    return True


def _tidy(folder: Path) -> None:
    """Under the folder's lock: no other build runs there, so its staged files (``.NAME.*.tmp``) and temporary
    folders are what killed builds left; and only the newest :data:`CALIBRATION_SETS` calibration sets stay."""
    for left in [*folder.glob(".*.tmp"), *folder.glob("tmp*")]:
        shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)
    sets: dict[str, list[Path]] = {}
    for f in folder.glob("*.cal-*"):
        sets.setdefault(f.name.split(".cal-")[1][:12], []).append(f)
    by_use = sorted(sets.values(), key=lambda files: max(f.stat().st_mtime for f in files))
    for files in by_use[: max(0, len(by_use) - CALIBRATION_SETS)]:
        for f in files:
            f.unlink(missing_ok=True)


def _size(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):  # the folder removed meanwhile
        for f in folder.rglob("*"):
            total += st.st_size if (st := _stat(f)) is not None and f.is_file() else 0
    return total


def prune_engines(root: Path, keep: Path, budget: int = ENGINE_BUDGET, now: float | None = None) -> list[Path]:
    """Remove the folders in ``root`` used least recently beyond the newest ones that fit in ``budget`` bytes;
    ``keep``, any folder used within :data:`IN_USE_S` seconds and any folder a build holds stay. Returns those
    removed."""
    now = time.time() if now is None else now
    entries = [(st.st_mtime, f) for f in root.iterdir() if (st := _stat(f)) is not None and f.is_dir()]
    total, removed = 0, []
    for used, folder in sorted(entries, reverse=True):
        total += _size(folder)
        if total > budget and folder != keep and now - used > IN_USE_S and _remove_unheld(folder, now):
            removed.append(folder)
    return removed


def _remove_unheld(folder: Path, now: float) -> bool:
    """Remove ``folder`` unless a build holds its lock or it was used since it was listed; True where removed."""
    st = _stat(folder)  # before the lock is opened: opening it must not count as a use
    try:
        lock = open(folder / ".lock", "rb")  # noqa: SIM115
    except FileNotFoundError:
        lock = None  # never held by a build
    except OSError:
        return False
    with lock if lock is not None else contextlib.nullcontext():
        held = lock is not None and not lock_exclusive(lock, blocking=False)
        if held or st is None or now - st.st_mtime <= IN_USE_S:
            return False
        shutil.rmtree(folder, ignore_errors=True)  # a process waiting on this lock finds it gone and starts anew
    return True
