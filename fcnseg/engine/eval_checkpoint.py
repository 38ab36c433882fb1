"""A checkpoint evaluated on a dataset (``fcnseg eval``): one confusion matrix per head, over every process.

Under ``torchrun`` each process evaluates its shard of the images and the matrices are summed across processes;
the per-image scores that pick the report's worst and best images are gathered from every process.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data import get_dataset
from ..data.base import SegmentationDataset, check_data_options
from ..data.loader import make_loader
from ..data.transforms import eval_transforms
from ..device import pick_device
from ..errors import FcnsegError
from ..hub import load
from ..inference import Predictor
from ..metrics import ConfusionMatrix
from ..models.base import SegmentationModel
from ..runtime import AUTO, resolve_path
from .distributed import DistInfo, ShardSampler, cleanup_distributed, init_distributed
from .evaluate import ImageCallback, evaluate_heads
from .examples import Examples, ImageScores, find_examples
from .train import excluded_indices, head_classes

Reports = dict[str, tuple[ConfusionMatrix, list[str]]]


class HeadReport(NamedTuple):
    """One head's evaluation: its confusion matrix, class names and colours, and (when asked for) its worst and
    best images."""

    cm: ConfusionMatrix
    classes: list[str]
    colors: np.ndarray  # classes x 3 uint8: the model's palette
    examples: Examples | None


def dataset_predictor(model: SegmentationModel, runtime: str, ds: SegmentationDataset, **options: Any) -> Predictor:
    """The :class:`~fcnseg.inference.Predictor` of ``model`` on ``runtime`` (``auto`` resolved), int8 calibrated on
    the set's first 8 images; ``options``: tiling and test-time augmentation."""
    if runtime not in AUTO or next(model.parameters()).device.type != "cpu":
        runtime, _ = resolve_path(runtime, model)  # auto on the CPU is measured on the first image instead
    first = range(min(8, len(ds))) if runtime in ("onnx-int8", "openvino-int8", "auto-reduced") else range(0)
    calibration = [ds[i][0].as_subclass(torch.Tensor).unsqueeze(0) for i in first]
    return Predictor(model, runtime=runtime, calibration=calibration, **options)


def _describe(heads: Mapping[str, int]) -> str:
    if len(heads) == 1:
        return f"{next(iter(heads.values()))} classes"
    return " and ".join(f"{n} {k} classes" for k, n in heads.items())


def check_fits(model: nn.Module, ds: SegmentationDataset, source: str, dataset: str) -> None:
    """The model (from ``source``) predicts the heads and classes ``ds`` (named ``dataset``) labels, and takes its
    input channels; else an FcnsegError saying what differs."""
    heads = head_classes(ds)
    model_heads = model.heads
    if list(model_heads.values()) != [len(names) for names in heads.values()]:
        raise FcnsegError(
            f"{source}: model predicts {_describe(model_heads)} but --dataset {dataset} gives "
            f"{_describe({k: len(v) for k, v in heads.items()})}"
        )
    channels = getattr(ds, "channels", 3)
    if model.in_channels != channels:
        raise FcnsegError(
            f"{source}: model takes {model.in_channels} input channels but --dataset {dataset} gives "
            f"{channels}; expected the --data-option modality it was trained on"
        )


def evaluate_dataset(
    model: nn.Module,
    ds: SegmentationDataset,
    loader: Any,
    *,
    device: torch.device | str = "cpu",
    predictor: Predictor | None = None,
    on_image: ImageCallback | None = None,
) -> Reports:
    """``{report subfolder: (confusion matrix, class names)}``, one per head: the subfolder is ``""`` for a
    one-headed model (its report goes in the output folder itself) and the head's name otherwise. ``predictor``
    and ``on_image``: as :func:`~fcnseg.engine.evaluate.evaluate_heads`'s."""
    heads = head_classes(ds)
    kwargs = {"device": device, "exclude": excluded_indices(ds), "predictor": predictor}
    cms = evaluate_heads(model, loader, heads, on_image=on_image, **kwargs)
    return {("" if len(cms) == 1 else name): (cm, list(heads[name])) for name, cm in cms.items()}


def _examples(
    model: nn.Module, ds: SegmentationDataset, scores: ImageScores | None, n: int, info: DistInfo, **kwargs: Any
) -> dict[str, Examples]:
    """On the main process, each head's ``n`` worst and best images over the scores of every process."""
    if scores is None:
        return {}
    gathered = scores.gathered()  # a collective: every process takes part
    return find_examples(model, ds, gathered, n, **kwargs) if info.is_main else {}


def evaluate_checkpoint(
    checkpoint: str,
    dataset: str,
    *,
    root: str | None = None,
    split: str = "val",
    data_options: Mapping[str, Any] | None = None,
    download: bool = False,
    device: str = "auto",
    runtime: str = "eager",
    num_workers: int | None = None,
    prediction: Mapping[str, Any] | None = None,
    report_images: int = 0,
    progress: bool = False,
) -> dict[str, HeadReport]:
    """Evaluate ``checkpoint`` on ``dataset``'s ``split`` (:func:`evaluate_dataset`, after :func:`check_fits`).

    Returns ``{report subfolder: HeadReport}`` on the main process and ``{}`` on the others (under ``torchrun``).
    ``device``: a torch device or ``auto``; ``runtime``: an execution path (:func:`fcnseg.runtime.make_runner`);
    ``prediction``: test-time augmentation and tiling (``flip``, ``scales``, ``tile``, ``overlap``), keywords of
    :class:`~fcnseg.inference.Predictor`;
    ``report_images``: how many worst and best images each head's report shows (0: none, nothing recorded);
    ``progress``: a progress bar on stderr (main process only)."""
    check_data_options(dict(data_options or {}))
    options = {**(data_options or {}), **({"download": True} if download else {})}
    dev = pick_device(device)
    info = init_distributed(dev.type)
    try:
        model = load(checkpoint, map_location=dev)
        transforms = eval_transforms(model.preprocessing)
        ds = get_dataset(dataset, root=root, split=split, transforms=transforms, **options)
        check_fits(model, ds, checkpoint, dataset)
        sampler = ShardSampler(len(ds), info)
        loader = make_loader(ds, batch_size=1, sampler=sampler, num_workers=num_workers)
        show = progress and info.is_main
        loader = tqdm(loader, desc="eval", unit="img", disable=not show, file=sys.stderr, total=len(sampler))
        kwargs = {"device": dev, "predictor": dataset_predictor(model, runtime, ds, **(prediction or {}))}
        scores = ImageScores(sampler.indices) if report_images else None
        with torch.inference_mode():
            reports = evaluate_dataset(model, ds, loader, on_image=scores, **kwargs)
            examples = _examples(model, ds, scores, report_images, info, **kwargs)
    finally:
        cleanup_distributed()
    if not info.is_main:
        return {}
    palettes = model.class_colors().values()
    return {
        sub: HeadReport(cm, names, colors, examples.get(head))
        for (sub, (cm, names)), head, colors in zip(reports.items(), head_classes(ds), palettes, strict=True)
    }
