"""Inference on whole images: preprocessing from the model, output at the image's own size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


def predict_logits(model: nn.Module, image: Any) -> torch.Tensor:
    """C x H x W float logits for one image (path, PIL image or array), preprocessed as the model expects."""
    rgb = as_rgb_array(image)
    x = model.preprocessing(rgb).unsqueeze(0).to(_device(model))
    with _eval_mode(model), torch.inference_mode():
        return model(x)[0].float()


def predict_proba(model: nn.Module, image: Any) -> np.ndarray:
    """C x H x W float32 class probabilities."""
    return predict_logits(model, image).softmax(0).cpu().numpy()


def predict_mask(model: nn.Module, image: Any) -> np.ndarray:
    """H x W class indices (uint8 for up to 256 classes)."""
    labels = predict_logits(model, image).argmax(0).cpu().numpy()
    return labels.astype(np.uint8) if model.num_classes <= 256 else labels
