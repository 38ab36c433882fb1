"""One way from images to predictions: the model, its execution path, its preprocessing, tiling and test-time
augmentation in one object, :class:`Predictor`, which every consumer uses (``model.predict``, ``fcnseg predict``,
``eval``, ``serve``, the report, the demo, bench, export's check, int8 calibration).

The order of operations, for a batch of normalised images: for each scale, resize; for each view (the image and,
with ``flip``, its mirror), run the execution path on the whole view or, with ``tile``, on overlapping windows
blended by :func:`fcnseg.tiling.tiled_logits`; mirror the scores back and resize them to the input's size. Without
augmentation the result is the scores themselves. With it, each view's scores become probabilities, each head its
own softmax, and the views' probabilities are averaged (the averaging the FCN paper's successors use for multi-scale
testing); :meth:`Predictor.batch_logits` then gives their logarithm, whose softmax is that average.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._memory import keep_freed_memory
from .errors import FcnsegError
from .imageio import as_rgb_array
from .runtime.compare import class_labels, eval_mode

Runner = Callable[[torch.Tensor], torch.Tensor]
Scores = dict[str, torch.Tensor]


def weights_key(model: nn.Module) -> tuple:
    """What a built execution path depends on in the model: every parameter's and buffer's storage and in-place
    version (an optimiser step or ``load_state_dict`` bumps it), device and dtype."""
    return tuple(
        (name, t.data_ptr(), t._version, t.device, t.dtype) for name, t in model.state_dict(keep_vars=True).items()
    )


def model_input(model: nn.Module, image: Any) -> torch.Tensor:
    """``image`` normalised for ``model``, C x H x W: a colour image (path, PIL image, array), or for a model of
    more input channels (colour plus depth or HHA) an H x W x C uint8 array in the model's channel order."""
    pp = model.preprocessing
    if pp.channels != model.in_channels:  # e.g. a fusion net converted with a colour-only input recorded
        raise FcnsegError(
            f"the model takes {model.in_channels} input channels but its recorded input normalisation has "
            f"{pp.channels}; convert or save it again with the right input (fcnseg convert --weights NAME)"
        )
    if pp.channels == 3:
        return pp(as_rgb_array(image))
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == pp.channels):
        got = f"shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FcnsegError(
            f"this model takes {pp.channels} input channels (colour first, then depth or HHA): expected an "
            f"H x W x {pp.channels} uint8 array, got {got}"
        )
    if image.dtype != np.uint8:
        raise FcnsegError(f"expected a uint8 array of 0-255 values for the {pp.channels} channels, got {image.dtype}")
    return pp(image)


def normalised(model: nn.Module, images: Iterable[Any]) -> list[torch.Tensor]:
    """Images (paths, PIL images or arrays) as the model's normalised 1 x C x H x W inputs."""
    return [model_input(model, image).unsqueeze(0) for image in images]


def own_forward(model: nn.Module) -> Runner:
    """The ``eager`` path: the model's own fp32 forward on its device, in eval mode for the call."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with eval_mode(model), torch.inference_mode():
            return model(x.to(next(model.parameters()).device)).float()

    return run


@dataclass
class Outputs:
    """One image's predictions, per head: labels, and where asked for probabilities (C x H x W float32), confidence
    (the largest probability, H x W float32) and entropy (nats, H x W float32)."""

    masks: dict[str, np.ndarray]
    proba: dict[str, np.ndarray] = field(default_factory=dict)
    confidence: dict[str, np.ndarray] = field(default_factory=dict)
    entropy: dict[str, np.ndarray] = field(default_factory=dict)


def labels(scores: torch.Tensor) -> np.ndarray:
    """Argmax over the classes (dim -3) as a numpy array: uint8 for up to 256 classes, int64 beyond."""
    out = class_labels(scores, -3).cpu().numpy()
    return out.astype(np.uint8) if scores.shape[-3] <= 256 else out


class Predictor:
    """A model on an execution path, with its preprocessing, optional tiling and test-time augmentation.

    Args:
        model: an fcnseg model (:class:`~fcnseg.models.base.SegmentationModel`: its heads, preprocessing, stride).
        runtime: an execution path name (:data:`fcnseg.runtime.PATHS`, ``auto``, ``auto-reduced``) or a built
            runner (a callable from normalised N x C x H x W to N x K x H x W float logits). ``eager`` is the
            model's own forward; other paths are built on first use and, when built from a name, kept with the
            model until its weights, device or dtype change.
        tile, overlap: run overlapping ``tile`` x ``tile`` windows (a multiple of the stride) and blend them.
        flip, scales: average the probabilities of the mirrored image and of resized copies.
        calibration: images (or normalised 1 x C x H x W tensors) int8 calibrates on; by default the first images
            predicted.
        batch_size: images of one size run together, up to this many.
        verbose: say on stderr which path ``auto`` took, and why.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        runtime: str | Runner | None = "eager",
        tile: int | None = None,
        overlap: int = 64,
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        calibration: Sequence[Any] = (),
        batch_size: int = 1,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.tile, self.overlap, self.flip = tile, overlap, bool(flip)
        self.scales = _checked_scales(scales)
        self.batch_size = max(1, int(batch_size))
        if tile:
            from .tiling import check_tiling

            check_tiling(tile, overlap, model.stride)
        self.calibration = list(calibration)
        self._run: Runner | None = None
        self.verbose = verbose
        on_cpu = next(model.parameters()).device.type == "cpu"
        if on_cpu:
            # Each call allocates the activations anew (400 MB a layer for 8 images of 375 x 500): kept for reuse,
            # not faulted in again. FCN-8s at 375 x 500 on a 2-core CPU: 8% faster alone, 1.2x in batches of 8.
            keep_freed_memory()
        if runtime is None or callable(runtime):
            self.path, self.reason, self._run = "runner" if runtime else "eager", None, runtime
        else:
            from .runtime import AUTO, resolve_path

            if runtime in AUTO and on_cpu:
                self.path, self.reason = runtime, None  # measured on the first input (fcnseg.runtime.choice)
            else:
                self.path, self.reason = resolve_path(runtime, model)
        self._say()

    def _say(self) -> None:
        if self.verbose and self.reason:
            print(self.reason, file=sys.stderr)

    @property
    def heads(self) -> dict[str, int]:
        return self.model.heads

    @property
    def augmented(self) -> bool:
        return self.flip or self.scales != (1.0,)

    # -- the execution path ----------------------------------------------------------------------------------
    def runner(self, first: torch.Tensor | None = None) -> Runner:
        """The execution path, built on first use (int8 calibrated on ``calibration``, else on ``first``; ``auto``
        measured on ``first``, a tile of it with tiling)."""
        if self._run is None:
            self._run = self._build(first)
        return self._run

    def _build(self, first: torch.Tensor | None) -> Runner:
        model, path = self.model, self.path
        if path == "eager":
            return own_forward(model)
        calibration = [self._as_batch(c) for c in self.calibration]
        slot, key = self._shared_as(calibration), weights_key(model)
        if slot in model._runners and model._runners[slot][0] == key:
            _, run, self.path, self.reason = model._runners[slot]
            self._say()
            return run
        calibration = calibration or ([first[:1]] if first is not None else [])
        with eval_mode(model):
            built = self._built(path, first, calibration)

        def run(x: torch.Tensor) -> torch.Tensor:
            with eval_mode(model):
                return built(x)

        if slot is not None:
            model._runners[slot] = (key, run, self.path, self.reason)
        return run

    def _shared_as(self, calibration: list[torch.Tensor]) -> str | None:
        """The name this predictor's runner is kept under with the model, for the next predictor alike
        (``model.predict`` makes one a call); None where it is this predictor's own: the int8 paths, calibrated on
        its images. ``auto`` is measured on the first input, a tile of it with tiling, and ``auto-reduced`` judged
        on the calibration images too: their runners are shared only with the same tiling and calibration."""
        from .runtime import AUTO
        from .runtime.engines import calibration_tag

        if self.path in ("onnx-int8", "openvino-int8"):
            return None
        if self.path not in AUTO:
            return self.path
        slot = self.path + (f", tile {self.tile}" if self.tile else "")
        if self.path == "auto-reduced" and calibration:
            slot += f", calibration {calibration_tag(calibration)}"
        return slot

    def _built(self, path: str, first: torch.Tensor | None, calibration: list[torch.Tensor]) -> Runner:
        """``path`` built; ``auto`` measured on ``first`` (:func:`fcnseg.runtime.choice.choose`), or without an
        input chosen from the CPU's features, and the choice said when ``verbose``."""
        from .runtime import AUTO, make_runner, resolve_path

        if path in AUTO and first is not None:
            from .runtime.choice import choose

            example = first[..., : self.tile, : self.tile] if self.tile else first
            choice, built = choose(self.model, path, example, calibration)
            self.path, self.reason = choice.path, choice.line()
            self._say()
            return own_forward(self.model) if choice.path == "eager" else built  # eager: the model's own forward
        if path in AUTO:
            self.path, self.reason = resolve_path(path, self.model)
            self._say()
        return make_runner(self.model, self.path, channels_last=True, calibration=calibration)

    def _as_batch(self, item: Any) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item if item.dim() == 4 else item.unsqueeze(0)
        return model_input(self.model, item).unsqueeze(0)

    # -- batches of normalised images ------------------------------------------------------------------------
    def batch_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """N x K x H x W scores of every head, concatenated, and whether they are probabilities (with test-time
        augmentation: the views' mean, each head's softmax) rather than logits."""
        run = self.runner(x)
        if not self.augmented:
            return self._views(run, x), False
        h, w = x.shape[-2:]
        total: torch.Tensor | int = 0
        for s in self.scales:
            xs = x if s == 1.0 else _scaled(x, s)
            for mirrored in (False, True) if self.flip else (False,):
                out = self._views(run, xs.flip(-1) if mirrored else xs)
                out = out.flip(-1) if mirrored else out
                if s != 1.0:
                    out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
                total = total + torch.cat([p.softmax(1) for p in out.float().split(list(self.heads.values()), 1)], 1)
        return total / (len(self.scales) * (2 if self.flip else 1)), True

    def _views(self, run: Runner, x: torch.Tensor) -> torch.Tensor:
        """The execution path on ``x``: whole, or window by window with ``tile``."""
        if not self.tile:
            return run(x)
        from .tiling import tiled_logits

        k = sum(self.heads.values())
        opts = {"tile": self.tile, "overlap": self.overlap, "align": self.model.stride}
        return torch.stack([tiled_logits(run, image, k, **opts) for image in x])

    def split(self, scores: torch.Tensor) -> Scores:
        """``{head: N x classes x H x W}`` from concatenated scores."""
        return dict(zip(self.heads, scores.split(list(self.heads.values()), dim=-3), strict=True))

    def batch_logits(self, x: torch.Tensor) -> Scores:
        """``{head: N x classes x H x W}`` float logits (with augmentation: the log of the mean probabilities)."""
        scores, probs = self.batch_scores(x)
        return self.split(scores.clamp_min(torch.finfo(scores.dtype).tiny).log() if probs else scores)

    def batch_proba(self, x: torch.Tensor) -> Scores:
        """``{head: N x classes x H x W}`` probabilities, each head's summing to 1."""
        scores, probs = self.batch_scores(x)
        return {h: v if probs else v.softmax(-3) for h, v in self.split(scores).items()}

    def batch_masks(self, x: torch.Tensor) -> Scores:
        """``{head: N x H x W}`` int64 labels."""
        scores, _ = self.batch_scores(x)
        return {h: class_labels(v, -3) for h, v in self.split(scores).items()}

    # -- images ----------------------------------------------------------------------------------------------
    def inputs(self, images: Iterable[Any]) -> list[torch.Tensor]:
        """The images normalised as the model expects, C x H x W each."""
        return [model_input(self.model, image) for image in images]

    def batches(self, images: Sequence[Any]) -> Iterator[torch.Tensor]:
        """Normalised N x C x H x W batches of consecutive images of one size, up to ``batch_size``."""
        group: list[torch.Tensor] = []
        for x in self.inputs(images):
            if group and (len(group) == self.batch_size or group[0].shape != x.shape):
                yield torch.stack(group)
                group = []
            group.append(x)
        if group:
            yield torch.stack(group)

    def logits(self, images: Sequence[Any]) -> list[Scores]:
        """Per image, ``{head: classes x H x W}`` float logits (CPU) at the image's own size."""
        return [{h: v[i].cpu() for h, v in self.batch_logits(x).items()} for x in self.batches(images) for i in
                range(len(x))]  # fmt: skip

    def outputs(
        self, images: Sequence[Any], *, proba: bool = False, confidence: bool = False, entropy: bool = False
    ) -> list[Outputs]:
        """Per image, every head's labels and, as asked, probabilities, confidence and entropy, from one pass."""
        if self.tile and not (self.augmented or proba or confidence or entropy):
            return [Outputs(masks) for masks in self._tiled_masks(images)]
        out = []
        for x in self.batches(images):
            scores, probs = self.batch_scores(x)
            for i in range(len(x)):
                out.append(_outputs(self.split(scores[i].cpu()), probs, proba, confidence, entropy))
        return out

    def _tiled_masks(self, images: Sequence[Any]) -> Iterator[dict[str, np.ndarray]]:
        # Labels band by band: memory bounded by the tile's height, not the image's (fcnseg.tiling.tiled_masks).
        from .tiling import tiled_masks

        for x in self.inputs(images):
            run = self.runner(x[None])
            sizes = list(self.heads.values())
            masks = tiled_masks(run, x, sizes, tile=self.tile, overlap=self.overlap, align=self.model.stride)
            yield dict(zip(self.heads, masks, strict=True))

    def masks(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Per image, ``{head: H x W labels}`` (uint8 up to 256 classes)."""
        return [o.masks for o in self.outputs(images)]

    def proba(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Per image, ``{head: classes x H x W float32 probabilities}``."""
        return [o.proba for o in self.outputs(images, proba=True)]

    def confidence(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Per image, ``{head: H x W float32}``: the largest class probability at each pixel."""
        return [o.confidence for o in self.outputs(images, confidence=True)]

    def entropy(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Per image, ``{head: H x W float32}``: the entropy of the class probabilities at each pixel, in nats."""
        return [o.entropy for o in self.outputs(images, entropy=True)]


def _outputs(per_head: Scores, probs: bool, proba: bool, confidence: bool, entropy: bool) -> Outputs:
    out = Outputs({h: labels(v) for h, v in per_head.items()})
    if proba or confidence or entropy:
        p = {h: (v if probs else v.float().softmax(0)) for h, v in per_head.items()}
        if proba:
            out.proba = {h: v.numpy().astype(np.float32) for h, v in p.items()}
        if confidence:
            out.confidence = {h: v.max(0).values.numpy().astype(np.float32) for h, v in p.items()}
        if entropy:
            out.entropy = {h: (-(v * v.clamp_min(1e-30).log()).sum(0)).numpy().astype(np.float32) for h, v in p.items()}
    return out


def _scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    """``x`` resized by ``s`` (bilinear), at least 1 pixel a side: an image 1 pixel high has none at scale 0.75."""
    h, w = x.shape[-2:]
    if math.floor(h * s) >= 1 and math.floor(w * s) >= 1:
        return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    size = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _checked_scales(scales: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in scales)
    if not out or not all(0 < s < float("inf") for s in out):
        raise FcnsegError(f"--scales {','.join(map(str, scales))}: expected positive numbers")
    return out


def agreement(candidate: Predictor, reference: Predictor, inputs: Iterable[torch.Tensor]) -> float:
    """Fraction of pixels, over ``inputs`` (normalised N x C x H x W) and every head, where ``candidate``'s label
    equals ``reference``'s."""
    same = total = 0
    for x in inputs:
        ours, theirs = candidate.batch_masks(x), reference.batch_masks(x)
        for head, mask in ours.items():
            same += int((mask.cpu() == theirs[head].cpu()).sum())
            total += mask.numel()
    return same / max(total, 1)


__all__ = ["Outputs", "Predictor", "agreement", "eval_mode", "labels", "model_input", "normalised", "own_forward"]
