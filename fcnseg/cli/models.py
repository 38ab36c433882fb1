"""``fcnseg models``: the registered models, their skips, trainable parameters, GFLOP and crops."""

from __future__ import annotations

import argparse

SIZE = 500  # the side of the square image the GFLOP are counted on


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list the registered models")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    print(f"fcnseg: building each model on torch's meta device to count its parameters and GFLOP at {SIZE}x{SIZE} "
          "(no weights, no memory; a few seconds)...", file=sys.stderr, flush=True)  # fmt: skip
    import torch

    from ..models import get_model, list_models
    from ..models.complexity import meta_gflop, trainable_parameters

    print(f"{'model':<26} {'skips':<24} {'trainable':>12} {f'GFLOP at {SIZE}x{SIZE}':>22}   crops (caffe mode)")
    print(f"{'':<26} {'':<24} {'':>12} {'caffe':>10} {'aligned':>11}")
    for name in list_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation time
            caffe = get_model(name, alignment="caffe")
            aligned = get_model(name, alignment="aligned")
        params = trainable_parameters(caffe)
        gflop = f"{meta_gflop(caffe, SIZE):>10.1f} {meta_gflop(aligned, SIZE):>11.1f}"
        crops = ", ".join(f"{k} {v}" for k, v in caffe.head.crop_offsets.items())
        print(f"{name:<26} {'+'.join(caffe.head.skips) or '-':<24} {params:>12,} {gflop}   {crops}", flush=True)
    return 0
