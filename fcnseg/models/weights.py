"""Published FCN weights, as an Enum in the style of torchvision's weights enums.

Each entry records where the file lives, its hash where one is known, the format it comes in, the fcnseg model it
converts to, the input it expects (the Caffe release: BGR, 0-255, minus the mean), the class names and the
metrics its authors reported. ``fcnseg.load("fcn8s-heavy-pascal")`` downloads the file on first use into torch.hub's
cache folder (``$TORCH_HOME/hub/checkpoints``), checks the hash, converts it once and keeps the fcnseg checkpoint
beside it. A copy obtained by hand is used instead when passed as ``file=`` (``--weights-file``) or placed in that
folder under the file name shown by ``fcnseg weights``.

The Caffe release publishes no hashes: the SHA-256 of a cached file is recorded beside it (``NAME.sha256``) the
first time it is used, and every later use checks the file against it; ``sha256=`` (``--sha256``) pins the hash a
file must have. Downloads are capped in size (:data:`MAX_DOWNLOAD_BYTES`), by the announced length and while the
bytes arrive.

This module is the catalogue and the downloads; the conversion of a downloaded file into a checkpoint
(``weights_checkpoint``, ``import_file``) is :mod:`fcnseg.hub`'s, so that the backbones can fetch their ImageNet
weights from here without importing the converters that build models.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any, Literal

import torch

from .._meta import (
    NYUD_CLASSES,
    NYUD_MEAN_BGR,
    NYUD_MEAN_HHA,
    SIFTFLOW_CLASSES,
    SIFTFLOW_GEO_CLASSES,
    SIFTFLOW_MEAN_BGR,
    VOC_CLASSES,
)
from ..errors import FcnsegError, shown
from ..io import atomic_write, staged_path
from ..preprocessing import CAFFE, Preprocessing

NYUD_CAFFE = Preprocessing(mean=NYUD_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="BGR", value_range=255.0)
"""The release's NYUDv2 colour input: BGR, 0-255, minus the NYUDv2 mean."""
NYUD_CAFFE_RGB_HHA = Preprocessing(
    mean=NYUD_MEAN_BGR + NYUD_MEAN_HHA, std=(1.0,) * 6, channel_order="BGR", value_range=255.0
)
"""The release's colour-HHA late fusion input: colour as ``NYUD_CAFFE`` (BGR: the first three channels only), then
HHA as ``NYUD_CAFFE_HHA``."""
SIFTFLOW_CAFFE = Preprocessing(mean=SIFTFLOW_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="BGR", value_range=255.0)
"""The release's SIFT Flow input: BGR, 0-255, minus the SIFT Flow mean."""
NYUD_CAFFE_HHA = Preprocessing(mean=NYUD_MEAN_HHA, std=(1.0, 1.0, 1.0), channel_order="RGB", value_range=255.0)
"""The release's NYUDv2 HHA input: the HHA image's channels as stored (not reversed), 0-255, minus the HHA mean."""

Format = Literal["caffe", "torchfcn", "fcnseg"]

MAX_DOWNLOAD_BYTES = 2 << 30
"""The most bytes a download may bring (2 GiB): the largest published file, NYUDv2's colour-HHA net, holds two
VGG16 streams of about 134 million float32 parameters each (about 1.1 GB)."""

CONVERSION_VERSION = 1
"""In the name of a cached conversion: bump it when converting the same file would give other numbers (a layout
change alone is not one: older checkpoints are read in today's layout)."""


def _metrics(pixel_acc: float, mean_acc: float, mean_iu: float, fw_iu: float) -> dict[str, float]:
    return {"pixel_acc": pixel_acc, "mean_acc": mean_acc, "mean_iu": mean_iu, "fw_iu": fw_iu}


@dataclass(frozen=True)
class PublishedWeights:
    """One published model: where to get it and what it needs."""

    url: str
    file_name: str
    format: Format
    model: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    metrics: Mapping[str, Mapping[str, float]]
    """dataset -> {pixel_acc, mean_acc, mean_iu, fw_iu} in %, as reported."""
    alignment: str = "caffe"
    md5: str | None = None
    sha256: str | None = None
    description: str = ""
    input: str = "BGR"
    """The input in words, as ``fcnseg weights`` shows it: the colour order, or what other image the net takes."""
    head_classes: Mapping[str, tuple[str, ...]] | None = None
    """A two-headed model's class names per head (the first head's are ``classes``)."""
    max_bytes: int = MAX_DOWNLOAD_BYTES
    """A download of more bytes is refused."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_DL = "https://dl.caffe.berkeleyvision.org"
_DRIVE = "https://drive.google.com/uc?id="
_HEAVY = "Caffe release ('heavy' PAMI-era training), converted on load"
_TORCHFCN = "torchfcn's PyTorch copy of the Caffe release weights"
# Reported by torchfcn's authors for the released models on seg11valid (torchfcn's README).
_VOC = {
    "fcn32s": {"seg11valid": _metrics(90.48, 76.48, 63.63, 83.46)},
    "fcn16s": {"seg11valid": _metrics(91.00, 78.07, 65.01, 84.26)},
    "fcn8s": {"seg11valid": _metrics(91.22, 77.61, 65.51, 84.54)},
    "fcn8s_atonce": {"seg11valid": _metrics(91.13, 78.50, 65.40, 84.43)},
}


def _caffe(model: str, file_name: str, **kw: Any) -> PublishedWeights:
    kw.setdefault("classes", VOC_CLASSES)
    kw.setdefault("preprocessing", CAFFE)
    kw.setdefault("metrics", _VOC.get(model, {}))
    return PublishedWeights(f"{_DL}/{file_name}", file_name, "caffe", model=model, description=_HEAVY, **kw)


def _torchfcn(model: str, file_name: str, *, drive_id: str, md5: str) -> PublishedWeights:
    return PublishedWeights(
        _DRIVE + drive_id, file_name, "torchfcn", model=model, classes=VOC_CLASSES, preprocessing=CAFFE,
        metrics=_VOC[model], md5=md5, description=_TORCHFCN,
    )  # fmt: skip


class FCNWeights(Enum):
    """Published FCN models. ``FCNWeights.FCN8S_HEAVY_PASCAL.value`` holds the entry; ``.id`` the CLI name."""

    FCN32S_HEAVY_PASCAL = _caffe("fcn32s", "fcn32s-heavy-pascal.caffemodel")
    FCN16S_HEAVY_PASCAL = _caffe("fcn16s", "fcn16s-heavy-pascal.caffemodel")
    FCN8S_HEAVY_PASCAL = _caffe("fcn8s", "fcn8s-heavy-pascal.caffemodel")
    FCN8S_ATONCE_PASCAL = _caffe("fcn8s_atonce", "fcn8s-atonce-pascal.caffemodel")
    NYUD_FCN32S_COLOR_HEAVY = _caffe(
        "fcn32s",
        "nyud-fcn32s-color-heavy.caffemodel",
        classes=NYUD_CLASSES,
        preprocessing=NYUD_CAFFE,
        metrics={"nyudv2-test": _metrics(60.0, 42.2, 29.2, 43.9)},
    )
    NYUD_FCN32S_HHA_HEAVY = _caffe(
        "fcn32s",
        "nyud-fcn32s-hha-heavy.caffemodel",
        classes=NYUD_CLASSES,
        preprocessing=NYUD_CAFFE_HHA,
        input="HHA",
        metrics={"nyudv2-test": _metrics(57.1, 35.2, 24.2, 40.4)},
    )
    NYUD_FCN32S_COLOR_HHA_HEAVY = _caffe(
        "fcn32s_rgb_hha",
        "nyud-fcn32s-color-hha-heavy.caffemodel",
        classes=NYUD_CLASSES,
        preprocessing=NYUD_CAFFE_RGB_HHA,
        input="BGR+HHA",
        metrics={"nyudv2-test": _metrics(64.3, 44.9, 32.8, 48.0)},
    )
    SIFTFLOW_FCN16S_HEAVY = _caffe(
        "fcn16s_twohead",
        "siftflow-fcn16s-heavy.caffemodel",
        classes=SIFTFLOW_CLASSES,
        head_classes={"semantic": SIFTFLOW_CLASSES, "geometric": SIFTFLOW_GEO_CLASSES},
        preprocessing=SIFTFLOW_CAFFE,
        # Semantic figures over the 30 classes of the test set; the geometric head: 94.3 pixel accuracy.
        metrics={"siftflow-test": _metrics(85.2, 51.7, 39.5, 76.1), "siftflow-test-geometric": {"pixel_acc": 94.3}},
    )
    TORCHFCN_FCN32S = _torchfcn(
        "fcn32s",
        "fcn32s_from_caffe.pth",
        drive_id="11k2Q0bvRQgQbT6-jYWeh6nmAsWlSCY3f",
        md5="d3eb467a80e7da0468a20dfcbc13e6c8",
    )
    TORCHFCN_FCN16S = _torchfcn(
        "fcn16s",
        "fcn16s_from_caffe.pth",
        drive_id="1bctu58B6YH9bu6lBBSBB2rUeGlGhYLoP",
        md5="a2d4035f669f09483b39c9a14a0d6670",
    )
    TORCHFCN_FCN8S = _torchfcn(
        "fcn8s",
        "fcn8s_from_caffe.pth",
        drive_id="1ieXWyoG68xqoHJPWdyrDyaIaaWlfmUxI",
        md5="de93e540ec79512f8770033849c8ae89",
    )
    TORCHFCN_FCN8S_ATONCE = _torchfcn(
        "fcn8s_atonce",
        "fcn8s-atonce_from_caffe.pth",
        drive_id="0B9P1L--7Wd2vblE1VUIxV1o2d2M",
        md5="bfed4437e941fef58932891217fe6464",
    )

    @property
    def id(self) -> str:
        """The name used on the command line: ``fcn8s-heavy-pascal``, ``torchfcn-fcn8s``, ..."""
        return self.name.lower().replace("_", "-")


def list_weights() -> list[str]:
    return [w.id for w in FCNWeights]


def get_weights(name: str | FCNWeights) -> FCNWeights:
    """An entry by CLI name (``fcn8s-heavy-pascal``) or Enum name (``FCN8S_HEAVY_PASCAL``)."""
    if isinstance(name, FCNWeights):
        return name
    key = name.strip().upper().replace("-", "_")
    try:
        return FCNWeights[key]
    except KeyError:
        raise FcnsegError(f"unknown weights {shown(name)}; expected one of: {', '.join(list_weights())}") from None


def is_weights_name(name: str) -> bool:
    return name.strip().upper().replace("-", "_") in FCNWeights.__members__


# ------------------------------------------------------------------------------------------------ downloading


def cache_dir() -> Path:
    """torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps its weights too."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise FcnsegError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def verify_hash(path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`FcnsegError` naming ``path`` if its digest differs from an expected one (each one given)."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise FcnsegError(f"{path}: {algorithm} is {got}, expected {expected} (a different or damaged file)")


def sha256_pin(text: str | None) -> str | None:
    """A SHA-256 given by the user (``--sha256``, ``sha256=``) in lower case; anything but 64 hexadecimal digits
    is an :class:`FcnsegError`."""
    if text is None:
        return None
    pin = str(text).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise FcnsegError(f"--sha256 {shown(text)}: expected 64 hexadecimal digits (as sha256sum prints them)")
    return pin


class _TooLargeError(Exception):
    """A download stopped because it is larger than expected."""


class _HttpsOnly(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except from https to anything else: a file asked for over TLS never arrives in clear."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(req.full_url).scheme == "https" and urllib.parse.urlparse(newurl).scheme != "https":
            raise urllib.error.HTTPError(newurl, code, f"redirected from https to {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, dst: Path, progress: bool, max_bytes: int) -> None:
    """Download ``url`` to ``dst`` (which the caller removes on failure), at most ``max_bytes``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc == "drive.google.com":
        # torchvision's Google Drive helper handles the confirmation page of large files (it needs gdown); its
        # size is checked once it is written.
        from torchvision.datasets.utils import download_file_from_google_drive

        file_id = urllib.parse.parse_qs(parsed.query)["id"][0]
        # Into a folder of its own, then over ``dst``: the helper takes an existing file (``dst`` is created empty)
        # for a finished download, and gdown leaves its partial file beside its target when it fails.
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as folder:
            download_file_from_google_drive(file_id, folder, dst.name)
            os.replace(Path(folder) / dst.name, dst)
        if dst.stat().st_size > max_bytes:
            raise _TooLargeError(f"{dst.stat().st_size:,} bytes")
        return
    request = urllib.request.Request(url, headers={"User-Agent": "fcnseg"})
    with urllib.request.build_opener(_HttpsOnly).open(request, timeout=60) as response, open(dst, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        if total is not None and total > max_bytes:
            raise _TooLargeError(f"its announced length is {total:,} bytes")
        received = _stream(response, f, total, progress, max_bytes)
    if total is not None and received != total:  # the connection closed early: a truncated file
        raise OSError(f"received {received} of {total} bytes")


def _stream(response: IO[bytes], f: IO[bytes], total: int | None, progress: bool, max_bytes: int) -> int:
    """Copy ``response`` to ``f`` in pieces, stopping as soon as more than ``max_bytes`` arrive; returns the count."""
    from tqdm import tqdm

    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            received += len(chunk)
            if received > max_bytes:
                raise _TooLargeError(f"more than {max_bytes:,} bytes arrived")
            f.write(chunk)
            bar.update(len(chunk))
    return received


def download(
    url: str,
    dst: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Path:
    """Download ``url`` to ``dst``, checking the hash; on any failure nothing is left at ``dst`` or beside it.

    The file is fetched into a temporary file next to ``dst`` (:func:`~fcnseg.io.staged_path`) and renamed only once
    the hash matches. More than ``max_bytes`` (announced, or arriving) stops the download.
    """
    dst = Path(dst)
    with contextlib.ExitStack() as stack:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(staged_path(dst))
        except OSError as e:
            raise FcnsegError(
                f"{dst.parent}: cannot write the weights cache ({e.strerror or e}); set TORCH_HOME to a writable "
                "folder or pass a local copy of the file"
            ) from None
        _fetch_or_explain(url, tmp, dst, progress=progress, max_bytes=max_bytes)
        try:
            verify_hash(tmp, md5=md5, sha256=sha256)
        except FcnsegError as e:
            raise FcnsegError(f"download of {url} refused: {str(e).split(': ', 1)[1]}; nothing was kept") from None
    return dst


def _fetch_or_explain(url: str, tmp: Path, dst: Path, *, progress: bool, max_bytes: int) -> None:
    """:func:`_fetch`, its failures as one :class:`FcnsegError` line each."""
    try:
        _fetch(url, tmp, progress, max_bytes)
    except _TooLargeError as e:
        raise FcnsegError(
            f"download of {url} refused: {e}, over the {max_bytes:,} expected at most; nothing was kept"
        ) from None
    except Exception as e:  # urllib, http.client, gdown and torchvision each raise their own types
        reason = getattr(e, "reason", None) or (str(e).splitlines()[0] if str(e) else e.__class__.__name__)
        raise FcnsegError(
            f"cannot download {url} ({reason}); fetch it by hand and pass it with --weights-file FILE "
            f"(fcnseg.load(NAME, file=FILE)), or place it at {dst}"
        ) from None


# ------------------------------------------------------------------------------------------------ the cache


def sha256_record(path: str | os.PathLike) -> Path:
    """Where the SHA-256 of the cached file ``path`` is recorded: ``path`` + ``.sha256``, as sha256sum writes it."""
    path = Path(path)
    return path.with_name(f"{path.name}.sha256")


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 recorded for the cached file ``path`` when it was first used; None when none is."""
    record = sha256_record(path)
    try:
        text = record.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{record}: cannot read ({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
    digest = (text.split() or [""])[0].lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise FcnsegError(f"{record}: not a SHA-256 record; delete it and {Path(path).name} to download it again")
    return digest


def record_sha256(path: str | os.PathLike, digest: str, *, say: bool = True) -> None:
    """Write ``digest`` beside the cached file ``path`` (atomically) and, with ``say``, print it on stderr."""
    path = Path(path)
    try:
        with atomic_write(sha256_record(path), "w") as f:
            f.write(f"{digest}  {path.name}\n")
    except OSError as e:
        raise FcnsegError(f"{sha256_record(path)}: cannot write ({e.strerror or e})") from None
    if say:
        print(f"fcnseg: {path.name}: sha256 {digest}, recorded in {sha256_record(path).name}", file=sys.stderr)


def _expected_sha256(entry: PublishedWeights, pin: str | None) -> str | None:
    """The SHA-256 a file of ``entry`` must have: the published one, or the pinned one; both must agree."""
    if pin and entry.sha256 and pin != entry.sha256.lower():
        raise FcnsegError(f"--sha256 {pin}: {entry.file_name} is published with sha256 {entry.sha256}")
    return pin or entry.sha256


def cached_weights(entry: PublishedWeights, *, sha256: str | None = None, progress: bool = True) -> tuple[Path, bool]:
    """The cached copy of ``entry``'s file, downloaded on first use, and whether it was just downloaded.

    Checked against the published hash, the pinned ``sha256`` and the SHA-256 recorded at its first use (which is
    recorded now if none is): a file that differs is refused and not used.
    """
    expected = _expected_sha256(entry, sha256_pin(sha256))
    path = cache_dir() / entry.file_name
    if not path.is_file():
        sha256_record(path).unlink(missing_ok=True)  # a record whose file is gone records nothing
        download(entry.url, path, md5=entry.md5, sha256=expected, progress=progress, max_bytes=entry.max_bytes)
        record_sha256(path, file_digest(path, "sha256"), say=progress)
        return path, True
    recorded, digest = recorded_sha256(path), file_digest(path, "sha256")
    if recorded is not None and digest != recorded:
        raise FcnsegError(
            f"{path}: sha256 is {digest}, but {sha256_record(path).name} recorded {recorded} at its first use (a "
            f"changed or damaged file); delete both to download it again"
        )
    if expected and digest != expected.lower():
        raise FcnsegError(f"{path}: sha256 is {digest}, expected {expected} (a different or damaged file)")
    verify_hash(path, md5=entry.md5)
    if recorded is None:
        record_sha256(path, digest, say=progress)
    return path, False


# ------------------------------------------------------------------------------------------------ converting


def released_input(model: str, num_classes: int) -> tuple[PublishedWeights | None, str | None]:
    """The published Caffe net whose input a converted file should record, from its model and class count.

    ``(entry, None)`` when exactly one published net has that model and class count. Otherwise a note says which
    input was assumed and how to choose another (``--weights``): several fit (NYUDv2's colour and HHA FCN-32s
    have the same layers: the first is assumed); none fits but one of the same kind and class count does (an
    FCN-16s colour-HHA net takes the released FCN-32s colour-HHA input); or none at all (``(None, note)``: the
    PASCAL VOC input is assumed)."""
    caffe = [w for w in FCNWeights if w.value.format == "caffe" and w.value.num_classes == num_classes]
    exact = [w for w in caffe if w.value.model == model]
    if len(exact) == 1:
        return exact[0].value, None
    fits = exact or [w for w in caffe if _kind(w.value.model) == _kind(model)]
    if fits:
        names = ", ".join(w.id for w in fits)
        what = "fits several published nets" if len(exact) > 1 else "is no published net; the closest is"
        return fits[0].value, (
            f"{model} with {num_classes} classes {what} {names}: assumed the input of {fits[0].id} "
            f"({_describe_input(fits[0].value.preprocessing)}); set another with --weights NAME"
        )
    return None, (
        f"{model} with {num_classes} classes is no published net: assumed the PASCAL VOC input "
        f"({_describe_input(CAFFE)}); set another with --weights NAME (fcnseg weights lists them)"
    )


def _kind(model: str) -> str:
    """A model's name without its stride: fcn16s_rgb_hha -> rgb_hha, fcn8s -> ''."""
    return model.partition("_")[2] if model.startswith("fcn") else model


def _describe_input(pp: Preprocessing) -> str:
    mean = ", ".join(f"{m:g}" for m in pp.mean)
    return f"{pp.channel_order}, 0-{pp.value_range:g} minus mean ({mean})"


# The Caffe VGG16 (VGG_ILSVRC_16_layers) the release initialised FCN-32s from, as torchfcn publishes it in
# torchvision's layout. It expects the Caffe input (BGR, 0-255, mean subtraction), which goes with the paper preset.
VGG16_CAFFE = PublishedWeights(
    _DRIVE + "1adDBTGY3GcEB_47dvcibajyzi872RAs3",
    "vgg16_from_caffe.pth",
    "torchfcn",
    model="vgg16",
    classes=(),
    preprocessing=CAFFE,
    metrics={},
    md5="aa75b158f4181e7f6230029eb96c1b13",
    description="Caffe VGG16 ImageNet classifier in torchvision layout (torchfcn)",
)


def vgg16_caffe_state_dict(progress: bool = True) -> dict[str, torch.Tensor]:
    """The Caffe VGG16 as a torchvision ``vgg16`` state dict, from torch.hub's cache or downloaded into it."""
    path, _ = cached_weights(VGG16_CAFFE, progress=progress)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file whose hash matches is no state dict: it holds Python objects, or is damaged
        raise FcnsegError(f"{path}: cannot read it as a VGG16 state dict ({e.__class__.__name__})") from None
