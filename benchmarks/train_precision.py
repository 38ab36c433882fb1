"""Training in bf16 autocast against fp32 on the CPU: the time of one training step, and the loss curves.

python benchmarks/train_precision.py                          # both parts, the defaults below (~15 min on 2 cores)
python benchmarks/train_precision.py --part step --rounds 3   # step time only (~2 min)
python benchmarks/train_precision.py --part curves --iters 200 --seeds 0 1 2 --control --plot docs/train-precision.png

Step: forward + backward + optimiser step of FCN-8s at 320 x 320, batch 1, summed cross-entropy (the release's loss),
for torchfcn's FCN8s (He-random weights) and fcnseg as ``fcnseg train`` steps it (benchmarks/vs_torchfcn.py's
``training_steps``): fp32 on oneDNN, fp32 on the measured kernels (fcnseg.runtime.kernels), and bf16 autocast, the
step ``fcnseg train --amp`` takes on a CPU with native bf16: NHWC activations, the forward under
``torch.autocast("cpu", dtype=torch.bfloat16)`` with each layer on oneDNN's bf16 convolution or an fp32 GEMM as
measured, the loss on fp32 logits, the weights and the fused SGD step in fp32. Each round runs every
contender once in turn, so that slow drifts of the machine hit all alike; the table shows medians and minima and the
speed-up over torchfcn. On a machine shared with other work, ``--clock process`` times CPU time instead.

Curves: the demo's first stage (``fcnseg demo --quick``: FCN-32s at width 1/4 from scratch on the synthetic shapes,
AdamW) trained by ``fcnseg.engine.train.train`` with ``amp`` off (fp32) and on (bf16 where the CPU computes it
natively), each from the same seeds, so that the seeds' initialisations and data orders are shared between the two
precisions. Printed: each run's mean loss over the last ``--window`` iterations, its validation mean IU, and per
precision the mean and the seed-to-seed spread (largest minus smallest) of those means. bf16 is within noise of fp32
when its gap to fp32 is no larger than the spread between the fp32 seeds. ``--control`` adds fp32 runs on the other
convolution kernels, whose distance to fp32 seed by seed is what rounding alone does to a run. The curves go to one
PNG (``--plot``); with ``--runs-dir``, a run finished by an earlier call is read back instead of trained again.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.vs_torchfcn import training_steps  # noqa: E402
from fcnseg.engine.config import TrainConfig  # noqa: E402
from fcnseg.engine.demo import QUICK, stage_config  # noqa: E402
from fcnseg.engine.run import training_precision  # noqa: E402
from fcnseg.runtime import NATIVE_BF16, bf16_is_native, cpu_features, cpu_model_name  # noqa: E402

TORCHFCN = "torchfcn"
BF16 = "fcnseg bf16 (--amp)"
CONTROL = "fp32 other kernels"

# ------------------------------------------------------------------------------------------------------ step time


def time_steps(args: argparse.Namespace) -> dict[str, list[float]]:
    """Milliseconds per step, ``args.rounds`` alternating rounds after ``args.warmup`` untimed steps each; with
    ``--clock process``, this process's CPU time instead of the wall clock's (less swayed by other work on a shared
    machine, but spin-waiting threads count)."""
    clock = time.process_time if args.clock == "process" else time.perf_counter
    steps = training_steps(args.size)
    for step in steps.values():
        for _ in range(args.warmup):
            step()  # the first step of the measured kernels also measures them
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append((clock() - t0) * 1000)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    return times


def print_steps(times: dict[str, list[float]], size: int, clock: str) -> dict[str, dict[str, float]]:
    base = statistics.median(times[TORCHFCN])
    print(f"\ntraining step {size}x{size}, batch 1, forward + backward + SGD, median of {len(times[TORCHFCN])} "
          f"alternating rounds, {'CPU' if clock == 'process' else 'wall-clock'} time")  # fmt: skip
    print(f"{'':<34} {'median ms':>10} {'min ms':>8} {'vs torchfcn':>12}")
    rows = {}
    for name, t in times.items():
        med = statistics.median(t)
        rows[name] = {"median_ms": med, "min_ms": min(t), "speedup": base / med}
        print(f"{name:<34} {med:>10.0f} {min(t):>8.0f} {base / med:>11.2f}x")
    if BF16 not in times:
        return rows
    fp32, bf16 = statistics.median(times["fcnseg"]), statistics.median(times[BF16])
    best32 = min(fp32, statistics.median(times["fcnseg measured kernels"]))
    print(f"bf16 autocast: {fp32 / bf16:.2f}x fcnseg fp32 (oneDNN), {best32 / bf16:.2f}x the faster fp32")
    return rows


# ---------------------------------------------------------------------------------------------------------- curves


def curve_variants(args: argparse.Namespace) -> dict[str, dict]:
    """The runs per seed: fp32 (amp off), bf16 (amp on) and, with ``--control``, fp32 on the other convolution kernels
    (oneDNN's where fp32 takes the measured ones, else these): how far two fp32 runs of one seed drift apart when
    only their rounding differs, the yardstick for bf16's distance to fp32 seed by seed."""
    from fcnseg.engine.run import measured_kernels_wanted

    variants = {"fp32": {"amp": False}, "bf16": {"amp": True}}
    if args.control:
        fp32 = curve_config(args, 0, variants["fp32"], Path(".")).resolved()
        other = "onednn" if measured_kernels_wanted(fp32, torch.device("cpu")) else "measured"
        variants[CONTROL] = {"amp": False, "conv_kernels": other}
    return variants


def curve_config(args: argparse.Namespace, seed: int, overrides: dict, folder: Path) -> TrainConfig:
    """The demo's first stage (--quick plan) with ``seed`` and ``overrides``; the loss logged at every iteration."""
    cfg = stage_config(args.model, args.iters, QUICK, folder.parent, None, progress=False)
    return dataclasses.replace(cfg, seed=seed, batch_size=args.batch_size, log_every=1, out=str(folder), **overrides)


def _log(run: Path, iters: int) -> tuple[np.ndarray, float] | None:
    """The losses and the final validation mean IU of a run finished at ``iters`` iterations, else None."""
    if not (run / "log.csv").is_file():
        return None
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    validated = [r for r in rows if r["mean_iu"]]
    if not validated or int(validated[-1]["iteration"]) != iters:
        return None
    return np.array([float(r["loss"]) for r in rows if r["loss"]]), float(validated[-1]["mean_iu"])


def train_curves(args: argparse.Namespace, out: Path) -> dict[str, list[dict]]:
    """{variant: [{seed, losses, mean_iu, seconds, trained_in}]}, the variants alternating per seed. A run that a
    former call with the same ``--runs-dir`` finished is read back, not trained again."""
    import yaml

    from fcnseg.engine.train import train

    variants = curve_variants(args)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        for name, overrides in variants.items():
            folder = out / f"{args.model}-b{args.batch_size}-i{args.iters}-{name.replace(' ', '-')}-seed{seed}"
            t0 = time.perf_counter()
            if _log(folder, args.iters) is None:
                train(curve_config(args, seed, overrides, folder))
            seconds = time.perf_counter() - t0
            losses, mean_iu = _log(folder, args.iters)
            trained_in = yaml.safe_load((folder / "config.yaml").read_text())["precision"]
            runs[name].append({"seed": seed, "losses": losses.tolist(), "mean_iu": mean_iu, "seconds": seconds,
                               "trained_in": trained_in})  # fmt: skip
            print(f"{name} seed {seed}: trained in {trained_in}, {seconds:.0f} s, last loss {losses[-1]:.4f}, "
                  f"mean IU {100 * mean_iu:.2f}", file=sys.stderr)  # fmt: skip
    return runs


def summarise(runs: dict[str, list[dict]], window: int) -> dict[str, dict[str, float]]:
    """Per precision: the mean over seeds of the final-window mean loss, its spread (max - min over seeds), and the
    same for the validation mean IU; the gap of bf16 to fp32 and the verdict."""
    out = {}
    for name, group in runs.items():
        finals = [float(np.mean(r["losses"][-window:])) for r in group]
        ious = [r["mean_iu"] for r in group]
        out[name] = {"final_loss": float(np.mean(finals)), "final_loss_spread": max(finals) - min(finals),
                     "mean_iu": float(np.mean(ious)), "mean_iu_spread": max(ious) - min(ious),
                     "finals": finals, "ious": ious}  # fmt: skip
    gap = abs(out["bf16"]["final_loss"] - out["fp32"]["final_loss"])
    # Paired by seed: the same initialisation and data order, only the rounding differs.
    paired = {name: [b - a for a, b in zip(out["fp32"]["finals"], out[name]["finals"], strict=True)]
              for name in out if name != "fp32"}  # fmt: skip
    out["verdict"] = {"gap": gap, "fp32_spread": out["fp32"]["final_loss_spread"], "paired_differences": paired,
                      "within_noise": gap <= out["fp32"]["final_loss_spread"]}  # fmt: skip
    return out


def print_summary(summary: dict, window: int) -> None:
    print(f"\nfinal-window mean loss (last {window} iterations) and validation mean IU, per seed / mean / spread")
    for name in [k for k in summary if k != "verdict"]:
        s = summary[name]
        finals = ", ".join(f"{v:.4f}" for v in s["finals"])
        ious = ", ".join(f"{100 * v:.2f}" for v in s["ious"])
        print(f"{name}: loss [{finals}] mean {s['final_loss']:.4f} spread {s['final_loss_spread']:.4f}; "
              f"mean IU [{ious}] mean {100 * s['mean_iu']:.2f} spread {100 * s['mean_iu_spread']:.2f}")  # fmt: skip
    v = summary["verdict"]
    word = "within" if v["within_noise"] else "NOT within"
    print(f"bf16 - fp32: gap of the means {v['gap']:.4f} vs fp32 seed spread {v['fp32_spread']:.4f}: {word} noise")
    for name, diffs in v["paired_differences"].items():
        print(f"per seed, {name} - fp32: [{', '.join(f'{d:+.4f}' for d in diffs)}]")


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    """The moving average of ``k`` iterations, from the ``k``-th on."""
    return np.convolve(y, np.ones(k) / k, mode="valid")


STYLES = {"fp32": ("Blues", "-"), "bf16": ("Oranges", "--"), CONTROL: ("Greys", ":")}


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str, window: int, smooth: int = 10) -> None:
    """Left: every run's loss (faint) and its moving average. Right: each run's final-window mean loss by variant,
    their mean (a bar) and the fp32 seeds' span (shaded): bf16 is within noise where its mean falls within reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, side) = plt.subplots(1, 2, figsize=(10, 4.8), dpi=110, gridspec_kw={"width_ratios": [4, 1]})
    low, high = np.inf, 0.0
    for name, group in runs.items():
        colours, style = plt.get_cmap(STYLES[name][0])(np.linspace(0.5, 0.9, max(len(group), 2))), STYLES[name][1]
        for i, r in enumerate(group):
            y = np.asarray(r["losses"])
            x, k = np.arange(1, len(y) + 1), min(smooth, len(y))
            ax.plot(x, y, color=colours[i], alpha=0.15, linewidth=0.7)
            ax.plot(x[k - 1 :], _smooth(y, k), color=colours[i], linewidth=1.5, linestyle=style,
                    label=f"{name}, seed {r['seed']}")  # fmt: skip
            low, high = min(low, _smooth(y, k).min()), max(high, _smooth(y, k).max())
            side.plot(list(runs).index(name), np.mean(y[-window:]), "o", color=colours[i])
        means = [np.mean(np.asarray(r["losses"])[-window:]) for r in group]
        side.hlines(np.mean(means), list(runs).index(name) - 0.3, list(runs).index(name) + 0.3, color="k", lw=1.2)
    finals = [np.mean(np.asarray(r["losses"])[-window:]) for r in runs["fp32"]]
    side.axhspan(min(finals), max(finals), color="tab:blue", alpha=0.12)
    ax.set_ylim(0.95 * low, 1.05 * high)
    ax.set(xlabel="iteration", ylabel=f"training loss (moving mean of {smooth}; faint: every iteration)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, ncol=len(runs), loc="upper right")
    side.set_xticks(range(len(runs)), [n.replace(" other", "\nother") for n in runs], fontsize=8)
    side.set_xlim(-0.5, len(runs) - 0.5)
    side.set_title(f"loss, last {window} its\nbar: mean; band: fp32 span", fontsize=9)
    side.margins(y=0.08)
    side.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main


def describe_cpu(threads: int) -> str:
    native = " ".join(sorted(cpu_features() & NATIVE_BF16)) or "none"
    amp = training_precision(TrainConfig(amp=True), torch.device("cpu"))
    return (f"{cpu_model_name()} (native bf16: {native}; oneDNN bf16: {bf16_is_native()}; torch sees "
            f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, {threads} threads; --amp here "
            f"trains in {amp.describe()}")  # fmt: skip


def run_curves(args: argparse.Namespace, doc: dict) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train-precision-") as tmp:
        runs = train_curves(args, Path(args.runs_dir or tmp))
    summary = summarise(runs, args.window)
    seconds = time.perf_counter() - t0
    print(f"\ncurves: {args.model} width {QUICK.width:g}, synthetic {QUICK.train_images} images, batch "
          f"{args.batch_size}, {args.iters} iterations, seeds {args.seeds}, {seconds:.0f} s")  # fmt: skip
    print_summary(summary, args.window)
    title = (f"{args.model} (width {QUICK.width:g}) on the synthetic shapes from scratch, batch {args.batch_size}, "
             f"AdamW, {len(args.seeds)} seeds\n{cpu_model_name()} ({', '.join(sorted(cpu_features() & NATIVE_BF16))}), "
             f"torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    if args.plot:
        plot_curves(runs, Path(args.plot), title, args.window)
        print(f"curves plotted to {args.plot}")
    doc["curves"] = {"runs": runs, "summary": summary, "iters": args.iters, "batch_size": args.batch_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=("step", "curves", "both"), default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=320, help="step: image side in pixels")
    ap.add_argument("--rounds", type=int, default=5, help="step: alternating timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="step: untimed steps per contender first")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall", help="step: wall-clock or CPU time")
    ap.add_argument("--model", default="fcn32s", help="curves: the demo stage trained (fcn32s: from scratch)")
    ap.add_argument("--iters", type=int, default=200, help="curves: iterations per run")
    ap.add_argument("--batch-size", type=int, default=4, help="curves: images per iteration (the demo's is 8)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="curves: seeds, each run in both")
    ap.add_argument("--control", action="store_true", help="curves: also fp32 on the other kernels (see above)")
    ap.add_argument("--window", type=int, default=50, help="curves: final iterations whose mean loss is compared")
    ap.add_argument("--plot", default="docs/train-precision.png", help="curves: the PNG of every curve")
    ap.add_argument("--runs-dir", help="curves: keep the run folders here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_cpu(args.threads))
    doc: dict = {"cpu": cpu_model_name(), "threads": args.threads, "torch": torch.__version__}
    if args.part in ("step", "both"):
        times = time_steps(args)
        table = print_steps(times, args.size, args.clock)
        doc["step"] = {"size": args.size, "rounds": args.rounds, "clock": args.clock, "ms": times, "table": table}
    if args.part in ("curves", "both"):
        run_curves(args, doc)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
