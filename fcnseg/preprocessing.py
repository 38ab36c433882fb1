"""How pixels are turned into the tensor a model's weights expect.

Caffe-trained FCN weights expect BGR in [0, 255] minus a per-channel mean with no std scaling; torchvision ImageNet
weights expect RGB in [0, 1] with ImageNet mean and std. Feeding one the other's input is the most common cause of
all-background predictions, so the choice travels with the model and its checkpoint instead of being typed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation: ``(pixel / 255 * value_range - mean) / std`` in ``channel_order``.

    ``mean`` and ``std`` are given in the model's channel order and on the ``value_range`` scale, one value per
    input channel. The first three channels are colour; ``channel_order="BGR"`` reverses those three only, so
    channels after them (depth, HHA, as in the release's NYUDv2 readers) keep their order.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: Literal["RGB", "BGR"] = "RGB"
    value_range: float = 1.0

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if len(self.mean) != len(self.std) or len(self.mean) < 3:
            raise ValueError(f"mean and std must have one value per channel (3 or more), got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def channels(self) -> int:
        """Input channels: 3 for colour images, more for colour plus depth or HHA."""
        return len(self.mean)

    def color(self) -> Preprocessing:
        """The first three (colour) channels only."""
        return Preprocessing(self.mean[:3], self.std[:3], self.channel_order, self.value_range)

    def with_extra_channels(self, means: tuple[float, ...] | list[float]) -> Preprocessing:
        """This colour normalisation followed by channels whose means are ``means`` (on the 0-255 scale).

        The extra channels are scaled as the colour is: divided by the colour channels' average std, which is 1
        (none) for Caffe-style input and about 0.226 for ImageNet-style input, so that every channel of a fused
        input reaches the first layer on one scale.
        """
        c = self.color()
        scale = sum(c.std) / 3
        extra = tuple(m * self.value_range / 255.0 for m in means)
        return Preprocessing(c.mean + extra, c.std + (scale,) * len(extra), c.channel_order, c.value_range)

    def for_channels(self, channels: int) -> Preprocessing:
        """This input for ``channels`` channels: itself if it has them, else its colour normalisation followed by
        channels normalised like the average colour channel (until a dataset gives their own means)."""
        if channels == self.channels:
            return self
        grey = sum(self.mean[:3]) / 3 * 255.0 / self.value_range
        return self.color().with_extra_channels((grey,) * (channels - 3))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            channel_order=d.get("channel_order", "RGB"),
            value_range=float(d.get("value_range", 1.0)),
        )

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Normalise uint8 pixels: H x W x C array or N x C x H x W / C x H x W tensor -> float32 (C = channels)."""
        c = self.channels
        if isinstance(images, np.ndarray):
            if images.ndim != 3 or images.shape[2] != c:
                what = "RGB" if c == 3 else f"{c}-channel (RGB first)"
                raise ValueError(f"expected an H x W x {c} {what} array, got shape {images.shape}")
            if not images.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
                images = images.copy()
            images = torch.from_numpy(np.ascontiguousarray(images)).permute(2, 0, 1)
        if images.ndim < 3 or images.shape[-3] != c:
            raise ValueError(f"expected {c} channels (dimension -3), got shape {tuple(images.shape)}")
        x = images.to(torch.float32)
        if self.channel_order == "BGR":
            x = torch.cat([x[..., :3, :, :].flip(-3), x[..., 3:, :, :]], dim=-3) if c > 3 else x.flip(-3)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(c, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(c, 1, 1)
        return (x * (self.value_range / 255.0) - mean) / std


IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""torchvision's ImageNet weights: RGB in [0, 1], ImageNet mean and std."""

CAFFE = Preprocessing(
    mean=(104.00699, 116.66877, 122.67892),
    std=(1.0, 1.0, 1.0),
    channel_order="BGR",
    value_range=255.0,
)
"""The Caffe FCN release: BGR in [0, 255] minus the ILSVRC mean, no std scaling."""
