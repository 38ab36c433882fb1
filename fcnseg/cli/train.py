"""``fcnseg train``: one flag per :class:`~fcnseg.engine.config.TrainConfig` field, then
:func:`fcnseg.engine.train.train`."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from ..engine.config import RUN_WRITTEN, TrainConfig, _paper, layered_config
from ._common import add_data_option, dataset_names_help, parse_key_value

_HELP = {
    "root": "dataset folder",
    "model": "registered model (fcnseg models)",
    "preset": "paper (the release's recipe) or modern",
    "iters": "optimiser steps",
    "out": "run folder: config.yaml, last.pt, best.pt, log.csv, tensorboard/",
    "resume": "continue the run in --out from its last.pt",
    "init_from": "checkpoint of a coarser net to start from (32s -> 16s -> 8s), published weights, or hf:USER/NAME",
    "accum_steps": "micro-batches per optimiser step (gradient accumulation)",
    "val_every": "validate and checkpoint every N iterations",
    "val_images": "validate on the first N images only",
    "crop_size": "random crop side in pixels; 0 = whole images",
    "fc_dim": "fc6/fc7 channels, VGG16 and AlexNet only (default: the builder's, 4096)",
    "batch_norm": "batch norm after every convolution, VGG16 only (default: off)",
    "dropout": "dropout after fc6 and fc7, VGG16 and AlexNet only (default: the builder's, 0.5)",
    "amp": "mixed precision. GPU: bf16 autocast (fp16 with loss scaling where the GPU lacks bf16). CPU: bf16 autocast "
    "where the CPU computes bf16 natively (AVX-512 BF16 or AMX), else fp32 (emulated bf16 is slower); the weights "
    "stay fp32 and the run says which precision it trains in",
    "conv_kernels": "CPU convolutions: auto (each layer on the oneDNN, NNPACK or GEMM kernel whose forward and "
    "backward measure fastest, where the CPU has AVX2 and FMA; under bf16 --amp oneDNN's bf16 or the GEMM in fp32), "
    "measured (on any CPU) or onednn",
    "num_workers": "data loading processes (default: up to 2, as the CPU allows)",
    "check_data": "before the run: every image has its mask, every file decodes, sizes match",
    "backbone_weights": "torchvision IMAGENET1K_V1 / IMAGENET1K_FEATURES / DEFAULT, CAFFE, or a VGG16 state-dict file",
    "loss": "ce (cross-entropy), focal (Lin et al. 2017), dice (soft Dice over the batch, Milletari et al. 2016) or "
    "lovasz (Lovasz-Softmax per image, Berman et al. 2018); sum or mean, the former spelling, set --loss-reduction "
    "with ce",
    "loss_reduction": "sum (the paper's unnormalised loss) or mean (over the step's valid pixels)",
    "focal_gamma": "focal loss exponent: -(1-p)^gamma log p",
    "class_weights": "none, median-freq (Eigen & Fergus 2015, computed once from the training masks) or a file: a "
    "JSON list or one number per line, one per class; saved as RUN/class_weights.json",
}
_DATA_OPTION_EXAMPLES = "size=96 for synthetic, year=2011 for voc"


def _field_types(annotation: Any) -> list[Any]:
    """The types a field's annotation allows, None left out (``int | None`` gives ``[int]``)."""
    union = isinstance(annotation, types.UnionType)
    return [t for t in (typing.get_args(annotation) if union else (annotation,)) if t is not type(None)]


def _option_fields() -> list[dataclasses.Field]:
    """The fields a flag sets: all but those the run fills in for the record (the class weights' values)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in RUN_WRITTEN]


def _mapping_fields() -> list[str]:
    """The fields that hold a mapping (``data_options``): a repeatable ``KEY=VALUE`` flag each."""
    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in _option_fields() if _field_types(hints[f.name]) == [dict]]


def _help(f: dataclasses.Field, preset_field: bool) -> str:
    default = f.default if f.default is not dataclasses.MISSING else None
    suffix = " (default: from --preset)" if preset_field else f" (default: {default})" if default is not None else ""
    text = dataset_names_help() if f.name == "dataset" else _HELP.get(f.name, "")
    return text + suffix


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, kinds: list[Any], help_text: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    if kinds == [dict] and f.name == "data_options":
        add_data_option(p, _DATA_OPTION_EXAMPLES, dest=f.name)
    elif kinds == [dict]:  # FOO_options: --FOO-option KEY=VALUE, repeatable
        key_values = {"action": "append", "type": parse_key_value, "metavar": "KEY=VALUE"}
        p.add_argument(flag.removesuffix("s"), dest=f.name, help=help_text, **key_values)
    elif kinds == [bool]:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        p.add_argument(flag, type=kinds[0], default=None, metavar=f.name.upper(), help=help_text)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``); unset flags stay None."""
    p.add_argument("--config", help="YAML file of options (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    preset_fields = _paper(TrainConfig())
    for f in _option_fields():
        _add_field(p, f, _field_types(hints[f.name]), _help(f, f.name in preset_fields))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a model (paper or modern recipe)")
    add_train_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < saved run config (with --resume) < YAML file < flags typed on the command line."""
    given = {f.name: getattr(args, f.name) for f in _option_fields() if getattr(args, f.name) is not None}
    for name in _mapping_fields():  # repeated KEY=VALUE pairs
        if name in given:
            given[name] = dict(given[name])
    return layered_config(given, args.config)


def _summary(state: Any, out: str) -> str:
    last = state.history[-1]
    # A two-headed model's other heads: their pixel accuracy (the paper reports SIFT Flow's geometric one).
    others = "".join(
        f", {k.split('/')[0]} pixel acc {100 * v:.2f}" for k, v in last.items() if k.endswith("/pixel_acc")
    )
    return (
        f"iteration {state.iteration}: mean IU {100 * last['mean_iu']:.2f}, pixel acc {100 * last['pixel_acc']:.2f}"
        f"{others} (best mean IU {100 * state.best_miou:.2f}); checkpoints in {out}"
    )


def run(args: argparse.Namespace) -> int:
    from ..engine.train import train

    state = train(config_from_args(args))
    if state.history:
        print(_summary(state, args.out or TrainConfig.out))
    return 0
