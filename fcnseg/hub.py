"""Models from anywhere: an fcnseg checkpoint file, published weights by name, a Hugging Face Hub repository, or
another implementation's file.

:func:`load` is what ``fcnseg.load`` is: it reads a checkpoint (the file format is :mod:`fcnseg.checkpoint`'s),
fetches published weights (the catalogue and the downloads are :mod:`fcnseg.models.weights`'s) and converts them
(:mod:`fcnseg.models.convert`), or reads a Hub repository ``hf:USER/NAME[@REVISION]`` or a folder saved by
``save_pretrained`` (the format is :mod:`fcnseg.pretrained`'s), then rebuilds the model through the registry. This
module sits above ``checkpoint``, ``pretrained`` and ``models``; none of them imports it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
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
from .pretrained import CONFIG_NAME, WEIGHTS_NAME, hub_error, optional, pretrained_checkpoint, read_config, read_weights

__all__ = [
    "HF_PREFIX", "checkpoint_of", "from_pretrained", "hub_checkpoint", "import_file", "is_hf_source", "load",
    "model_from_checkpoint", "pinned_hub_source", "weights_checkpoint",
]  # fmt: skip

HF_PREFIX = "hf:"


def load(
    path: str | os.PathLike | Any,
    *,
    map_location: Any = "cpu",
    model: str | None = None,
    file: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> nn.Module:
    """Load a checkpoint, published weights by name, or a Hugging Face Hub model into a ready-to-use model in eval
    mode.

    ``path``: an fcnseg checkpoint file, or a name from ``fcnseg weights`` (``"fcn8s-heavy-pascal"``), which is
    downloaded on first use into torch.hub's cache, hash-checked and converted (``file`` gives a local copy of
    that published file instead), or ``hf:USER/NAME[@REVISION]`` (:func:`from_pretrained`), or a folder written
    by ``save_pretrained``. ``model``: the architecture the caller expects; another one is refused.
    ``sha256``: the SHA-256 the file read (the checkpoint, the published file or ``file``, a Hub model's
    ``model.safetensors``) must have.
    """
    if isinstance(path, FCNWeights):
        path = path.id
    ckpt = checkpoint_of(path, map_location=map_location, file=file, sha256=sha256)
    if model is not None and ckpt["model"] != model:
        raise CheckpointError(f"{path}: checkpoint holds model {shown(ckpt['model'])}, expected {shown(model)}")
    built = model_from_checkpoint(ckpt, source=str(path))
    return _placed(built, map_location)


def _placed(model: nn.Module, map_location: Any) -> nn.Module:
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


def checkpoint_of(
    source: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    file: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of any model source :func:`load` takes: ``hf:USER/NAME[@REVISION]``, a folder saved by
    ``save_pretrained``, a published weights name or a checkpoint file (options as :func:`load`'s)."""
    text = str(source)
    if is_hf_source(text) or _is_pretrained_folder(text):
        if file is not None:
            raise FcnsegError(f"file={shown(str(file))} goes with published weights names only, not with {shown(text)}")
        return hub_checkpoint(text, sha256=sha256)
    if not Path(source).exists() and is_weights_name(text):
        return weights_checkpoint(text, file=file, sha256=sha256)
    if file is not None:
        raise FcnsegError(f"file={shown(str(file))} goes with published weights names only, not with {shown(text)}")
    if not Path(source).exists() and not Path(source).suffix:
        raise CheckpointError(f"{source}: no such checkpoint file, nor published weights of that name (fcnseg weights)")
    if sha256 is not None and Path(source).is_file():
        verify_hash(source, sha256=sha256_pin(sha256))
    return read_checkpoint(source, map_location=map_location)


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


# ----------------------------------------------------------------------------------- the Hugging Face Hub


def is_hf_source(source: Any) -> bool:
    """Whether ``source`` names a Hub repository: ``hf:USER/NAME`` or ``hf:USER/NAME@REVISION``."""
    return isinstance(source, (str, os.PathLike)) and str(source).startswith(HF_PREFIX)


def _is_pretrained_folder(source: str) -> bool:
    return Path(source).is_dir() and (Path(source) / CONFIG_NAME).is_file()


def _repo_and_revision(source: str, revision: str | None) -> tuple[str, str | None]:
    """``USER/NAME`` and its revision from ``[hf:]USER/NAME[@REVISION]`` (a repository id has no ``@``)."""
    repo, sep, pinned = source.removeprefix(HF_PREFIX).partition("@")
    if sep and not pinned:
        raise FcnsegError(f"{shown(source)}: expected a revision after '@' (a branch, tag or commit)")
    if pinned and revision is not None and pinned != revision:
        raise FcnsegError(f"{shown(source)}: names revision {shown(pinned)}, and revision={shown(revision)} another")
    return repo, pinned or revision


def _hub_file(repo: str, filename: str, revision: str | None, label: str) -> Path:
    """``filename`` of Hub repository ``repo``: from huggingface_hub's cache, downloaded there if need be. With
    ``HF_HUB_OFFLINE=1`` huggingface_hub answers from its cache alone (Hub Python Library docs, "Understand
    caching" and "Environment variables")."""
    hf = optional("huggingface_hub", f"{label}")
    try:
        return Path(hf.hf_hub_download(repo, filename, revision=revision, library_name="fcnseg",
                                       library_version=__version__))  # fmt: skip
    except Exception as e:
        mapped = hub_error(e, label, filename)
        if mapped is None:
            raise
        raise mapped from None


def hub_checkpoint(
    source: str | os.PathLike, revision: str | None = None, *, sha256: str | None = None
) -> dict[str, Any]:
    """The checkpoint dict of a Hub repository (``[hf:]USER/NAME[@REVISION]``) or of a folder saved by
    ``save_pretrained``: its ``config.json`` read and checked first (nothing more is downloaded for a config this
    fcnseg cannot read), then its ``model.safetensors`` (checked against ``sha256`` when given)."""
    text = str(source)
    if not is_hf_source(text) and Path(text).is_dir():
        label, folder = text, Path(text)
        if revision is not None:
            raise FcnsegError(f"{label}: a folder has no revisions; revision= goes with Hub repositories")
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"{label}: no {CONFIG_NAME} (expected a folder written by save_pretrained)")
        config, weights_path, commit = read_config(folder / CONFIG_NAME, label), folder / WEIGHTS_NAME, None
    else:
        if not is_hf_source(text) and Path(text).exists():
            raise FcnsegError(f"{text}: expected a folder written by save_pretrained, or a Hub repository USER/NAME")
        repo, revision = _repo_and_revision(text, revision)
        label = f"{HF_PREFIX}{repo}" + (f"@{revision}" if revision else "")
        config_path = _hub_file(repo, CONFIG_NAME, revision, label)
        config = read_config(config_path, label)
        # huggingface_hub keeps each file under snapshots/<commit>/: the weights are fetched at the commit the
        # config came from, so that a push between the two downloads cannot pair one commit's config with
        # another's weights.
        commit = config_path.parent.name
        weights_path = _hub_file(repo, WEIGHTS_NAME, commit, label)
    if sha256 is not None:
        verify_hash(weights_path, sha256=sha256_pin(sha256))
    ckpt = pretrained_checkpoint(config, read_weights(weights_path, label))
    ckpt["extra"]["source"] = label
    if commit:
        ckpt["extra"]["commit"] = commit
    return ckpt


def pinned_hub_source(source: str, *, sha256: str | None = None) -> str:
    """``hf:USER/NAME@COMMIT``: the Hub source ``source`` with its branch or tag resolved to the commit it names
    now (read from huggingface_hub's cache, fetched there if need be), so that every later read gets the same
    files."""
    ckpt = hub_checkpoint(source, sha256=sha256)
    return f"{ckpt['extra']['source'].partition('@')[0]}@{ckpt['extra']['commit']}"


def from_pretrained(repo_id: str | os.PathLike, revision: str | None = None, *, map_location: Any = "cpu") -> nn.Module:
    """A model from the Hugging Face Hub (``"USER/NAME"``, ``"hf:USER/NAME@REVISION"``) or from a folder written
    by ``save_pretrained``, in eval mode. Only JSON and safetensors are read: nothing is unpickled. A repository
    is fetched into huggingface_hub's cache (``HF_HUB_CACHE``) on first use; with ``HF_HUB_OFFLINE=1`` it is read
    from there alone. ``revision``: a branch, tag or commit (default: main)."""
    ckpt = hub_checkpoint(repo_id, revision)
    return _placed(model_from_checkpoint(ckpt, source=ckpt["extra"]["source"]), map_location)


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
