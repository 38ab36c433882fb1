"""Images per second of ``fcnseg predict`` on a folder, at ``--batch 1, 4, 8``, against torchfcn's FCN8s run one
image at a time in the same process.

python benchmarks/throughput.py                                   # 32 images, 375 x 500, runtime auto-reduced
python benchmarks/throughput.py --runtime eager winograd auto-reduced --rounds 5 --checkpoint best.pt
python benchmarks/throughput.py --images 4 --size 64 80 --batches 1 4 --rounds 1 --runtime eager   # a quick check

The folder: ``--images`` synthetic-shape images (``fcnseg.data.get_dataset("synthetic", split="val")``) resized to
``--size``, written as PNG into a temporary folder. The model: the FCN-8s of ``--checkpoint``, else
``fcnseg.models.get_model("fcn8s", num_classes=21)`` with He-scaled random weights, saved to a temporary checkpoint.

What is timed. fcnseg: the CLI is called in-process (``fcnseg.cli.main(["predict", ...])``) once per runtime and
batch size; inside it, the prediction loop over the folder (``fcnseg.cli.predict._predict_all``: reading each
image's header and pixels, grouping by size, preprocessing, the forward passes, the argmax and writing every mask
PNG) is timed ``--rounds`` times by a wrapper. Before the first timed round the wrapper builds the execution path on
a first batch (ONNX export, int8 calibration, ``auto``'s choice) and runs one untimed warm-up pass; that, the model
loading and the agreement check ``predict`` makes for reduced-precision paths are reported apart as start-up.
torchfcn: FCN8s (caffe-mode padding, as published) with He-scaled random weights, the same images preloaded as
normalised tensors, one forward and argmax per image (``max(1)[1]``, as torchfcn's trainer takes its labels): no
reading, no writing, so the ratio flatters torchfcn if anything. torchfcn is timed ``--rounds`` times before fcnseg
and ``--rounds`` times after, and both blocks' medians are printed, so that a drift of the machine during the run
shows. Each block runs in a process of its own, as torchfcn's users run it (glibc's default malloc, no huge
pages): in this process fcnseg's predictor keeps freed memory for reuse (``fcnseg._memory``), which would spare
torchfcn's passes their page faults too. Reported: median images/s and each fcnseg median over torchfcn's (both
blocks' rounds together).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fcnseg  # noqa: E402
import fcnseg.cli.predict as predict_cli  # noqa: E402
from benchmarks.vs_torchfcn import child_result, randomised_torchfcn, sample_rgb, torchfcn_env  # noqa: E402
from fcnseg.cli import main as fcnseg_main  # noqa: E402
from fcnseg.imageio import load_image  # noqa: E402
from fcnseg.runtime import cpu_model_name  # noqa: E402


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``n`` synthetic-shape images of ``size`` written into ``folder`` as PNG; their arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rgbs = sample_rgb(size, n)
    for i, rgb in enumerate(rgbs):
        Image.fromarray(rgb).save(folder / f"img{i:03d}.png")
    return rgbs


def fcnseg_checkpoint(given: str | None, folder: Path) -> str:
    if given:
        return given
    torch.manual_seed(0)
    model = fcnseg.models.get_model("fcn8s", num_classes=21).eval()
    with torch.no_grad():  # He-scaled weights: the score layers start at zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, (2 / p[0].numel()) ** 0.5) if p.dim() > 1 else p.normal_(0, 0.1)
    return str(fcnseg.save_checkpoint(model, folder / "fcn8s-random.pt"))


def torchfcn_rounds(inputs: list[torch.Tensor], rounds: int) -> list[float]:
    """Images/s of each round: torchfcn's FCN8s, one image at a time (forward and argmax)."""
    net = randomised_torchfcn()
    out = []
    with torch.inference_mode():
        net(inputs[0]).max(1)[1]  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            for x in inputs:
                net(x).max(1)[1]
            out.append(len(inputs) / (time.perf_counter() - start))
    return out


def torchfcn_own_process(inputs_file: Path, rounds: int) -> list[float]:
    """:func:`torchfcn_rounds` on the inputs saved in ``inputs_file``, in a process of its own (see the module)."""
    command = [sys.executable, __file__, "--torchfcn-inputs", str(inputs_file), "--rounds", str(rounds),
               "--threads", str(torch.get_num_threads())]  # fmt: skip
    return child_result(command, torchfcn_env())


def fcnseg_rounds(checkpoint: str, folder: Path, out: Path, runtime: str, batch: int, rounds: int) -> dict:
    """One ``fcnseg predict`` call with its prediction loop timed ``rounds`` times (see the module)."""
    original = predict_cli._predict_all
    seen: dict = {"ips": [], "loop_s": 0.0}

    def timed(predictor, files, stems, args):
        start = time.perf_counter()
        first = [load_image(f) for f in files[:batch]]
        x = torch.stack(predictor.inputs(first))
        predictor.runner(x)  # built (calibrated, chosen) before the clock starts
        predictor.batch_scores(x)  # and the first pass of this shape, untimed
        seen["warm_s"] = time.perf_counter() - start
        seen["path"] = predictor.path
        for _ in range(rounds):
            start = time.perf_counter()
            result = original(predictor, files, stems, args)
            seconds = time.perf_counter() - start
            seen["ips"].append(len(files) / seconds)
            seen["loop_s"] += seconds
        return result

    argv = ["predict", checkpoint, str(folder), "--out", str(out), "--runtime", runtime, "--batch", str(batch),
            "--quiet"]  # fmt: skip
    start = time.perf_counter()
    with mock.patch.object(predict_cli, "_predict_all", timed):
        code = fcnseg_main(argv)
    total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"fcnseg predict --runtime {runtime} --batch {batch} exited with {code}")
    seen["startup_s"] = total - seen["loop_s"]  # loading, building the path, the warm-up pass
    return seen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", nargs="+", default=["auto-reduced"], metavar="PATH",
                    help="fcnseg execution path(s), space- or comma-separated (default: auto-reduced)")  # fmt: skip
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8], metavar="N", help="default: 1 4 8")
    ap.add_argument("--images", type=int, default=32, help="images in the folder (default: 32)")
    ap.add_argument("--size", nargs=2, type=int, default=[375, 500], metavar=("H", "W"), help="default: 375 500")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the folder per contender (default: 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--checkpoint", help="an FCN-8s checkpoint (default: random He weights)")
    ap.add_argument("--no-torchfcn", action="store_true", help="leave torchfcn out (no reference ratio)")
    ap.add_argument("--torchfcn-inputs", help=argparse.SUPPRESS)  # a process of torchfcn_own_process
    args = ap.parse_args(argv)
    args.runtime = [r for item in args.runtime for r in item.split(",") if r]
    return args


def report(args: argparse.Namespace, reference: tuple[list[float], list[float]], rows: list[tuple]) -> None:
    before, after = reference
    ref = statistics.median(before + after) if before else None
    print(f"CPU: {cpu_model_name()}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"{args.images} images of {args.size[0]} x {args.size[1]}, medians of {args.rounds} round(s)")
    if ref:
        print(f"torchfcn FCN8s, one image at a time, own process: {ref:.3f} images/s "
              f"(before: {statistics.median(before):.3f}, after: {statistics.median(after):.3f})")  # fmt: skip
    print(f"{'runtime':<14} {'path':<14} {'batch':>5} {'images/s':>9} {'min-max':>15} {'vs torchfcn':>11} "
          f"{'start-up s':>10}")  # fmt: skip
    for runtime, batch, seen in rows:
        ips = seen["ips"]
        ratio = f"{statistics.median(ips) / ref:.2f}x" if ref else "-"
        spread = f"{min(ips):.3f}-{max(ips):.3f}"
        print(f"{runtime:<14} {seen['path']:<14} {batch:>5} {statistics.median(ips):>9.3f} {spread:>15} "
              f"{ratio:>11} {seen['startup_s']:>10.1f}")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torchfcn_inputs:
        print(json.dumps(torchfcn_rounds(torch.load(args.torchfcn_inputs), args.rounds)))
        return
    with tempfile.TemporaryDirectory(prefix="fcnseg-throughput-") as tmp:
        size = (args.size[0], args.size[1])
        rgbs = write_images(Path(tmp) / "images", args.images, size)
        checkpoint = fcnseg_checkpoint(args.checkpoint, Path(tmp))
        preprocessing = fcnseg.load(checkpoint).preprocessing
        inputs_file = Path(tmp) / "inputs.pt"
        torch.save([preprocessing(rgb).unsqueeze(0) for rgb in rgbs], inputs_file)
        before = [] if args.no_torchfcn else torchfcn_own_process(inputs_file, args.rounds)
        rows = []
        for runtime in args.runtime:
            for batch in args.batches:
                out = Path(tmp) / f"out-{runtime}-{batch}"
                rows.append((runtime, batch, fcnseg_rounds(checkpoint, Path(tmp) / "images", out, runtime, batch,
                                                           args.rounds)))  # fmt: skip
                print(f"done: {runtime} --batch {batch}", file=sys.stderr, flush=True)
        after = [] if args.no_torchfcn else torchfcn_own_process(inputs_file, args.rounds)
    report(args, (before, after), rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        run(parse_args())
