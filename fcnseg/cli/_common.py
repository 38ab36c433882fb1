"""Flags that several commands take, each declared here once, and the one-line error of the command line.

A flag's name, type and action live here; a command passes only what it says differently (its help, a default).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import FcnsegError, clipped, shown
from ..io import load_yaml

DOWNLOAD_HELP = "fetch voc / sbd first (torchvision's downloader)"


def error(msg: str) -> None:
    """``fcnseg: error: MSG`` on stderr: how every command reports a user's mistake."""
    print(f"fcnseg: error: {msg}", file=sys.stderr)


def parse_key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(key, value)``, the value read as YAML (``size=96`` gives the int 96)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {shown(text)}")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise argparse.ArgumentTypeError(f"{shown(text)}: the value is not valid YAML ({clipped(first)})") from None


def add_data_option(
    p: argparse.ArgumentParser, examples: str, *, dest: str = "data_option", default: list | None = None
) -> None:
    """``--data-option KEY=VALUE``, repeatable: ``args.<dest>`` is a list of ``(key, value)`` pairs (``default``
    when none is given)."""
    p.add_argument(
        "--data-option",
        dest=dest,
        action="append",
        type=parse_key_value,
        default=default,
        metavar="KEY=VALUE",
        help=f"extra dataset argument, repeatable (e.g. {examples})",
    )


def add_dataset_flags(
    p: argparse.ArgumentParser,
    *,
    dataset_help: str | None = None,
    root_help: str | None = None,
    split_help: str | None = None,
    split_default: str | None = None,
) -> None:
    """``--dataset NAME`` (required), ``--root DIR`` and ``--split NAME``."""
    p.add_argument("--dataset", required=True, metavar="NAME", help=dataset_help or dataset_names_help())
    p.add_argument("--root", metavar="DIR", help=root_help or "the dataset's folder")
    default = f" (default: {split_default})" if split_default else ""
    p.add_argument("--split", default=split_default, metavar="NAME", help=(split_help or "split to read") + default)


def dataset_names_help() -> str:
    """``a registered dataset: folder, nyud, ...``, from the registry (so that it lists every one)."""
    from ..data import list_datasets

    return f"a registered dataset: {', '.join(list_datasets())}"


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)


def add_device(p: argparse.ArgumentParser, default: str, help_text: str | None = None) -> None:
    text = help_text or f"torch device: auto, cpu, cuda or cuda:N (default: {default})"
    p.add_argument("--device", default=default, help=text)


RUNTIME_HELP = (
    "auto (the fastest fp32-class path, measured once per CPU, model and size and cached), auto-reduced (may also "
    "pick bf16 or int8 where they keep 99.5%% of fp32's labels), eager (fp32), winograd (fp32, per-layer kernels), "
    "bf16, onnx, onnx-int8, openvino, openvino-bf16, openvino-int8 (fcnseg[openvino]) or compile"
)


def add_runtime(p: argparse.ArgumentParser, help_text: str = RUNTIME_HELP) -> None:
    """``--runtime PATH``: an execution path of :func:`fcnseg.runtime.make_runner` (default: auto)."""
    p.add_argument("--runtime", default="auto", metavar="PATH", help=f"{help_text} (default: auto)")


def resolve_runtime(args: argparse.Namespace, model=None, device=None) -> str:
    """``args.runtime`` with ``auto`` replaced by the path it picks (eager on a GPU), the choice and its reason
    said in one line on stderr (not with ``--quiet``). ``args.runtime`` is set to the path."""
    import torch

    from ..runtime import AUTO, resolve_path

    if args.runtime in AUTO and device is not None and torch.device(device).type != "cpu":
        path, why = "eager", f"runtime {args.runtime}: eager (the model runs on {device})"
    elif args.runtime in AUTO:
        return args.runtime  # measured on the first input, and said then (fcnseg.inference.Predictor)
    else:
        path, why = resolve_path(args.runtime, model)
    if why and not getattr(args, "quiet", False):
        print(why, file=sys.stderr)
    args.runtime = path
    return path


def add_weights(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--weights NAME``: published weights (``fcnseg weights``)."""
    p.add_argument("--weights", metavar="NAME", help=help_text)


def add_weights_file(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--weights-file FILE``: a local copy of published weights, read instead of downloaded."""
    p.add_argument("--weights-file", metavar="FILE", help=help_text)


def add_sha256(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--sha256 HEX``: the SHA-256 the weights file read must have (a pin; see fcnseg.models.weights)."""
    p.add_argument("--sha256", metavar="HEX", help=help_text)


def add_out(p: argparse.ArgumentParser, help_text: str, default: str | None = None) -> None:
    """``--out PATH``: required unless a ``default`` is given."""
    p.add_argument("--out", required=default is None, default=default, help=help_text)


def add_quiet(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--quiet", action="store_true", help=help_text)


def add_tiling(p: argparse.ArgumentParser) -> None:
    """``--tile N`` and ``--overlap PIXELS``: overlapping windows for large images (:mod:`fcnseg.tiling`)."""
    p.add_argument("--tile", type=int, metavar="N", help="run N x N windows, a multiple of 32 (large images)")
    p.add_argument("--overlap", type=int, default=64, metavar="N", help="--tile windows overlap (default: 64 px)")


def add_calibration(p: argparse.ArgumentParser, default_images: str) -> None:
    """``--calibration DIR`` and ``--calibration-images N``: what ``--runtime onnx-int8`` calibrates on."""
    help_text = f"onnx-int8: images to calibrate on (default: {default_images})"
    p.add_argument("--calibration", metavar="DIR", help=help_text)
    p.add_argument("--calibration-images", type=int, default=8, metavar="N", help="onnx-int8: how many (default: 8)")


def add_augmentation(p: argparse.ArgumentParser) -> None:
    """``--flip`` and ``--scales S [S ...]``: test-time augmentation (:class:`fcnseg.inference.Predictor`)."""
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test-time scales whose probabilities are averaged, e.g. 0.75 1 1.25 (default: 1)")  # fmt: skip


def add_batch(p: argparse.ArgumentParser, help_text: str, default: int = 1) -> None:
    """``--batch N``: images of one size run as one forward pass, up to N (checked by :func:`check_batch`)."""
    p.add_argument("--batch", type=int, default=default, metavar="N", help=help_text)


def check_batch(value: int) -> int:
    """``--batch``'s value, or an FcnsegError naming it when it is below 1."""
    if value < 1:
        raise FcnsegError(f"--batch {value}: expected at least 1 image")
    return value


def predictor_from_flags(args: argparse.Namespace, model, files: Sequence[Path] = ()):
    """The :class:`~fcnseg.inference.Predictor` the flags ask for: ``--runtime`` (``auto`` resolved and said by
    :func:`resolve_runtime`), ``--tile`` / ``--overlap``, ``--flip`` / ``--scales``;
    onnx-int8 calibrates on the ``--calibration`` images, else on the first of ``files``."""
    from ..imageio import load_image
    from ..inference import Predictor
    from ._inputs import collect_inputs

    resolve_runtime(args, model)
    calibration = []
    if args.runtime in ("onnx-int8", "openvino-int8", "auto-reduced"):
        sources, problems = collect_inputs([args.calibration]) if args.calibration else (list(files), [])
        if problems:
            raise FcnsegError(f"--calibration {args.calibration}: {problems[0]}")
        for f in sources[: args.calibration_images]:
            with contextlib.suppress(FcnsegError):  # a bad file is reported when it is predicted
                calibration.append(load_image(f))
        if not calibration and args.runtime != "auto-reduced":  # auto-reduced falls back to the first input
            raise FcnsegError(
                f"{args.runtime} needs calibration images (--calibration DIR or the images being predicted)"
            )
    options = {"tile": args.tile, "overlap": args.overlap, "flip": args.flip, "scales": args.scales,
               "batch_size": args.batch, "verbose": not getattr(args, "quiet", False)}  # fmt: skip
    return Predictor(model, runtime=args.runtime, calibration=calibration, **options)
