"""``fcnseg eval``: the paper's four metrics, the per-class table and plots of a checkpoint on a dataset
(:func:`fcnseg.engine.eval_checkpoint.evaluate_checkpoint`), and ``report.html``, the same on one page with the
worst and best images (:mod:`fcnseg.engine.report`); under ``torchrun`` the processes share the images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FcnsegError
from ._common import (
    add_augmentation,
    add_data_option,
    add_dataset_flags,
    add_device,
    add_download,
    add_out,
    add_quiet,
    add_runtime,
    add_tiling,
    resolve_runtime,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint: the paper's four metrics, per-class table, plots")
    p.add_argument("checkpoint", help="an fcnseg checkpoint (.pt)")
    add_dataset_flags(p, split_default="val")
    add_out(p, "folder for metrics.json, confusion.csv/.png, per_class.png and report.html")
    add_augmentation(p)
    add_tiling(p)
    add_device(p, "auto")
    add_runtime(p)
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="data loading processes (default: up to 2, as the CPU allows)")  # fmt: skip
    add_quiet(p, "no progress bar")
    report_help = "report.html shows the N worst and N best images by their mean IU (default: 4; 0: none)"
    p.add_argument("--report-images", type=int, default=4, metavar="N", help=report_help)
    add_download(p)
    add_data_option(p, "download=true for voc, sbd_root=DIR for seg11valid", default=[])
    p.set_defaults(func=run)
    return p


def _context(args: argparse.Namespace, head: str) -> dict[str, str]:
    """What the report says was evaluated, and how."""
    from .. import __version__

    tta = ["mirror"] if args.flip else []
    if tuple(args.scales) != (1.0,):
        tta.append("scales " + " ".join(f"{s:g}" for s in args.scales))
    return {
        "checkpoint": str(args.checkpoint),
        "dataset": f"{args.dataset}, split {args.split}" + (f", root {args.root}" if args.root else ""),
        **({"head": head} if head else {}),
        "runtime": args.runtime,
        "test-time augmentation": ", ".join(tta) or "none",
        **({"tiling": f"{args.tile} x {args.tile} windows, overlap {args.overlap}"} if args.tile else {}),
        "fcnseg": __version__,
    }


def run(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from ..engine.eval_checkpoint import evaluate_checkpoint
    from ..engine.evaluate import write_report
    from ..engine.report import run_log, write_html_report

    if args.report_images < 0:
        raise FcnsegError(f"--report-images {args.report_images}: expected 0 or more images")
    resolve_runtime(args, device=pick_device(args.device))
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
        prediction={"flip": args.flip, "scales": args.scales, "tile": args.tile, "overlap": args.overlap},
        report_images=args.report_images,
        progress=not args.quiet,
    )
    pages = []
    for sub, head in reports.items():  # empty on all but the main process
        evaluated_on = {"dataset": args.dataset, "split": args.split}
        doc = write_report(head.cm, head.classes, Path(args.out) / sub, evaluated_on=evaluated_on)
        title = f"{args.checkpoint} on {args.dataset} {args.split}" + (f": {sub}" if sub else "")
        page = write_html_report(
            Path(args.out) / sub,
            doc=doc,
            cm=head.cm,
            colors=head.colors,
            examples=head.examples,
            log=run_log(args.checkpoint),
            title=title,
            context=_context(args, sub),
            first_head=next(iter(reports)),
        )
        pages.append(page)
        if sub:
            print(f"{sub}:")
        print(head.cm.table(head.classes))
    if reports:
        print(f"wrote metrics.json, confusion.csv, confusion.png, per_class.png and report.html to {args.out}"
              + (f" ({', '.join(f'{k}/' for k in reports)})" if len(reports) > 1 else ""))  # fmt: skip
        print("report: " + ", ".join(str(p) for p in pages))
    return 0
