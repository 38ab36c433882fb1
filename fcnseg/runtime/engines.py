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
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..io import cache_root, scratch_folder
from .cpu import cpu_features

ENGINE_BUDGET = 4 << 30
"""Bytes of built files kept (one full-size FCN-8s with its int8 files takes about 1.4 GB); the folders used least
recently go beyond it."""
IN_USE_S = 3600.0
"""A folder used this recently is never removed: another process may be building or reading there."""
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf")
"""The libraries whose versions shape the files: the exporter, the graph tools and the two quantisers."""
PACKAGE = Path(__file__).resolve().parent.parent


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


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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


def engine_key(model: nn.Module) -> str:
    """The name of ``model``'s folder: a hash of its architecture (class, build config, heads, input channels),
    its weights and buffers, fcnseg's code, the libraries' versions and the CPU's features."""
    doc = {
        "model": [type(model).__qualname__, model.build_config, model.heads, model.in_channels],
        "weights": tensors_digest(list(model.state_dict().items())),
        "code": code_fingerprint(),
        "libraries": library_versions(),
        "cpu": sorted(cpu_features()),
    }
    name = (model.build_config or {}).get("name", "model")
    return f"{name}-{hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]}"


@contextlib.contextmanager
def build_folder(model: nn.Module, workdir: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """Where a path's files are built: ``workdir`` when given; else ``model``'s folder in the engine cache
    (:func:`engine_key`; made, marked as used, the cache pruned to :data:`ENGINE_BUDGET`); else, with the cache
    off or not writable, a temporary folder removed on leaving."""
    folder = _cache_folder(model) if workdir is None and engine_cache_enabled() else None
    if folder is None:
        with scratch_folder(workdir, prefix) as scratch:
            yield scratch
        return
    yield folder


def _cache_folder(model: nn.Module) -> Path | None:
    folder = engine_cache_dir() / engine_key(model)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # used now: pruning goes by this time
    except OSError:
        return None
    prune_engines(folder.parent, keep=folder)
    return folder


def _size(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile by the process that staged it
            total += f.stat().st_size if f.is_file() else 0
    return total


def prune_engines(root: Path, keep: Path, budget: int = ENGINE_BUDGET, now: float | None = None) -> list[Path]:
    """Remove the folders in ``root`` used least recently beyond the newest ones that fit in ``budget`` bytes;
    ``keep`` and any folder used within :data:`IN_USE_S` seconds stay. Returns those removed."""
    now = time.time() if now is None else now
    entries = []
    for folder in root.iterdir():
        with contextlib.suppress(OSError):
            if folder.is_dir():
                entries.append((folder.stat().st_mtime, folder))
    entries.sort(reverse=True)
    total, removed = 0, []
    for used, folder in entries:
        total += _size(folder)
        if total > budget and folder != keep and now - used > IN_USE_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
