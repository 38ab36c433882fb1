"""Inference on whole images: preprocessing from the model, output at the image's own size."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FcnsegError
from .imageio import add_legend, as_rgb_array, overlay, save_mask_png, save_rgb
from .io import atomic_write
from .palette import palette_for


def model_input(model: nn.Module, image: Any) -> torch.Tensor:
    """``image`` normalised for ``model``: a colour image (path, PIL image, array), or for a model of more input
    channels (colour plus depth or HHA) an H x W x C uint8 array in the model's channel order."""
    pp = model.preprocessing
    channels = getattr(model, "in_channels", pp.channels)
    if pp.channels != channels:  # e.g. a fusion net converted with a colour-only input recorded
        raise FcnsegError(
            f"the model takes {channels} input channels but its recorded input normalisation has {pp.channels}; "
            "convert or save it again with the right input (fcnseg convert --weights NAME)"
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
    x = model_input(model, image)
    run = runner or default_runner(model)
    if tile:
        from .tiling import tiled_logits

        channels = sum(head_sizes(model).values())  # every head's scores
        return tiled_logits(run, x, channels, tile=tile, overlap=overlap, align=model.stride)
    return run(x.unsqueeze(0))[0]


def head_sizes(model: nn.Module) -> dict[str, int]:
    """``{head: classes}``, in the order of the model's concatenated scores (``{"out": classes}`` for most)."""
    return dict(getattr(model, "heads", None) or {"out": model.num_classes})


def _per_head(model: nn.Module, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(head_sizes(model), logits.split(list(head_sizes(model).values()), dim=0), strict=True))


def predict_proba(model: nn.Module, image: Any, **kwargs: Any) -> np.ndarray:
    """C x H x W float32 class probabilities (keyword arguments as :func:`predict_logits`); a model of several heads
    gives each head's probabilities (each summing to 1), concatenated in head order."""
    logits = predict_logits(model, image, **kwargs)
    return torch.cat([v.softmax(0) for v in _per_head(model, logits).values()]).cpu().numpy()


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

        x = model_input(model, image)
        run = runner or default_runner(model)
        return tiled_mask(run, x, model.num_classes, tile=tile, overlap=overlap, align=model.stride)
    labels = predict_logits(model, image, runner=runner).argmax(0).cpu().numpy()
    return labels.astype(np.uint8) if model.num_classes <= 256 else labels


# ---------------------------------------------------------------------------------------------- writing masks


def output_names(model: nn.Module, stem: str, *, overlay_format: str | None = None, probs: bool = False) -> list[str]:
    """Every file name :func:`save_prediction` writes for ``stem``: the mask, and the overlay and probabilities
    when asked for, of each head of the model (the first head's under ``stem``, the others' under
    ``STEM_<head>``)."""
    names = []
    for i, head in enumerate(head_sizes(model)):
        name = _head_stem(stem, i, head)
        names.append(f"{name}.png")
        if overlay_format:
            names.append(f"{name}_overlay.{overlay_format}")
        if probs:
            names.append(f"{name}.npy")
    return names


def _head_stem(stem: str, index: int, head: str) -> str:
    return stem if index == 0 else f"{stem}_{head}"


def output_stems(files: Sequence[Path], names: Callable[[str], Sequence[str]] | None = None) -> list[str]:
    """The output name of each input: its stem, else ``STEM-2``, ``STEM-3``, ... the first under which none of the
    files it writes (``names(stem)``, default ``STEM.png``; see :func:`output_names`) is written for an earlier
    input. So two inputs of one stem (a/x.jpg, b/x.png), or an input whose stem is another's output (x.png and
    x_overlay.png, x-2.png), never write over each other's files. Names are compared case-folded, as a
    case-insensitive file system compares them."""
    names = names or (lambda stem: [f"{stem}.png"])
    taken: set[str] = set()
    stems = []
    for f in files:
        stem, n = f.stem, 1
        while any(name.casefold() in taken for name in names(stem)):
            n += 1
            stem = f"{f.stem}-{n}"
        taken.update(name.casefold() for name in names(stem))
        stems.append(stem)
    return stems


def mask_colors(model: nn.Module) -> np.ndarray:
    """The colours of the model's (first head's) classes, N x 3 uint8: its checkpoint's palette, else
    :func:`~fcnseg.palette.palette_for` its class names."""
    return np.asarray(model.palette or palette_for(model.classes, model.num_classes), np.uint8)


def head_colors(model: nn.Module) -> dict[str, np.ndarray]:
    """Each head's class colours: the first head's from :func:`mask_colors`, the others' from their class names."""
    names = getattr(model, "head_classes", None) or {}
    first, *others = head_sizes(model).items()
    colours = {first[0]: mask_colors(model)}
    colours.update({head: np.asarray(palette_for(names.get(head) or None, n), np.uint8) for head, n in others})
    return colours


def head_names(model: nn.Module) -> dict[str, list[str]]:
    """Each head's class names in index order: those recorded for it (the first head's may be ``model.classes``),
    or ``class <i>`` where none, or not as many as the head has classes, are recorded."""
    recorded = getattr(model, "head_classes", None) or {}
    names = {}
    for i, (head, n) in enumerate(head_sizes(model).items()):
        known = list(recorded.get(head) or (getattr(model, "classes", None) if i == 0 else None) or [])
        names[head] = known if len(known) == n else [f"class {k}" for k in range(n)]
    return names


def predict_heads(
    model: nn.Module, image: Any, *, probs: bool = False, **kwargs: Any
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{head: (H x W labels, C x H x W float32 probabilities or None)}`` for every head of the model, in order.

    Keywords as :func:`predict_logits`. A one-headed model without ``probs`` goes through :func:`predict_mask`
    (with ``tile``, labels band by band in bounded memory)."""
    if len(head_sizes(model)) == 1 and not probs:
        return {next(iter(head_sizes(model))): (predict_mask(model, image, **kwargs), None)}
    out = {}
    for head, scores in _per_head(model, predict_logits(model, image, **kwargs)).items():
        labels = scores.argmax(0).cpu().numpy()
        labels = labels.astype(np.uint8) if scores.shape[0] <= 256 else labels
        out[head] = (labels, scores.softmax(0).cpu().numpy().astype(np.float32) if probs else None)
    return out


def save_prediction(
    model: nn.Module,
    image: Any,
    out: str | Path,
    stem: str,
    *,
    colors: np.ndarray | None = None,
    probs: bool = False,
    overlay_on: np.ndarray | None = None,
    overlay_format: str = "jpg",
    **kwargs: Any,
) -> None:
    """Segment ``image`` and write ``out/STEM.png``, a palette mask in ``colors`` (default: :func:`mask_colors`).

    ``probs``: also ``STEM.npy``, C x H x W float32 probabilities. ``overlay_on``: also ``STEM_overlay.<format>``,
    the mask blended over this H x W x 3 image (the colour part of ``image``). Every further head of the model
    writes the same files under ``STEM_<head>`` (``STEM_geometric.png``, ...), in its classes' colours
    (:func:`head_colors`). Other keywords (``runner``, ``tile``, ``overlap``) as :func:`predict_logits`.
    """
    out = Path(out)
    colours, names = head_colors(model), head_names(model)
    if colors is not None:
        colours[next(iter(colours))] = colors
    for i, (head, (mask, p)) in enumerate(predict_heads(model, image, probs=probs, **kwargs).items()):
        name = _head_stem(stem, i, head)  # the names output_names lists
        save_mask_png(out / f"{name}.png", mask, colours[head])
        if overlay_on is not None:
            blended = add_legend(overlay(overlay_on, mask, colours[head]), mask, colours[head], names[head])
            save_rgb(out / f"{name}_overlay.{overlay_format}", blended)
        if p is not None:
            with atomic_write(out / f"{name}.npy") as f:
                np.save(f, p)
