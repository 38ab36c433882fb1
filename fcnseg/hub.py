"""Models from anywhere: an fcnseg checkpoint file, published weights by name, or another implementation's file.

:func:`load` is what ``fcnseg.load`` is: it reads a checkpoint (the file format is :mod:`fcnseg.checkpoint`'s),
or fetches published weights (the catalogue and the downloads are :mod:`fcnseg.models.weights`'s) and converts
them (:mod:`fcnseg.models.convert`), then rebuilds the model through the registry. This module sits above both
``checkpoint`` and ``models``; neither imports it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import check_fit, read_checkpoint
from .errors import CheckpointError, FcnsegError, shown
from .io import atomic_write
from .models import get_model
from .models.convert import caffe_signature, caffe_to_fcnseg, torchfcn_to_fcnseg
from .models.registry import saved_options
from .models.weights import (
    CONVERSION_VERSION,
    FCNWeights,
    PublishedWeights,
    cached_weights,
    get_weights,
    is_weights_name,
    released_input,
    sha256_pin,
    sha256_record,
    verify_hash,
)
from .preprocessing import Preprocessing

__all__ = ["import_file", "load", "model_from_checkpoint", "weights_checkpoint"]


def load(
    path: str | os.PathLike | Any,
    *,
    map_location: Any = "cpu",
    model: str | None = None,
    file: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> nn.Module:
    """Load a checkpoint, or published weights by name, into a ready-to-use model in eval mode.

    ``path``: an fcnseg checkpoint file, or a name from ``fcnseg weights`` (``"fcn8s-heavy-pascal"``), which is
    downloaded on first use into torch.hub's cache, hash-checked and converted; ``file`` gives a local copy of
    that published file instead. ``model``: the architecture the caller expects; another one is refused.
    ``sha256``: the SHA-256 the file read (the checkpoint, the published file or ``file``) must have.
    """
    if isinstance(path, FCNWeights):
        path = path.id
    if not Path(path).exists() and is_weights_name(str(path)):
        ckpt = weights_checkpoint(str(path), file=file, sha256=sha256)
    elif file is not None:
        raise FcnsegError(
            f"file={shown(str(file))} goes with published weights names only, not with {shown(str(path))}"
        )
    elif not Path(path).exists() and not Path(path).suffix:
        raise CheckpointError(f"{path}: no such checkpoint file, nor published weights of that name (fcnseg weights)")
    else:
        if sha256 is not None and Path(path).is_file():
            verify_hash(path, sha256=sha256_pin(sha256))
        ckpt = read_checkpoint(path, map_location=map_location)
    if model is not None and ckpt["model"] != model:
        raise CheckpointError(f"{path}: checkpoint holds model {shown(ckpt['model'])}, expected {shown(model)}")
    model = model_from_checkpoint(ckpt, source=str(path))
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


def model_from_checkpoint(ckpt: Mapping[str, Any], *, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint dict describes and load its weights."""
    try:
        # Built on the meta device (shapes only, no random initialisation of 134M weights), then the checkpoint's
        # tensors are assigned in place of the empty ones.
        with torch.device("meta"):
            model = get_model(ckpt["model"], **saved_options(ckpt["model"], ckpt["config"]))
    except FcnsegError as e:
        raise CheckpointError(f"{source}: {e}") from None
    check_fit(model, ckpt["state_dict"], source, ckpt["model"])
    model.load_state_dict(ckpt["state_dict"], assign=True)
    model.classes = list(ckpt.get("classes") or []) or None
    model.palette = [list(c) for c in ckpt["palette"]] if ckpt.get("palette") else None
    model.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    if ckpt.get("head_classes"):
        model.head_classes = {k: list(v) or None for k, v in ckpt["head_classes"].items()}
    model.eval()
    return model


# ----------------------------------------------------------------------------------- published and foreign files


def import_file(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    model: str | None = None,
    classes: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    head_classes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Read a torchfcn state dict or a Caffe ``.caffemodel`` and return an fcnseg checkpoint dict.

    ``format``: ``"torchfcn"``, ``"caffe"`` or ``"auto"`` (by extension: ``.caffemodel`` is Caffe). Without
    ``preprocessing``, a Caffe file records the input of the published net its layers identify (with its classes
    when none are given; :func:`~fcnseg.models.weights.released_input`); where they do not identify one,
    ``extra["assumed_input"]`` says which input was assumed.
    """
    path = Path(path)
    if not path.is_file():
        raise FcnsegError(f"{path}: no such file")
    if format == "auto":
        format = "caffe" if path.suffix.lower() == ".caffemodel" else "torchfcn"
    kwargs: dict[str, Any] = {"model": model, "classes": classes, "source": str(path)}
    if preprocessing is not None:
        kwargs["preprocessing"] = preprocessing
    if format == "caffe":
        return _import_caffe(path, kwargs, head_classes, identify=preprocessing is None)
    if format == "torchfcn":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FcnsegError(f"{path}: not a readable PyTorch file ({e.__class__.__name__})") from None
        if not isinstance(state, Mapping):
            raise FcnsegError(f"{path}: holds a {type(state).__name__}, expected a torchfcn state dict")
        return torchfcn_to_fcnseg(state, **kwargs)
    raise FcnsegError(f"--format {shown(format)}: expected torchfcn, caffe or auto")


def _import_caffe(
    path: Path, kwargs: dict[str, Any], head_classes: Mapping[str, Sequence[str]] | None, *, identify: bool
) -> dict[str, Any]:
    """A .caffemodel converted; with ``identify``, recording the input of the published net it is (or, with a
    note in ``extra["assumed_input"]``, the one assumed)."""
    from .models.caffe_proto import read_caffemodel  # only here: it needs protobuf

    _, layers = read_caffemodel(path)
    note = None
    if identify:
        detected, num_classes = caffe_signature(layers, str(path))
        entry, note = released_input(kwargs["model"] or detected, num_classes)
        if entry is not None:
            kwargs.update(preprocessing=entry.preprocessing, classes=kwargs["classes"] or entry.classes)
            head_classes = head_classes or entry.head_classes
    ckpt = caffe_to_fcnseg(layers, head_classes=head_classes, **kwargs)
    if note:
        ckpt["extra"]["assumed_input"] = note
    return ckpt


def _source_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _cached_conversion(converted: Path, source: Path) -> dict[str, Any] | None:
    """The cached fcnseg checkpoint of ``source`` if it is readable and was made from this very file."""
    if not converted.is_file():
        return None
    try:
        ckpt = read_checkpoint(converted)
    except CheckpointError:
        return None  # damaged or from another fcnseg: convert again
    return ckpt if ckpt["extra"].get("weights", {}).get("source") == _source_id(source) else None


def _convert(entry: PublishedWeights, source: Path) -> dict[str, Any]:
    ckpt = import_file(
        source,
        entry.format,
        classes=entry.classes,
        preprocessing=entry.preprocessing,
        model=entry.model,
        head_classes=entry.head_classes,
    )
    if ckpt["alignment"] != entry.alignment:
        raise FcnsegError(f"{source}: converts to {ckpt['alignment']} alignment, expected {entry.alignment}")
    ckpt["extra"]["weights"] = {
        "metrics": {k: dict(v) for k, v in entry.metrics.items()},
        "url": entry.url,
        "source": _source_id(source),
    }
    return ckpt


def weights_checkpoint(
    weights: str | FCNWeights | PublishedWeights,
    *,
    file: str | os.PathLike | None = None,
    progress: bool = True,
    sha256: str | None = None,
) -> dict[str, Any]:
    """The fcnseg checkpoint dict of published weights: from ``file`` if given, else from the cache, downloading
    on first use. The file is checked against the published hash (when the entry has one) and the pinned
    ``sha256`` wherever it comes from, and a cached file against the SHA-256 recorded at its first use
    (:func:`~fcnseg.models.weights.cached_weights`); the conversion of a cached file is cached beside it."""
    entry = weights if isinstance(weights, PublishedWeights) else get_weights(weights).value
    if file is not None:
        source = Path(file).expanduser()
        if not source.is_file():
            raise FcnsegError(f"--weights-file {source}: no such file")
        verify_hash(source, md5=entry.md5, sha256=entry.sha256)  # the published hashes, and the pin besides
        verify_hash(source, sha256=sha256_pin(sha256))
        return _convert(entry, source)
    source, fresh = cached_weights(entry, sha256=sha256, progress=progress)
    converted = source.with_name(f"{source.stem}.fcnseg-v{CONVERSION_VERSION}.pt")
    ckpt = _cached_conversion(converted, source)
    if ckpt is not None:
        return ckpt
    try:
        ckpt = _convert(entry, source)
    except FcnsegError as e:
        if fresh:  # an error page or a wrong file, with no hash to catch it: do not keep it
            source.unlink(missing_ok=True)
            sha256_record(source).unlink(missing_ok=True)
            raise FcnsegError(f"{e} (downloaded from {entry.url}; removed)") from None
        raise FcnsegError(f"{e} (the cached copy; delete {source} to download it again)") from None
    with contextlib.suppress(OSError), atomic_write(converted) as f:  # a read-only cache only costs time
        torch.save(ckpt, f)
    return ckpt
