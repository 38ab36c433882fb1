"""torchfcn's FCN8s against fcnseg's FCN-8s on one CPU process: inference paths and one training step.

python benchmarks/vs_torchfcn.py                      # 375 x 500, 2 threads, 5 alternating rounds
python benchmarks/vs_torchfcn.py --runs 3 --json vs.json

Both nets get the same random weights (torchfcn's state dict through fcnseg's importer). Each round runs every
contender once in turn, so slow drifts of the machine hit all of them alike; the table shows medians and the
speed-up over torchfcn. Agreement is the share of pixels whose argmax equals torchfcn's (the caffe-mode import
must give 100%) or, for the reduced-precision paths, fcnseg's own fp32 aligned output, on synthetic-shape images
at the benchmark size. Targets (issue 6): caffe mode >= 1.3x, aligned fp32 >= 2.0x, best reduced precision
< 200 ms with >= 99% agreement, training step >= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.torchfcn_loader import load_torchfcn_models  # noqa: E402
from fcnseg.hub import model_from_checkpoint  # noqa: E402
from fcnseg.models.convert import torchfcn_to_fcnseg  # noqa: E402
from fcnseg.runtime import agreement, make_runner  # noqa: E402


def randomised_torchfcn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = load_torchfcn_models().FCN8s(n_class=21).eval()
    with torch.no_grad():  # He-scaled weights: torchfcn starts every convolution at zero
        for p in net.parameters():
            p.normal_(0, (2 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1)
    return net


def sample_images(model: torch.nn.Module, size: tuple[int, int], n: int) -> list[torch.Tensor]:
    """Synthetic-shape images resized to ``size``, normalised for ``model``."""
    from fcnseg.data import get_dataset

    ds = get_dataset("synthetic", split="val")
    out = []
    for i in range(n):
        img = ds[i][0].as_subclass(torch.Tensor).float()[None]
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        out.append(model.preprocessing(img[0].to(torch.uint8)).unsqueeze(0))
    return out


def build_contenders(size: tuple[int, int], calibration_images: int) -> tuple[dict, dict]:
    ref = randomised_torchfcn()
    ckpt = torchfcn_to_fcnseg(ref.state_dict(), model="fcn8s")
    caffe = model_from_checkpoint(ckpt)
    aligned_ckpt = {**ckpt, "config": {**ckpt["config"], "alignment": "aligned"}}
    aligned = model_from_checkpoint(aligned_ckpt)  # the same weights without pad 100
    images = sample_images(aligned, size, calibration_images + 2)
    workdir = tempfile.mkdtemp(prefix="fcnseg-vs-")

    def torchfcn_run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref(x)

    t0 = time.perf_counter()
    contenders = {
        "torchfcn FCN8s (fp32)": torchfcn_run,
        "fcnseg caffe mode fp32": make_runner(caffe, "eager"),
        "fcnseg caffe mode ONNX fp32": make_runner(caffe, "onnx", workdir=tempfile.mkdtemp(prefix="fcnseg-vs-")),
        "fcnseg aligned fp32": make_runner(aligned, "eager"),
        "fcnseg aligned bf16": make_runner(aligned, "bf16"),
        "fcnseg aligned ONNX fp32": make_runner(aligned, "onnx", workdir=workdir),
        "fcnseg aligned ONNX int8": make_runner(
            aligned, "onnx-int8", calibration=images[:calibration_images], workdir=workdir
        ),
    }
    print(f"built every path in {time.perf_counter() - t0:.0f} s (ONNX export and int8 calibration)", file=sys.stderr)
    checks = images[calibration_images:]
    agree = {k: agreement(contenders[k], torchfcn_run, checks) for k in contenders if "caffe mode" in k}
    for name in ("fcnseg aligned bf16", "fcnseg aligned ONNX fp32", "fcnseg aligned ONNX int8"):
        agree[name] = agreement(contenders[name], contenders["fcnseg aligned fp32"], checks)
    return contenders, agree


def alternate(contenders: dict, x: torch.Tensor, runs: int, warmup: int) -> dict[str, list[float]]:
    for run in contenders.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(runs):
        for name, run in contenders.items():
            t0 = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - t0) * 1000)
        print(f"round {r + 1}/{runs} done", file=sys.stderr)
    return times


def training_step_ms(runs: int) -> dict[str, float]:
    """Forward + backward + SGD step, 320 x 320, batch 1, summed cross-entropy (the release's loss)."""
    from fcnseg.models import get_model

    ref = randomised_torchfcn(1).train()
    ours = get_model("fcn8s", num_classes=21).train()  # aligned mode, frozen bilinear upsampling as released
    x = torch.randn(1, 3, 320, 320)
    y = torch.randint(0, 21, (1, 320, 320))
    steps = {}
    for name, net in (("torchfcn", ref), ("fcnseg", ours)):
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-10, momentum=0.99)

        def step(net=net, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y, reduction="sum").backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for k in steps:
        steps[k]()  # warm-up
    for _ in range(runs):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", nargs=2, type=int, default=[375, 500], metavar=("H", "W"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-images", type=int, default=4)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    contenders, agree = build_contenders(size, args.calibration_images)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    times = alternate(contenders, x, args.runs, args.warmup)
    base = statistics.median(times["torchfcn FCN8s (fp32)"])
    print(f"\ntorch {torch.__version__}, {args.threads} threads, {size[0]}x{size[1]}, median of {args.runs} rounds")
    print(f"{'path':<28} {'median ms':>10} {'min':>8} {'max':>8} {'speed-up':>9} {'agreement':>10}")
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        a = agree.get(name)
        rows.append({"path": name, "median_ms": med, "min_ms": min(t), "max_ms": max(t), "speedup": base / med,
                     "agreement": a})  # fmt: skip
        shown = "-" if a is None else f"{100 * a:.2f}%"
        print(f"{name:<28} {med:>10.1f} {min(t):>8.1f} {max(t):>8.1f} {base / med:>8.2f}x {shown:>10}")
    train = training_step_ms(args.runs)
    ratio = train["torchfcn"] / train["fcnseg"]
    print(f"\ntraining step 320x320 batch 1: torchfcn {train['torchfcn']:.0f} ms, fcnseg {train['fcnseg']:.0f} ms "
          f"({ratio:.2f}x)")  # fmt: skip
    if args.json:
        doc = {"size": list(size), "threads": args.threads, "runs": args.runs, "inference": rows,
               "training_step_ms": train, "training_speedup": ratio}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
