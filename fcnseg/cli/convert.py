"""``fcnseg convert``: torchfcn or Caffe weights as an fcnseg checkpoint (:func:`fcnseg.models.weights.import_file`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import FcnsegError
from ._common import add_out, add_sha256, add_weights


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="import torchfcn or Caffe weights into an fcnseg checkpoint")
    p.add_argument("src", help="a torchfcn state dict (.pth) or a Caffe .caffemodel")
    p.add_argument("--format", default="auto", choices=["auto", "torchfcn", "caffe"], help="default: by extension")
    add_out(p, "the fcnseg checkpoint to write (.pt)")
    p.add_argument("--model", help="fcnseg model name when the file cannot tell (torchfcn FCN8s vs FCN8sAtOnce)")
    p.add_argument("--classes", help="a text file of class names, one a line (default: VOC names for 21 classes)")
    add_weights(p, "SRC is this published file (fcnseg weights): take its classes and input")
    add_sha256(p, "refuse SRC unless its SHA-256 is HEX")
    p.set_defaults(func=run)
    return p


def _read_classes(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"--classes {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _import_options(args: argparse.Namespace) -> dict:
    from ..models.weights import get_weights

    options: dict = {"model": args.model, "classes": _read_classes(args.classes) if args.classes else None}
    if args.weights:  # a published file converted by hand: the entry knows its model, classes and input
        entry = get_weights(args.weights).value
        options = {"model": args.model or entry.model, "classes": options["classes"] or entry.classes}
        options.update(preprocessing=entry.preprocessing, head_classes=entry.head_classes)
    return options


def _save(ckpt: dict, out: Path) -> None:
    import torch

    from ..io import atomic_write

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:
            torch.save(ckpt, f)
    except OSError as e:
        raise FcnsegError(f"--out {out}: cannot write ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    from ..hub import import_file
    from ..models.weights import sha256_pin, verify_hash

    if args.sha256 is not None and Path(args.src).is_file():
        verify_hash(args.src, sha256=sha256_pin(args.sha256))
    try:
        ckpt = import_file(args.src, args.format, **_import_options(args))
    except FcnsegError as e:
        if args.classes and str(e).startswith("classes:"):  # a count that does not fit the weights
            raise FcnsegError(f"--classes {args.classes}: {str(e).removeprefix('classes: ')}") from None
        raise
    out = Path(args.out)
    _save(ckpt, out)
    if ckpt["extra"].get("assumed_input"):
        print(f"fcnseg: note: {args.src}: {ckpt['extra']['assumed_input']}", file=sys.stderr)
    n = sum(v.numel() for v in ckpt["state_dict"].values())
    print(f"wrote {out}: {ckpt['model']} ({ckpt['alignment']} alignment), {ckpt['num_classes']} classes, "
          f"{n:,} parameters, input {ckpt['preprocessing']['channel_order']}")  # fmt: skip
    return 0
