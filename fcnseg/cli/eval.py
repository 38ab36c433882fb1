"""``fcnseg eval``: the paper's four metrics, the per-class table and plots of a checkpoint on a dataset
(:func:`fcnseg.engine.eval_checkpoint.evaluate_checkpoint`); under ``torchrun`` the processes share the images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_data_option, add_dataset_flags, add_device, add_download, add_out, add_runtime


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: the paper's four metrics, per-class table, plots")
    p.add_argument("checkpoint", help="an fcnseg checkpoint (.pt)")
    add_dataset_flags(p, split_default="val")
    add_out(p, "folder for metrics.json, confusion.csv/.png, per_class.png")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales, e.g. 0.75 1 1.25")
    add_device(p, "auto")
    add_runtime(p, "eager (fp32), bf16, onnx, onnx-int8 (CPU) or compile")
    p.add_argument("--num-workers", type=int, default=None)
    add_download(p)
    add_data_option(p, "download=true for voc, sbd_root=DIR for seg11valid", default=[])
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine.eval_checkpoint import evaluate_checkpoint
    from ..engine.evaluate import write_report

    reports = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        root=args.root,
        split=args.split,
        data_options=dict(args.data_option),
        download=args.download,
        device=args.device,
        runtime=args.runtime,
        num_workers=args.num_workers,
        flip=args.flip,
        scales=args.scales,
    )
    for sub, (cm, names) in reports.items():  # empty on all but the main process
        write_report(cm, names, Path(args.out) / sub)
        if sub:
            print(f"{sub}:")
        print(cm.table(names))
    if reports:
        print(f"wrote metrics.json, confusion.csv, confusion.png and per_class.png to {args.out}"
              + (f" ({', '.join(f'{k}/' for k in reports)})" if len(reports) > 1 else ""))  # fmt: skip
    return 0
