"""``fcnseg export``: a checkpoint as ONNX or TorchScript, checked against PyTorch (:func:`fcnseg.export.export`)."""

from __future__ import annotations

import argparse

from ._common import add_out, add_sha256, add_weights_file


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX or TorchScript (checked against PyTorch)")
    p.add_argument("checkpoint", help="an fcnseg checkpoint (.pt) or published weights name")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="onnx or torchscript")
    add_out(p, "the file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    add_weights_file(p, "a local copy of the published weights file")
    add_sha256(p, "refuse the checkpoint or weights file unless its SHA-256 is HEX")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..export import export
    from ..hub import load

    model = load(args.checkpoint, file=args.weights_file, sha256=args.sha256)
    report = export(model, args.out, args.format, opset=args.opset)
    sizes = ", ".join(f"{k} {v:.1e}" for k, v in report.max_rel_diff.items())
    opset = f", opset {report.opset}" if report.opset else ""
    print(f"wrote {report.path} ({report.format}{opset}, any input height and width); "
          f"max |exported - eager| / logit range: {sizes}")  # fmt: skip
    return 0
