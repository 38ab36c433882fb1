"""One upload to masks, exactly as ``fcnseg predict`` makes them, and the card that describes the served model.

The upload is written to a private temporary folder and goes the way ``fcnseg predict`` takes: read by
:func:`~fcnseg.imageio.load_image` (every PIL mode, EXIF orientation, the decompression-bomb guard, the format
allowlist), fusion nets' extra images stacked by :func:`~fcnseg.imageio.stack_extra_channels`, segmented by the
same :class:`~fcnseg.inference.Predictor` (execution path, tiling, test-time augmentation) and encoded by the same
encoders, in memory. The PNG the service returns is therefore the very file ``fcnseg predict`` writes for the same
input, byte for byte. Before any pixel is
decoded, the headers of the image and of every extra image are checked: format, size, and the padded area the model
will compute on (:mod:`.limits`). Nothing here knows HTTP beyond the status each refusal carries
(:class:`ServeError`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import FcnsegError, ImageError, first_line
from ..imageio import (
    UnsupportedFormatError,
    add_legend,
    encode_mask_png,
    encode_rgb,
    load_image,
    overlay,
    probe_image,
    stack_extra_channels,
)
from ..inference import Predictor
from ..predict import batch_groups, confidence_png, forward_area, forward_size

__all__ = ["DEFAULT_MAX_PIXELS", "Segmentation", "Segmenter", "ServeError", "Upload", "recorded_metrics"]

DEFAULT_MAX_PIXELS = 8_388_608  # 8 MP of padded area (4096 x 2048 in aligned mode): more needs a larger limit


class ServeError(FcnsegError):
    """A request the service refuses: the HTTP ``status`` to answer and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """An uploaded file: the name the client gave it (used in messages only) and its bytes, readable from the start."""

    name: str
    file: BinaryIO


@dataclass(frozen=True)
class HeadMask:
    """One head's answer: its palette PNG (``fcnseg predict``'s file), the class indices, the class colours and,
    when asked for, the confidence map (each pixel's largest class probability)."""

    name: str
    png: bytes
    mask: np.ndarray
    colors: np.ndarray
    confidence: np.ndarray | None = None


@dataclass(frozen=True)
class Segmentation:
    """One image's masks, every head's, and the milliseconds spent reading and segmenting it."""

    name: str
    rgb: np.ndarray
    heads: list[HeadMask]
    timing_ms: dict[str, float]

    @property
    def size(self) -> tuple[int, int]:
        """Width and height, as image sizes are written (640x480)."""
        return self.rgb.shape[1], self.rgb.shape[0]


# ------------------------------------------------------------------------------------------ files of a request


def _suffix(name: str) -> str:
    # The upload keeps its suffix (PIL reads a few formats by name), nothing else of the client's name.
    suffix = Path(name).suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""


def _spool(upload: Upload, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    upload.file.seek(0)
    with open(path, "wb") as f:
        shutil.copyfileobj(upload.file, f, 1 << 20)
    return path


@contextlib.contextmanager
def _as_client_names(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a user's-mistake error as a :class:`ServeError`, the temporary paths in its message replaced by the
    names the client gave its files: 413 for an image too large to decode, 415 for a format not accepted, 400 for
    another unreadable file, 422 for a readable one the model cannot take."""
    try:
        yield
    except ServeError:
        raise
    except FcnsegError as e:
        message = str(e)
        for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
            message = message.replace(path, name)
        status = 422
        if isinstance(e, UnsupportedFormatError):
            status = 415
        elif isinstance(e, ImageError) or "cannot read" in message:
            status = 413 if "(too large:" in message else 400
        raise ServeError(status, message) from None


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 2)


BATCH_COST = 8
"""What one /predict/batch request's images may make the model compute on, padded areas summed, in units of
``--max-pixels``: eight single requests' worth, refused from the headers before any pixel is decoded (without it a
request of 64 images, each under the limit, costs 64 passes that only the deadline stops)."""


# ------------------------------------------------------------------------------------------------ the service


def _never_cancelled() -> None:
    return None


def _checked(run: Callable[[torch.Tensor], torch.Tensor], check: Callable[[], None]) -> Callable:
    """``run`` with ``check()`` before every call: a tiled image stops between two tiles once its request has been
    given up. The same runner otherwise, so the masks are the bytes ``predict`` writes."""

    def checked(x: torch.Tensor) -> torch.Tensor:
        check()
        return run(x)

    return checked


@dataclass(frozen=True)
class _Read:
    """One image read and checked: the client's name for it, its colour image, the model's input, and when its
    reading began and ended (``time.perf_counter``)."""

    name: str
    rgb: np.ndarray
    x: np.ndarray
    start: float
    end: float


class Segmenter:
    """A model's :class:`~fcnseg.inference.Predictor`, as ``predict`` would run it; :meth:`segment` is one
    request's work, :meth:`batch_groups` and :meth:`segment_batch` a batch's.

    ``max_pixels``: the largest padded area (:func:`~fcnseg.predict.forward_size`: the model's own
    :func:`.limits.padded_size` at the largest test-time scale) an image
    may make the model compute on, or with tiling the largest image area (each tile's padded area is bounded by the
    tile size); larger is refused with 413, from the header. PIL's decompression-bomb limit holds in every case.
    ``batch``: a batch's images of one size run as one forward pass of up to this many, whose areas together stay
    within ``max_pixels`` too, so that no pass costs more than one image may. Thread-safe: requests share the model,
    read only.
    """

    def __init__(self, predictor: Predictor, *, max_pixels: int = DEFAULT_MAX_PIXELS, batch: int = 1) -> None:
        self.predictor = predictor
        self.model = predictor.model
        self.max_pixels = max_pixels
        self.batch = batch
        self.colors = self.model.class_colors()
        self.names = self.model.class_names()
        self.in_channels = self.model.in_channels

    @property
    def heads(self) -> list[str]:
        return list(self.colors)

    def segment(
        self,
        image: Upload,
        extras: Sequence[Upload] = (),
        check: Callable[[], None] = _never_cancelled,
        *,
        confidence: bool = False,
    ) -> Segmentation:
        """Read, check and segment one image (and a fusion net's depth or HHA ``extras``, in channel order).

        Every header is checked before any pixel is decoded. ``check`` raises once the request has been given up
        (:meth:`.pool.Place.check`); it is called between the stages and tiles. ``confidence``: also each head's
        confidence map. Raises :class:`ServeError` with the status to answer for anything the client can fix."""
        with tempfile.TemporaryDirectory(prefix="fcnseg-serve-") as tmp:
            read = self._read(image, extras, Path(tmp), check)
        with _as_client_names({}):
            return self._segmented([read], check, confidence)[0]

    def batch_groups(self, images: Sequence[Upload], check: Callable[[], None] = _never_cancelled) -> list[list[int]]:
        """The indices of ``images`` in the groups :meth:`segment_batch` runs together: of one size, by their
        headers (no pixel decoded), each of at most :attr:`batch` images whose padded areas sum to at most
        :attr:`max_pixels` (an image it refuses costs nothing: it fails before the model runs). A request whose
        images sum to more than :data:`BATCH_COST` times :attr:`max_pixels` is refused whole (413)."""
        sizes = self._header_sizes(images, check)

        def cost(i: int) -> int:
            return forward_area(self.predictor, sizes[i])

        total, cap = sum(map(cost, sizes)), BATCH_COST * self.max_pixels
        if total > cap:
            raise ServeError(
                413, f"the batch's images make the model compute on {total:,} pixels with their padding, above this "
                f"server's limit of {cap:,} for one request ({BATCH_COST} x --max-pixels); send them in several "
                "requests"
            )  # fmt: skip
        if self.batch == 1:
            return [[i] for i in range(len(images))]
        return list(batch_groups(sizes, key=sizes.get, cost=cost, batch=self.batch, max_pixels=self.max_pixels))

    def _header_sizes(self, images: Sequence[Upload], check: Callable[[], None]) -> dict[int, tuple[int, int] | None]:
        """Each image's (height, width) from its header; None for one :meth:`segment_batch` will refuse."""
        sizes: dict[int, tuple[int, int] | None] = {}
        with tempfile.TemporaryDirectory(prefix="fcnseg-serve-") as tmp:
            for i, image in enumerate(images):
                check()
                with contextlib.suppress(ServeError):  # segment_batch refuses it again, with its status
                    self._check_extras(())
                    path = _spool(image, Path(tmp) / str(i), f"fcnseg-upload{_suffix(image.name)}")
                    with _as_client_names({str(path): image.name, path.name: image.name}):
                        w, h = self._check_header(path, image.name)
                    sizes[i] = (h, w)
                sizes.setdefault(i, None)
        return sizes

    def segment_batch(
        self, images: Sequence[Upload], check: Callable[[], None] = _never_cancelled
    ) -> list[Segmentation | ServeError]:
        """Read and check each of ``images``, then segment those read together (one forward pass for those of one
        size): per image, its :class:`Segmentation` or the :class:`ServeError` that :meth:`segment` would raise."""
        reads: list[_Read | ServeError] = []
        with tempfile.TemporaryDirectory(prefix="fcnseg-serve-") as tmp:
            for i, image in enumerate(images):
                try:
                    reads.append(self._read(image, (), Path(tmp) / str(i), check))
                except ServeError as e:
                    reads.append(e)
        done = iter(self._segmented_each([r for r in reads if isinstance(r, _Read)], check))
        return [r if isinstance(r, ServeError) else next(done) for r in reads]

    def _segmented_each(self, reads: list[_Read], check: Callable[[], None]) -> list[Segmentation | ServeError]:
        try:
            with _as_client_names({}):
                return list(self._segmented(reads, check, confidence=False))
        except ServeError as e:
            if len(reads) == 1:
                return [e]
        except (RuntimeError, MemoryError) as e:  # torch's own, on one image: its answer, not the whole batch's
            if len(reads) == 1:
                return [ServeError(500, f"{reads[0].name}: cannot segment it ({first_line(e)[:200]})")]
        # One image the model refuses would fail its whole group: one by one, each gets its own answer.
        return [answer for read in reads for answer in self._segmented_each([read], check)]

    def _read(self, image: Upload, extras: Sequence[Upload], folder: Path, check: Callable[[], None]) -> _Read:
        """Spool ``image`` (and ``extras``) into ``folder``, check every header, then decode and stack them."""
        self._check_extras(extras)
        start = time.perf_counter()
        path = _spool(image, folder / "in", f"fcnseg-upload{_suffix(image.name)}")
        names = {str(path): image.name, path.name: image.name}  # messages may name the file alone
        with _as_client_names(names):
            size = self._check_header(path, image.name)
            folders = [self._spool_extra(extra, i, path, names, size) for i, extra in enumerate(extras)]
            check()
            rgb = load_image(path)
            x = self._stacked(rgb, path, folders)
        return _Read(image.name, rgb, x, start, time.perf_counter())

    def _segmented(self, reads: Sequence[_Read], check: Callable[[], None], confidence: bool) -> list[Segmentation]:
        """``reads`` segmented in one pass (for those of one size), each one's masks encoded. Its inference time is
        its pass's (the time it waited for its masks) and its own encoding's."""
        check()
        start = time.perf_counter()
        results = self._request_predictor(check, len(reads)).outputs([r.x for r in reads], confidence=confidence)
        forward = time.perf_counter() - start
        out = []
        for read, result in zip(reads, results, strict=True):
            begin = time.perf_counter()
            heads = [
                HeadMask(head, encode_mask_png(mask, self.colors[head]), mask, self.colors[head],
                         result.confidence.get(head))
                for head, mask in result.masks.items()
            ]  # fmt: skip
            inference = forward + time.perf_counter() - begin
            timing = {"read": _ms(read.start, read.end), "inference": round(inference * 1000, 2),
                      "total": _ms(read.start, read.end + inference)}  # fmt: skip
            out.append(Segmentation(read.name, read.rgb, heads, timing))
        return out

    def _request_predictor(self, check: Callable[[], None], batch: int = 1) -> Predictor:
        # The server's execution path (built once) behind a check between tiles and passes; every other option the
        # same, and `batch` images of one size in one pass.
        p = self.predictor
        return Predictor(p.model, runtime=_checked(p.runner(), check), tile=p.tile, overlap=p.overlap, flip=p.flip,
                         scales=p.scales, batch_size=batch)  # fmt: skip

    def _check_extras(self, extras: Sequence[Upload]) -> None:
        if self.in_channels > 3 and not extras:
            raise ServeError(
                422,
                f"this model takes {self.in_channels} input channels (colour, then depth or HHA): send each image's "
                "depth or HHA image as the multipart field 'extra', repeated in channel order",
            )
        if self.in_channels == 3 and extras:
            raise ServeError(422, "this model takes colour images only (3 channels); send no 'extra' field")
        if len(extras) > self.in_channels - 3:
            raise ServeError(422, f"this model takes {self.in_channels - 3} extra channels; got {len(extras)} 'extra' "
                             "images")  # fmt: skip

    def _check_header(self, path: Path, name: str) -> tuple[int, int]:
        """The image's (width, height) from its header, once its format and size are known to be accepted."""
        header = probe_image(path)
        w, h = header.width, header.height
        if self.predictor.tile:  # each tile's padded area is bounded by the tile size; the image's own, here
            if w * h > self.max_pixels:
                raise ServeError(
                    413, f"{name}: image is {w}x{h} = {w * h:,} pixels, above this server's limit of "
                    f"{self.max_pixels:,} (--max-pixels, tiled or not); send a smaller image"
                )  # fmt: skip
            return w, h
        rows, cols = forward_size(self.predictor, h, w)  # at the largest scale test-time augmentation runs
        if rows * cols > self.max_pixels:
            raise ServeError(
                413, f"{name}: image is {w}x{h}, which the model computes on as {cols}x{rows} = {rows * cols:,} "
                f"pixels with its padding, above this server's limit of {self.max_pixels:,} (--max-pixels); send a "
                "smaller image, or start the server with --tile for large ones"
            )  # fmt: skip
        return w, h

    def _spool_extra(self, extra: Upload, index: int, path: Path, names: dict[str, str], size: tuple[int, int]) -> Path:
        """Save a fusion net's extra image under the image's own name in a folder of its own (as ``predict --extra``
        finds it), once its header shows an accepted format and the image's size (its area: EXIF orientation may
        turn the colour image, and the exact sizes are compared after reading)."""
        folder = path.parent.parent / f"extra{index}"
        spooled = _spool(extra, folder, path.name)
        names[str(spooled)] = extra.name
        header = probe_image(spooled, "depth or HHA image")
        if header.width * header.height != size[0] * size[1]:
            raise ServeError(422, f"{extra.name}: is {header.width}x{header.height} but {names[path.name]} is "
                             f"{size[0]}x{size[1]}; expected the same size")  # fmt: skip
        return folder

    def _stacked(self, rgb: np.ndarray, path: Path, folders: Sequence[Path]) -> np.ndarray:
        """The model's input: ``rgb``, or for a fusion net ``rgb`` and the extra images stacked as ``predict --extra``
        does."""
        if not folders:
            return rgb
        return stack_extra_channels(rgb, path, folders, self.in_channels)

    def head_index(self, head: str | None) -> int:
        """The position of ``head`` among the model's heads (None: the first)."""
        if head is None:
            return 0
        if head not in self.colors:
            raise ServeError(422, f"head {head!r}: this model's heads are {', '.join(self.heads)}")
        return self.heads.index(head)

    def overlay_jpeg(self, result: Segmentation, head: int = 0, alpha: float = 0.5) -> bytes:
        """The mask of head number ``head`` blended over the image, as ``predict --overlay`` writes it (JPEG)."""
        mask = result.heads[head]
        blended = overlay(result.rgb, mask.mask, mask.colors, alpha)
        return encode_rgb(add_legend(blended, mask.mask, mask.colors, self.names[mask.name]), "jpeg")

    @staticmethod
    def confidence_png(result: Segmentation, head: int = 0) -> bytes:
        """The confidence map of head number ``head`` as ``predict --confidence`` writes it (16-bit grey PNG)."""
        conf = result.heads[head].confidence
        if conf is None:
            raise ValueError("segment(..., confidence=True) computes the confidence maps")
        return confidence_png(conf)

    def describe(self, result: Segmentation) -> dict[str, Any]:
        """The JSON answer: size, timing, and per head the mask PNG in base64 and every class's pixel share."""
        w, h = result.size
        heads = []
        for mask in result.heads:
            counts = np.bincount(mask.mask.ravel(), minlength=len(mask.colors))
            classes = [
                {"index": k, "name": name, "color": [int(v) for v in mask.colors[k]], "pixels": int(counts[k]),
                 "share": float(counts[k]) / (w * h)}
                for k, name in enumerate(self.names[mask.name])
            ]  # fmt: skip
            entry = {"name": mask.name, "mask_png": base64.b64encode(mask.png).decode("ascii"), "classes": classes}
            if mask.confidence is not None:
                entry["mean_confidence"] = float(mask.confidence.mean())
                entry["confidence_png"] = base64.b64encode(confidence_png(mask.confidence)).decode("ascii")
            heads.append(entry)
        return {"file": result.name, "width": w, "height": h, "timing_ms": result.timing_ms, "heads": heads}

    def card(self) -> dict[str, Any]:
        """What the model is: architecture and its options, parameters, alignment, input, heads and classes."""
        model = self.model
        config = model.build_config or {"name": type(model).__name__, "kwargs": {}}
        heads = [
            {"name": head, "classes": [{"index": k, "name": name, "color": [int(v) for v in self.colors[head][k]]}
                                       for k, name in enumerate(self.names[head])]}
            for head in self.heads
        ]  # fmt: skip
        return {
            "architecture": config["name"],
            "options": json.loads(json.dumps(config["kwargs"], default=str)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "alignment": model.alignment,
            "stride": model.stride,
            "input_channels": self.in_channels,
            "preprocessing": model.preprocessing.to_dict(),
            "heads": heads,
        }


def recorded_metrics(source: str) -> dict[str, Any]:
    """The metrics a checkpoint file records (``best.pt``: its validation mean IU and iteration; converted published
    weights: those their authors reported), or a published weights entry's by name; {} when none."""
    if Path(source).is_file():
        from ..checkpoint import read_checkpoint

        extra = read_checkpoint(source, map_location="meta")["extra"]  # tensors as shapes only: nothing is loaded
        if extra.get("weights", {}).get("metrics"):
            return json.loads(json.dumps(extra["weights"]["metrics"]))
        return {k: extra[k] for k in ("mean_iu", "iteration") if isinstance(extra.get(k), (int, float))}
    from ..models.weights import get_weights, is_weights_name

    if not is_weights_name(source):
        return {}
    return {k: dict(v) for k, v in get_weights(source).value.metrics.items()}
