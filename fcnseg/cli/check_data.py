"""``fcnseg check-data``: every image and mask of a dataset read, every problem reported
(:func:`fcnseg.data.check.run_check_data`)."""

from __future__ import annotations

import argparse

from ._common import add_data_option, add_dataset_flags, add_download, add_quiet


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check-data", help="read every image and mask of a dataset and report every problem")
    add_dataset_flags(
        p,
        dataset_help="dataset name (voc, sbd, seg11valid, nyud, siftflow, folder, synthetic)",
        root_help="the dataset's folder",
        split_help="only this split (default: every split, e.g. train and val; test too for nyud, synthetic)",
    )
    add_quiet(p, "no progress bar or summary; problems only")
    add_download(p)
    add_data_option(p, "modality=rgbd for nyud, target=both for siftflow", default=[])
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..data.check import run_check_data

    options = dict(args.data_option)
    return run_check_data(
        args.dataset, args.root, args.split, quiet=args.quiet, download=args.download, options=options
    )
