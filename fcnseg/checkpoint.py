"""Checkpoints that carry everything ``predict`` needs: architecture, classes, colours, preprocessing, alignment.

A checkpoint is a ``torch.save`` dict of plain types and tensors only, so it loads with ``weights_only=True`` (no
pickled code runs). ``schema_version`` grows whenever the layout changes; a newer file is refused with a message
instead of being misread.

This module is the file format only: the dict (:func:`checkpoint_dict`), writing (:func:`save_checkpoint`), reading
(:func:`read_checkpoint`) and the schema. It knows nothing of the models; rebuilding a model from a checkpoint
(``fcnseg.load``) is :mod:`fcnseg.hub`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError, FcnsegError, first_line, shown
from .io import atomic_write
from .palette import palette_for
from .preprocessing import Preprocessing

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "check_fit", "checkpoint_dict", "read_checkpoint", "save_checkpoint",
    "upgrade_state_dict",
]  # fmt: skip

SCHEMA_VERSION = 2  # 2: every head's layers under score_heads.<name>. (1: first head at the top level)
FORMAT = "fcnseg-checkpoint"


def _default_palette(classes: Sequence[str] | None, n: int) -> list[list[int]]:
    return [[int(c) for c in rgb] for rgb in palette_for(classes, n)[:n]]


def checkpoint_dict(
    model: nn.Module,
    *,
    classes: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    preprocessing: Preprocessing | None = None,
    extra: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The checkpoint of ``model`` as a dict (what :func:`save_checkpoint` writes).

    ``state_dict`` replaces the model's own tensors (importers describe a model built on the meta device and
    supply the converted weights); it must have exactly the model's keys and shapes.
    """
    config = model.build_config
    if config is None:
        raise FcnsegError("model was not built through the fcnseg registry: no build_config to save")
    n = model.num_classes
    classes = list(classes if classes is not None else (model.classes or []))
    if classes and len(classes) != n:
        raise FcnsegError(f"classes: {len(classes)} names given for a model of {n} classes")
    palette = palette if palette is not None else model.palette
    if palette is None:
        palette = _default_palette(classes or None, n)
    if len(palette) != n or any(len(c) != 3 for c in palette):
        raise FcnsegError(f"palette: expected {n} colours of 3 values each")
    preprocessing = preprocessing or model.preprocessing
    kwargs = dict(config["kwargs"])
    kwargs.pop("backbone_weights", None)  # the weights are in the state dict; never download again
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "fcnseg_version": __version__,
        "model": config["name"],
        "config": kwargs,
        "alignment": model.alignment,
        "num_classes": n,
        "classes": classes,
        "palette": [[int(v) for v in c] for c in palette],
        "preprocessing": preprocessing.to_dict(),
        # Two-headed models: every head's class names (the first head's are ``classes``).
        "head_classes": {k: list(v or []) for k, v in (model.head_classes or {}).items()},
        "state_dict": _tensors(model, state_dict),
        "extra": dict(extra or {}),
    }


def describe(model: nn.Module) -> dict[str, Any]:
    """What a deployment needs besides the graph: the JSON stored in exported files."""
    ckpt = checkpoint_dict(model) if model.build_config else {}
    keys = (
        "model",
        "config",
        "alignment",
        "num_classes",
        "classes",
        "head_classes",
        "palette",
        "preprocessing",
        "fcnseg_version",
    )
    return {k: ckpt[k] for k in keys if k in ckpt}


def _tensors(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if state_dict is None:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_fit(model, state_dict, "state_dict", model.build_config["name"])
    return {k: state_dict[k].detach().cpu() for k in model.state_dict()}


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    preprocessing: Preprocessing | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file, fsync, rename); returns the path.

    ``classes`` and ``palette`` default to the model's own (``model.classes``, ``model.palette``), else no names
    and the VOC palette for 21 classes or a generated one; ``preprocessing`` defaults to the model's.
    """
    ckpt = checkpoint_dict(model, classes=classes, palette=palette, preprocessing=preprocessing, extra=extra)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save(ckpt, f)
    except OSError as e:
        raise FcnsegError(f"{path}: cannot write checkpoint ({e.strerror or e})") from None
    return path


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint file; every problem is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path}: {_why_unreadable(path, e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an fcnseg checkpoint (a bare state dict? import other formats with 'fcnseg convert')"
        )
    version = ckpt.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint schema version {version} is newer than this fcnseg reads "
            f"({SCHEMA_VERSION}); upgrade fcnseg"
        )
    missing = [k for k in ("model", "config", "state_dict", "preprocessing") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if version < 2:  # read as today's layout: every consumer (load, --init-from, --resume) sees schema 2 keys
        heads = list(ckpt.get("head_classes") or {}) or ["out"]
        ckpt["state_dict"] = upgrade_state_dict(ckpt["state_dict"], heads)
        ckpt["schema_version"] = SCHEMA_VERSION
    return ckpt


# What a file's first bytes say it is, for files that are not checkpoints at all.
_SIGNATURES = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x89HDF": "an HDF5 file (Keras?)",
}


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why torch could not read ``path``, in words: unreadable, empty, no CUDA device, not a checkpoint at all
    (neither torch's zip archive nor a pickle), truncated, or objects a weights-only read refuses; else torch's own
    first line, whole."""
    import zipfile

    first = first_line(error)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot read the file ({e.strerror or e})"
    if not head:
        return "empty file (0 bytes): an interrupted copy or download? copy it again"
    if "CUDA" in str(error) and not torch.cuda.is_available():
        return "saved on a CUDA device, and this machine has none; read it with map_location='cpu' (--device cpu)"
    if not head.startswith(b"PK\x03\x04") and not head.startswith(b"\x80"):  # torch's zip archive; legacy pickle
        what = next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)
        if what is None:
            what = "a text file" if _is_text(path) else "another kind of file"
        return f"not a checkpoint: {what} (a checkpoint is a zip archive written by torch.save)"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"truncated: the zip archive ends before its directory ({path.stat().st_size} bytes); copy it again"
    if "weights_only" in str(error) or "Unsupported global" in str(error):
        return "holds Python objects beyond tensors, which fcnseg does not unpickle (not an fcnseg checkpoint)"
    return f"not a readable checkpoint (corrupt file): {first}"


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        sample = f.read(4096)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in sample


def upgrade_state_dict(state: Mapping[str, torch.Tensor], heads: Sequence[str] = ("out",)) -> dict[str, torch.Tensor]:
    """A schema 1 state dict with schema 2 keys (a pure filter, like timm's ``checkpoint_filter_fn``).

    ``heads``: the model's head names in order. Schema 1 kept the first head's layers at the top level
    (``score_fr.weight`` -> ``score_heads.<first>.score_fr.weight``) and further heads under ``extra_heads.<name>.``
    (-> ``score_heads.<name>.``); backbone keys stay; a late-fusion net's streams (``streams.<s>.``) are mapped
    each the same way. Keys already in the new layout are kept."""
    return {_upgrade_key(key, heads[0]): value for key, value in state.items()}


def _upgrade_key(key: str, first: str) -> str:
    if key.startswith("streams."):
        _, stream, rest = key.split(".", 2)
        return f"streams.{stream}.{_upgrade_key(rest, first)}"
    if key.startswith(("backbone.", "score_heads.")):
        return key
    if key.startswith("extra_heads."):
        return "score_heads." + key.removeprefix("extra_heads.")
    return f"score_heads.{first}.{key}"


def check_fit(model: nn.Module, state: Mapping[str, Any], source: str, name: str) -> None:
    """Raise a :class:`CheckpointError` naming ``source`` unless ``state`` has exactly the keys and shapes of
    ``model``'s state dict (model ``name``)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        if shapes:
            parts.append(f"{len(shapes)} of another shape, e.g. {shapes[0]}")
        raise CheckpointError(
            f"{source}: weights do not fit model {shown(name)} (another architecture?): {'; '.join(parts)}"
        )
