"""Inference on whole images: preprocessing from the model, output at the image's own size."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .imageio import as_rgb_array


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Dropout must be off for inference, but the caller's mode is theirs: restore it afterwards.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_runner(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Eager fp32 on the model's device, in eval mode for the call (the caller's mode is restored)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with _eval_mode(model), torch.inference_mode():
            return model(x.to(_device(model))).float()

    return run


def predict_logits(
    model: nn.Module,
    image: Any,
    *,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tile: int | None = None,
    overlap: int = 0,
) -> torch.Tensor:
    """C x H x W float logits for one image (path, PIL image or array), preprocessed as the model expects.

    ``runner``: an execution path from :func:`fcnseg.runtime.make_runner` (default: eager fp32). ``tile`` /
    ``overlap``: run overlapping ``tile`` x ``tile`` windows and blend them (large images).
    """
    x = model.preprocessing(as_rgb_array(image))
    run = runner or default_runner(model)
    if tile:
        from .tiling import tiled_logits

        return tiled_logits(run, x, model.num_classes, tile=tile, overlap=overlap, align=model.stride)
    return run(x.unsqueeze(0))[0]


def predict_proba(model: nn.Module, image: Any, **kwargs: Any) -> np.ndarray:
    """C x H x W float32 class probabilities (keyword arguments as :func:`predict_logits`)."""
    return predict_logits(model, image, **kwargs).softmax(0).cpu().numpy()


def predict_mask(
    model: nn.Module,
    image: Any,
    *,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tile: int | None = None,
    overlap: int = 0,
) -> np.ndarray:
    """H x W class indices (uint8 for up to 256 classes). With ``tile``, labels are made band by band, so memory
    stays bounded by the tile height, not the image."""
    if tile:
        from .tiling import tiled_mask

        x = model.preprocessing(as_rgb_array(image))
        run = runner or default_runner(model)
        return tiled_mask(run, x, model.num_classes, tile=tile, overlap=overlap, align=model.stride)
    labels = predict_logits(model, image, runner=runner).argmax(0).cpu().numpy()
    return labels.astype(np.uint8) if model.num_classes <= 256 else labels
