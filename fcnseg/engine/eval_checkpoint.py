"""A checkpoint evaluated on a dataset (``fcnseg eval``): one confusion matrix per head, over every process.

Under ``torchrun`` each process evaluates its shard of the images and the matrices are summed across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import get_dataset
from ..data.base import SegmentationDataset, check_data_options
from ..data.loader import make_loader
from ..data.transforms import eval_transforms
from ..device import pick_device
from ..errors import FcnsegError
from ..hub import load
from ..metrics import ConfusionMatrix
from ..runtime import check_path, make_runner
from .distributed import ShardSampler, cleanup_distributed, init_distributed
from .evaluate import evaluate_heads
from .train import excluded_indices, head_classes

Reports = dict[str, tuple[ConfusionMatrix, list[str]]]


def dataset_runner(model: nn.Module, runtime: str, ds: SegmentationDataset) -> Callable | None:
    """None for eager; otherwise the execution path, int8 calibrated on the set's first 8 images."""
    if check_path(runtime) == "eager":
        return None
    first = range(min(8, len(ds))) if runtime == "onnx-int8" else range(0)
    calibration = [ds[i][0].as_subclass(torch.Tensor).unsqueeze(0) for i in first]
    return make_runner(model, runtime, calibration=calibration)


def _describe(heads: Mapping[str, int]) -> str:
    if len(heads) == 1:
        return f"{next(iter(heads.values()))} classes"
    return " and ".join(f"{n} {k} classes" for k, n in heads.items())


def check_fits(model: nn.Module, ds: SegmentationDataset, source: str, dataset: str) -> None:
    """The model (from ``source``) predicts the heads and classes ``ds`` (named ``dataset``) labels, and takes its
    input channels; else an FcnsegError saying what differs."""
    heads = head_classes(ds)
    model_heads = getattr(model, "heads", {"out": model.num_classes})
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
    runner: Callable | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Reports:
    """``{report subfolder: (confusion matrix, class names)}``, one per head: the subfolder is ``""`` for a
    one-headed model (its report goes in the output folder itself) and the head's name otherwise."""
    heads = head_classes(ds)
    kwargs = {"device": device, "exclude": excluded_indices(ds), "runner": runner, "flip": flip, "scales": scales}
    cms = evaluate_heads(model, loader, heads, **kwargs)
    return {("" if len(cms) == 1 else name): (cm, list(heads[name])) for name, cm in cms.items()}


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
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Reports:
    """Evaluate ``checkpoint`` on ``dataset``'s ``split`` (:func:`evaluate_dataset`, after :func:`check_fits`).

    Returns the reports on the main process and ``{}`` on the others (under ``torchrun``). ``device``: a torch
    device or ``auto``; ``runtime``: an execution path (:func:`fcnseg.runtime.make_runner`)."""
    check_data_options(dict(data_options or {}))
    options = {**(data_options or {}), **({"download": True} if download else {})}
    dev = pick_device(device)
    info = init_distributed(dev.type)
    try:
        model = load(checkpoint, map_location=dev)
        transforms = eval_transforms(model.preprocessing)
        ds = get_dataset(dataset, root=root, split=split, transforms=transforms, **options)
        check_fits(model, ds, checkpoint, dataset)
        loader = make_loader(ds, batch_size=1, sampler=ShardSampler(len(ds), info), num_workers=num_workers)
        runner = dataset_runner(model, runtime, ds)
        with torch.inference_mode():
            reports = evaluate_dataset(model, ds, loader, device=dev, runner=runner, flip=flip, scales=scales)
    finally:
        cleanup_distributed()
    return reports if info.is_main else {}
