"""``fcnseg export``: a checkpoint as ONNX, TorchScript or a Triton model repository, checked against PyTorch
(:func:`fcnseg.export.export`)."""

from __future__ import annotations

import argparse

from ..errors import FcnsegError
from ._common import add_calibration, add_out, add_sha256, add_weights_file

FORMATS = ("onnx", "torchscript", "triton")
TRITON_FLAGS = {
    "name": "--name",
    "int8": "--int8",
    "calibration": "--calibration",
    "max_batch_size": "--max-batch-size",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX, TorchScript or a Triton model repository (checked against PyTorch)"
    )
    p.add_argument("checkpoint", help="an fcnseg checkpoint (.pt) or published weights name")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx, torchscript or triton (a Triton Inference Server / KServe model repository)",
    )
    add_out(p, "the file to write (--format triton: the model repository's folder; OUT/NAME/ is written)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument(
        "--name",
        metavar="NAME",
        help="triton: the model's name and folder (default: the checkpoint's file stem or weights name)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="triton: an int8 graph, quantised as --runtime onnx-int8 does, served on the CPU",
    )
    add_calibration(p, "none: --int8 needs a folder of images like those served")
    p.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help="triton: the most images Triton batches into one run (default: 8)",
    )
    add_weights_file(p, "a local copy of the published weights file")
    add_sha256(p, "refuse the checkpoint or weights file unless its SHA-256 is HEX")
    p.set_defaults(func=run)
    return p


def _triton_options(args: argparse.Namespace) -> dict:
    """The Triton flags checked before the model is read: a name fit for a folder, a repository folder that is new
    or one fcnseg wrote, a calibration folder with --int8."""
    from ..triton import check_destination, check_name, default_name

    name = check_name(args.name) if args.name is not None else default_name(args.checkpoint)
    batch = 8 if args.max_batch_size is None else args.max_batch_size
    if batch < 1:
        raise FcnsegError(f"--max-batch-size {batch}: expected at least 1")
    if args.int8 and not args.calibration:
        raise FcnsegError("--int8 needs --calibration DIR: a few images like those the model will serve")
    if args.calibration and not args.int8:
        raise FcnsegError("--calibration: only with --int8 (the fp32 graph needs no calibration)")
    check_destination(args.out, name)
    return {"name": name, "int8": args.int8, "max_batch_size": batch}


def _calibration_images(args: argparse.Namespace) -> list:
    """The first ``--calibration-images`` images of ``--calibration``, read."""
    from ..imageio import load_image
    from ._inputs import collect_inputs

    files, problems = collect_inputs([args.calibration])
    if problems:
        raise FcnsegError(f"--calibration {args.calibration}: {problems[0]}")
    if args.calibration_images < 1:
        raise FcnsegError(f"--calibration-images {args.calibration_images}: expected at least 1")
    return [load_image(f) for f in files[: args.calibration_images]]


def run(args: argparse.Namespace) -> int:
    from ..export import export
    from ..hub import load

    options: dict = {"opset": args.opset}
    if args.format == "triton":
        options.update(_triton_options(args))
    else:
        given = [flag for dest, flag in TRITON_FLAGS.items() if getattr(args, dest) not in (None, False)]
        if given:
            raise FcnsegError(f"{given[0]}: only with --format triton")
    if args.format == "triton" and args.int8:
        options["calibration"] = _calibration_images(args)
    model = load(args.checkpoint, file=args.weights_file, sha256=args.sha256)
    report = export(model, args.out, args.format, **options)
    sizes = ", ".join(f"{k} {v:.1e}" for k, v in report.max_rel_diff.items())
    opset = f", opset {report.opset}" if report.opset else ""
    if args.format == "triton":
        _say_triton(report, sizes)
        return 0
    print(f"wrote {report.path} ({report.format}{opset}, any input height and width); "
          f"max |exported - eager| / logit range: {sizes}")  # fmt: skip
    return 0


def _say_triton(report, sizes: str) -> None:
    precision = "fp32"
    if report.int8_agreement is not None:
        precision = f"int8, {100 * report.int8_agreement:.2f}% of eager's labels on the calibration images"
    print(f"wrote {report.path}/{report.version}/model.onnx and {report.path}/config.pbtxt (Triton model "
          f"{report.path.name!r}, version {report.version}, {precision}, opset {report.opset}, any input height and "
          f"width); fp32 graph's max |exported - eager| / logit range: {sizes}")  # fmt: skip
