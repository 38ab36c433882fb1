"""``fcnseg weights``: the published weights fcnseg can download and convert, and whether each is cached."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("weights", help="list the published weights fcnseg can download and convert")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..models.weights import FCNWeights, cache_dir

    entries = list(FCNWeights)
    wn = max(max(len(w.id) for w in entries), 5)
    wm = max(max(len(w.value.model) for w in entries), 5)
    print(f"{'name':<{wn}} {'model':<{wm}} {'classes':>7} {'input':<7} {'mean IU':>8}  reported on / file")
    for w in entries:
        e = w.value
        dataset, m = next(iter(e.metrics.items()), ("-", {}))
        cached = "  (cached)" if (cache_dir() / e.file_name).is_file() else ""
        iu = f"{m['mean_iu']:.2f}" if m else "-"
        print(f"{w.id:<{wn}} {e.model:<{wm}} {e.num_classes:>7} {e.input:<7} {iu:>8}  "
              f"{dataset} / {e.file_name}{cached}")  # fmt: skip
    print(f"\ncache: {cache_dir()}; use: fcnseg predict --weights NAME IMAGES --out DIR, or fcnseg.load(NAME)")
    return 0
