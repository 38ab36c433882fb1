"""``fcnseg demo``: FCN-32s, 16s and 8s trained and evaluated on synthetic data (:mod:`fcnseg.engine.demo`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._common import add_out, add_quiet


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train and evaluate FCN-32s/16s/8s on synthetic data")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (about a minute)")
    add_out(p, "output folder (default: runs/demo)", default="runs/demo")
    add_quiet(p, "no progress bars")
    p.set_defaults(func=run)
    return p


_IMPORTED = time.perf_counter()


def process_seconds() -> float:
    """Seconds since this process started (what ``time fcnseg demo`` reports as real time, start-up included):
    from /proc where Linux has it, else since this module was imported."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def run(args: argparse.Namespace) -> int:
    from ..engine.demo import describe, format_table, run_demo

    results = run_demo(args.out, quick=args.quick, progress=not args.quiet)
    out = Path(args.out)
    print()
    print(format_table(results))
    print(
        f"\n{describe(args.quick)}; {'quick' if args.quick else 'full'} run: {process_seconds():.0f} s in all, "
        "start-up included (the time column: each stage's training and evaluation).\n"
        f"checkpoints: {out}/<model>/best.pt; evaluation reports: {out}/<model>/eval/; "
        f"pictures: {out}/predictions.png, {out}/comparison.png; every model's metrics: {out}/results.json\n"
        f"report (FCN-8s on one page, with its worst and best images): {out / 'fcn8s' / 'eval' / 'report.html'}"
    )
    return 0
