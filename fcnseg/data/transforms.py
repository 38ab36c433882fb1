"""Paired (image, mask) transforms and the collate function that batches whole images of different sizes.

Everything is built on torchvision.transforms.v2, which dispatches on the tensor type: a ``tv_tensors.Mask`` is
resized with nearest neighbour, padded with its own fill value and never touched by photometric transforms, so
labels are never interpolated into classes that are not there. Masks stay int64 with 255 = void throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..preprocessing import Preprocessing
from .base import IGNORE_INDEX

__all__ = ["Normalize", "RandomScale", "eval_transforms", "pad_collate", "train_transforms"]


def _is_plain_tensor(inpt: Any) -> bool:
    # ``type(...) is`` rather than isinstance: every tv_tensor (Mask included) is a torch.Tensor subclass.
    return type(inpt) is torch.Tensor


class Normalize(v2.Transform):
    """uint8 RGB image -> the float32 tensor ``preprocessing`` describes; masks and everything else pass through.

    The arithmetic is :meth:`Preprocessing.__call__`, the same code the predictor and the checkpoint use, so
    training and inference cannot drift apart.
    """

    # A plain tensor is treated as the image only when the sample holds no tv_tensors.Image (v2's own heuristic).
    _transformed_types = (tv_tensors.Image, _is_plain_tensor)

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.preprocessing = preprocessing

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Preprocessing expects 0-255 pixels; a float image here almost always means it was normalised (or scaled
        # to [0, 1]) already, which would silently feed the model garbage.
        if inpt.dtype != torch.uint8:
            raise TypeError(f"Normalize expects a uint8 image (0-255 pixels), got {inpt.dtype}")
        out = self.preprocessing(inpt.as_subclass(torch.Tensor))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

    def extra_repr(self) -> str:
        return repr(self.preprocessing)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (one factor for both sides, so aspect is kept).

    Images use ``interpolation``; masks always use nearest-exact, which samples the source pixel whose centre is
    nearest — the same pixel-centre convention as bilinear, whereas legacy "nearest" is shifted by half a pixel.
    The factor comes from torch's RNG, so ``torch.manual_seed`` (and the loader's worker seeds) reproduce it.
    """

    def __init__(
        self,
        scale_range: tuple[float, float],
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)
        self.interpolation = interpolation
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        factor = lo + (hi - lo) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return self._call_kernel(
            F.resize, inpt, params["size"], interpolation=self.interpolation, antialias=self.antialias
        )


def train_transforms(
    preprocessing: Preprocessing,
    *,
    crop_size: int | tuple[int, int] | None = None,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    jitter: float = 0.0,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
) -> v2.Compose:
    """Random scale, horizontal mirror, random crop (padded where too small), optional colour jitter, Normalize.

    ``crop_size=None`` keeps whole images (the paper: whole images, batch 1; batch more with :func:`pad_collate`).
    ``scale_range=None`` disables scaling. ``jitter`` is the brightness/contrast/saturation strength of
    ColorJitter on the image only. ``interpolation`` is for the image (masks are always nearest).
    """
    steps: list[v2.Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range, interpolation=interpolation))
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if crop_size is not None:
        size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"crop_size must be a positive int or (height, width), got {crop_size}")
        # Padding is void in the mask, so pixels that do not exist never reach the loss. The image pad is raw 0
        # (black, before Normalize); it only enters nearby pixels' receptive fields, like any image border.
        steps.append(v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if jitter > 0:
        # No hue shift: hue is a real cue for several classes (sky, grass, water).
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    # Datasets already give int64 masks; this makes it a guarantee for anything else fed in (e.g. uint8 masks).
    steps.append(v2.ToDtype({tv_tensors.Mask: torch.int64, "others": None}))
    steps.append(Normalize(preprocessing))
    return v2.Compose(steps)


def eval_transforms(preprocessing: Preprocessing) -> Normalize:
    """Evaluation: no geometry change at all, only :class:`Normalize` (whole images at their own size)."""
    return Normalize(preprocessing)


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image C x H x W, mask H x W)`` pairs of different sizes into ``(N x C x Hmax x Wmax, N x Hmax x Wmax)``.

    Masks may also be K x H x W, one label map per head of a multi-headed model (SIFT Flow's semantic and
    geometric labels); the batch's masks are then N x K x Hmax x Wmax.

    Padding goes at the bottom and right so every image keeps its top-left origin, which is where the FCN's
    crop offsets are anchored: each image's scores stay on its own pixel grid (near the bottom/right edge the
    receptive fields see the padding instead of the network's own zero padding, a small border effect). Images are
    padded with 0, masks with 255 (void) so padded pixels add nothing to the loss or the metrics.
    """
    if len(batch) == 0:
        raise ValueError("pad_collate got an empty batch")
    channels = batch[0][0].shape[0]
    lead = tuple(batch[0][1].shape[:-2])  # () for one label map, (K,) for K heads
    for i, (image, mask) in enumerate(batch):
        if (
            image.ndim != 3
            or image.shape[0] != channels
            or mask.ndim not in (2, 3)
            or tuple(mask.shape[:-2]) != lead
            or image.shape[-2:] != mask.shape[-2:]
        ):
            raise ValueError(
                f"batch item {i}: expected image C x H x W and mask H x W (or K x H x W) of the same size, with the "
                f"same C and K for all, got {tuple(image.shape)} and {tuple(mask.shape)}"
            )
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros((len(batch), channels, height, width), dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), *lead, height, width), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, mask) in enumerate(batch):
        h, w = mask.shape[-2:]
        # as_subclass: plain tensors out, whatever tv_tensor type came in.
        images[i, :, :h, :w] = image.as_subclass(torch.Tensor)
        masks[i, ..., :h, :w] = mask.as_subclass(torch.Tensor)
    return images, masks
