"""The ``train`` and ``eval`` commands: flags generated from :class:`TrainConfig`, and the evaluation report."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import FcnsegError
from .config import TrainConfig, _paper

_HELP = {
    "dataset": "dataset name (voc, sbd, seg11valid, folder, synthetic)",
    "root": "dataset folder",
    "model": "registered model (fcnseg models)",
    "preset": "paper (the release's recipe) or modern",
    "iters": "optimiser steps",
    "out": "run folder: config.yaml, last.pt, best.pt, log.csv, tensorboard/",
    "resume": "continue the run in --out from its last.pt",
    "init_from": "checkpoint of a coarser net to start from (32s -> 16s -> 8s), or published weights by name",
    "accum_steps": "micro-batches per optimiser step (gradient accumulation)",
    "val_every": "validate and checkpoint every N iterations",
    "val_images": "validate on the first N images only",
    "crop_size": "random crop side in pixels; 0 = whole images",
    "backbone_weights": "torchvision IMAGENET1K_V1 / IMAGENET1K_FEATURES / DEFAULT, CAFFE, or a VGG16 state-dict file",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``); unset flags stay None."""
    p.add_argument("--config", help="YAML file of options (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        ann = hints[f.name]
        options = [
            t for t in (typing.get_args(ann) if isinstance(ann, types.UnionType) else (ann,)) if t is not type(None)
        ]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        preset_field = f.name in _paper(TrainConfig())
        suffix = (
            " (default: from --preset)" if preset_field else f" (default: {default})" if default is not None else ""
        )
        help_text = _HELP.get(f.name, "") + suffix
        if options == [dict]:
            p.add_argument(
                "--data-option",
                dest=f.name,
                action="append",
                metavar="KEY=VALUE",
                type=parse_key_value,
                help="extra dataset argument, repeatable (e.g. size=96 for synthetic, year=2011 for voc)",
            )
        elif options == [bool]:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=options[0], default=None, metavar=f.name.upper(), help=help_text)


def parse_key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < saved run config (with --resume) < YAML file < flags typed on the command line."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    from_file = TrainConfig.from_yaml(args.config) if args.config else {}
    if "data_options" in given:  # repeated --data-option KEY=VALUE pairs
        given["data_options"] = dict(given["data_options"])
    merged: dict[str, Any] = {**from_file, **given}
    if merged.get("resume"):
        saved = Path(merged.get("out", TrainConfig.out)) / "config.yaml"
        if not saved.is_file():
            raise FcnsegError(f"--resume: {saved} not found; nothing to resume")
        base = yaml.safe_load(saved.read_text())
        base = {k: v for k, v in base.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
        merged = {**base, **merged}
    return TrainConfig(**merged)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    state = train(config_from_args(args))
    if state.history:
        last = state.history[-1]
        # A two-headed model's other heads: their pixel accuracy (the paper reports SIFT Flow's geometric one).
        others = "".join(
            f", {k.split('/')[0]} pixel acc {100 * v:.2f}" for k, v in last.items() if k.endswith("/pixel_acc")
        )
        print(
            f"iteration {state.iteration}: mean IU {100 * last['mean_iu']:.2f}, pixel acc {100 * last['pixel_acc']:.2f}"
            f"{others} (best mean IU {100 * state.best_miou:.2f}); checkpoints in {args.out or TrainConfig.out}"
        )
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an fcnseg checkpoint (.pt)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="folder for metrics.json, confusion.csv/.png, per_class.png")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales, e.g. 0.75 1 1.25")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="eager", help="eager (fp32), bf16, onnx, onnx-int8 (CPU) or compile")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--download", action="store_true", help="fetch voc / sbd first (torchvision's downloader)")
    p.add_argument(
        "--data-option", action="append", type=parse_key_value, default=[], metavar="KEY=VALUE",
        help="extra dataset argument, repeatable (e.g. download=true for voc, sbd_root=DIR for seg11valid)",
    )  # fmt: skip


def _eval_runner(runtime: str, model, ds):
    """None for eager; otherwise the execution path, int8 calibrated on the set's first 8 images."""
    import torch

    from ..runtime import check_path, make_runner

    if check_path(runtime) == "eager":
        return None
    first = range(min(8, len(ds))) if runtime == "onnx-int8" else range(0)
    calibration = [ds[i][0].as_subclass(torch.Tensor).unsqueeze(0) for i in first]
    return make_runner(model, runtime, calibration=calibration)


def _check_fits(args: argparse.Namespace, model, ds) -> None:
    from .train import head_classes

    heads = head_classes(ds)
    model_heads = getattr(model, "heads", {"out": model.num_classes})
    if len(model_heads) != len(heads) or list(model_heads.values())[0] != len(next(iter(heads.values()))):
        raise FcnsegError(
            f"{args.checkpoint}: model predicts {_describe(model_heads)} but --dataset {args.dataset} gives "
            f"{_describe({k: len(v) for k, v in heads.items()})}"
        )
    channels = getattr(ds, "channels", 3)
    if model.in_channels != channels:
        raise FcnsegError(
            f"{args.checkpoint}: model takes {model.in_channels} input channels but --dataset {args.dataset} gives "
            f"{channels}; expected the --data-option modality it was trained on"
        )


def _describe(heads: dict[str, int]) -> str:
    if len(heads) == 1:
        return f"{next(iter(heads.values()))} classes"
    return " and ".join(f"{n} {k} classes" for k, n in heads.items())


def _evaluate_all(args: argparse.Namespace, model, ds, loader, runner, device) -> dict:
    """``{report subfolder: (confusion matrix, class names)}``: one for most models, one per head otherwise."""
    from .evaluate import evaluate, evaluate_heads
    from .train import excluded_indices, head_classes

    heads = head_classes(ds)
    exclude = excluded_indices(ds)
    if len(heads) > 1:
        if args.flip or tuple(args.scales) != (1.0,):
            raise FcnsegError("--flip / --scales: test-time augmentation is for one-headed models")
        cms = evaluate_heads(model, loader, heads, device=device, exclude=exclude, runner=runner)
        return {name: (cm, list(heads[name])) for name, cm in cms.items()}
    names = list(ds.classes)
    cm = evaluate(
        model,
        loader,
        ds.num_classes,
        device=device,
        flip=args.flip,
        scales=args.scales,
        class_names=names,
        runner=runner,
        exclude=exclude.get(next(iter(heads)), ()),
    )
    return {"": (cm, names)}


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import get_dataset
    from ..data.base import check_data_options
    from ..data.loader import make_loader
    from ..data.transforms import eval_transforms
    from ..hub import load
    from .distributed import DistInfo, ShardSampler, cleanup_distributed, init_distributed
    from .evaluate import write_report
    from .train import pick_device

    check_data_options(dict(args.data_option))
    device = pick_device(args.device)
    info: DistInfo = init_distributed(device.type)
    try:
        model = load(args.checkpoint, map_location=device)
        ds = get_dataset(
            args.dataset,
            root=args.root,
            split=args.split,
            transforms=eval_transforms(model.preprocessing),
            **{**dict(args.data_option), **({"download": True} if args.download else {})},
        )
        _check_fits(args, model, ds)
        loader = make_loader(ds, batch_size=1, sampler=ShardSampler(len(ds), info), num_workers=args.num_workers)
        runner = _eval_runner(args.runtime, model, ds)
        with torch.inference_mode():
            reports = _evaluate_all(args, model, ds, loader, runner, device)
        if info.is_main:
            for sub, (cm, names) in reports.items():
                write_report(cm, names, Path(args.out) / sub)
                if sub:
                    print(f"{sub}:")
                print(cm.table(names))
            print(f"wrote metrics.json, confusion.csv, confusion.png and per_class.png to {args.out}"
                  + (f" ({', '.join(f'{k}/' for k in reports)})" if len(reports) > 1 else ""))  # fmt: skip
    finally:
        cleanup_distributed()
    return 0
