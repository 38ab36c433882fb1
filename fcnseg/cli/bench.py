"""``fcnseg bench``: latency, throughput, GFLOP and memory of a model on each execution path, and each path's
agreement with eager fp32 (:func:`fcnseg.bench.bench_model`)."""

from __future__ import annotations

import argparse

from ..errors import FcnsegError
from ._common import add_quiet


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="latency, throughput, GFLOP and memory of a model on each execution path")
    p.add_argument("--model", default="fcn8s", help="a registered model (default: fcn8s), as built: untrained, so "
                   "agreement is measured on jittered weights (see --no-jitter)")  # fmt: skip
    p.add_argument("--checkpoint", help="bench this checkpoint instead of --model")
    p.add_argument("--alignment", default="aligned", choices=["aligned", "caffe"],
                   help="aligned (default) or caffe: the release's padding and crops")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=21, metavar="N", help="classes of --model (default: 21)")
    p.add_argument("--size", default="375x500", help="input HEIGHTxWIDTH (default: 375x500)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="images per forward pass (default: 1)")
    p.add_argument("--paths", nargs="+", default=["eager"], metavar="PATH",
                   help="execution paths to time: eager, winograd, bf16, onnx, onnx-int8, openvino, openvino-bf16, "
                   "openvino-int8, compile, or all (every one installed; default: eager)")  # fmt: skip
    p.add_argument("--runs", type=int, default=10, metavar="N", help="timed runs per path; the median is reported "
                   "(default: 10)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed runs first (default: 2)")
    p.add_argument("--threads", type=int, metavar="N", help="torch / ONNX Runtime threads (default: torch's)")
    p.add_argument("--images", metavar="DIR", help="images for int8 calibration and the fp32 agreement check")
    p.add_argument("--no-jitter", action="store_true", help="measure agreement on the model's own weights even where "
                   "its argmax is one class everywhere (an untrained model): '-' then, with the reason")  # fmt: skip
    p.add_argument("--int8-sensitivity", action="store_true", help="also quantise each int8 layer alone and list "
                   "the layers by the agreement they cost (the first ones are the ones to keep in float); the "
                   "ranking is saved, and --runtime auto-reduced then keeps the costliest layers in float where "
                   "that is what reaches 99.5%% agreement")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_quiet(p, "no progress bars")
    p.set_defaults(func=run)
    return p


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise FcnsegError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 375x500") from None
    return h, w


def _check_inputs(model, folder: str | None):
    """The first 8 images of ``--images``, normalised for ``model`` (None without ``--images``)."""
    from ..imageio import load_image
    from ..inference import normalised
    from ._inputs import collect_inputs

    if not folder:
        return None
    files, problems = collect_inputs([folder])
    if problems:
        raise FcnsegError(f"--images {folder}: {problems[0]}")
    return normalised(model, [load_image(f) for f in files[:8]])


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import bench_model, expand_paths, format_results, write_json
    from ..hub import load
    from ..models import get_model

    args.paths = expand_paths(args.paths)  # checked before a model is built
    if args.threads:
        torch.set_num_threads(args.threads)
    size = _size(args.size)
    if args.checkpoint:
        model = load(args.checkpoint)
    else:
        model = get_model(args.model, num_classes=args.num_classes, alignment=args.alignment)
    check = _check_inputs(model, args.images)
    doc = bench_model(model, size=size, batch=args.batch, paths=args.paths, runs=args.runs, warmup=args.warmup,
                      check=check, progress=not args.quiet, checkpoint=args.checkpoint, images=args.images,
                      jitter=not args.no_jitter, sensitivity=args.int8_sensitivity)  # fmt: skip
    print(format_results(doc))
    if args.json:
        write_json(doc, args.json)
    return 0
