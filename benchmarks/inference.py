"""Median CPU latency and GFLOP of FCN-32s/16s/8s in both alignment modes (eager fp32, random weights).

python benchmarks/inference.py                 # 375 x 500, 2 threads, 5 timed runs each
python benchmarks/inference.py --runs 3 --size 224 224 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import fcnseg
from fcnseg.bench import count_gflop
from fcnseg.runtime.timing import time_ms


def latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    with torch.inference_mode():
        return time_ms(lambda: model(x), runs, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["fcn32s", "fcn16s", "fcn8s"])
    ap.add_argument("--modes", nargs="+", default=["caffe", "aligned"])
    ap.add_argument("--size", nargs=2, type=int, default=[375, 500], metavar=("H", "W"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 3, *args.size)
    print(
        f"torch {torch.__version__}, {args.threads} threads, input {args.size[0]}x{args.size[1]}, "
        f"median of {args.runs} after {args.warmup} warm-up"
    )
    print(f"{'model':<8} {'mode':<8} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'GFLOP':>7} {'GFLOP/s':>8}")
    rows = []
    for name in args.models:
        for mode in args.modes:
            model = fcnseg.get_model(name, num_classes=21, alignment=mode).eval()
            flops = count_gflop(model, x)
            t = latency_ms(model, x, args.runs, args.warmup)
            med = statistics.median(t)
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "median_ms": med,
                    "min_ms": min(t),
                    "max_ms": max(t),
                    "gflop": flops,
                }
            )
            print(
                f"{name:<8} {mode:<8} {med:>10.1f} {min(t):>8.1f} {max(t):>8.1f} {flops:>7.1f} "
                f"{flops / med * 1e3:>8.1f}",
                flush=True,
            )
    for name in args.models:
        by_mode = {r["mode"]: r["median_ms"] for r in rows if r["model"] == name}
        if {"caffe", "aligned"} <= set(by_mode):
            print(f"{name}: aligned is {by_mode['caffe'] / by_mode['aligned']:.2f}x faster than caffe mode")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
