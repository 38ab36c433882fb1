"""torchfcn's FCN8s against fcnseg's FCN-8s on one CPU process: inference paths and one training step.

python benchmarks/vs_torchfcn.py                      # 375 x 500, 2 threads, 5 alternating rounds
python benchmarks/vs_torchfcn.py --runs 3 --json vs.json --demo runs/demo/fcn8s/best.pt
python benchmarks/vs_torchfcn.py --training-only      # the training step alone (~8 minutes)

Both nets get the same random weights (torchfcn's state dict through fcnseg's importer). Each round runs every
contender in turn (one untimed call, then half a second and at least three calls; the round's figure: the median
call), so slow drifts of the machine hit all of them alike; the table shows medians over the rounds, the speed-up
over torchfcn as its users run it (in a process of its own with glibc's default malloc, timed before and after the
rounds; in this process fcnseg's predictors keep freed memory, which also spares torchfcn's passes their page
faults: its row here shows that) and the achieved GFLOP/s against this machine's fp32 GEMM rate, measured in the
same run. Agreement is the share of pixels whose argmax equals torchfcn's (the caffe-mode paths must give 100%) or,
for the aligned paths, fcnseg's own eager fp32 aligned output, on synthetic-shape images at the benchmark size.
With ``--demo``, the same paths are also built from the trained demo model (``fcnseg demo``'s FCN-8s) and judged
against its eager fp32 output: random weights give near-tied logits, which flatter no reduced-precision path.

The *peer* rows run the other engines on fcnseg's exported files as a user would, outside fcnseg: ONNX Runtime fp32,
OpenVINO with f32 forced, OpenVINO at its own default precision (bf16 on CPUs with AVX512_BF16 or AMX) and OpenVINO
on the int8 QDQ file. Targets on a 2-core CPU: fcnseg's best fp32-class path (>= 99.99% agreement) >= 3x torchfcn
and >= every peer's fp32; with native bf16, its best bf16 >= OpenVINO's bf16 and >= 5x; with VNNI, its best int8
>= 8x at >= 99.5% agreement on the trained demo model; a training step >= 3x. The training steps each run in a
process of their own (``training_step_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.torchfcn_loader import load_torchfcn_models  # noqa: E402
from fcnseg._memory import HUGE_PAGES_ENV  # noqa: E402
from fcnseg.bench import gemm_gflops  # noqa: E402
from fcnseg.hub import load, model_from_checkpoint  # noqa: E402
from fcnseg.inference import Predictor  # noqa: E402
from fcnseg.models.complexity import count_gflop  # noqa: E402
from fcnseg.models.convert import torchfcn_to_fcnseg  # noqa: E402
from fcnseg.runtime import agreement, cpu_features, make_runner  # noqa: E402
from fcnseg.runtime.cpu import bf16_is_native  # noqa: E402
from fcnseg.runtime.onnx import int8_stem  # noqa: E402
from fcnseg.runtime.openvino import OPENVINO_PATHS, openvino_available  # noqa: E402
from fcnseg.runtime.timing import time_ms  # noqa: E402

# torchfcn as its users run it, in a process of its own (the ratios' base), and in this one: fcnseg's predictors keep
# freed memory for the whole process (fcnseg._memory), which spares torchfcn's passes their page faults too.
TORCHFCN, TORCHFCN_HERE = "torchfcn FCN8s (fp32), own process", "torchfcn FCN8s, fcnseg's memory setting"


def randomised_torchfcn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = load_torchfcn_models().FCN8s(n_class=21).eval()
    with torch.no_grad():  # He-scaled weights: torchfcn starts every convolution at zero
        for p in net.parameters():
            p.normal_(0, (2 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1)
    return net


def sample_rgb(size: tuple[int, int], n: int, split: str = "val") -> list[np.ndarray]:
    """Synthetic-shape images resized to ``size``, H x W x 3 uint8."""
    from fcnseg.data import get_dataset

    ds = get_dataset("synthetic", split=split)
    out = []
    for i in range(n):
        img = ds[i][0].as_subclass(torch.Tensor).float()[None]
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        out.append(img[0].to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def sample_images(model: torch.nn.Module, size: tuple[int, int], n: int, split: str = "val") -> list[torch.Tensor]:
    """Synthetic-shape images resized to ``size``, normalised for ``model``."""
    return [model.preprocessing(rgb).unsqueeze(0) for rgb in sample_rgb(size, n, split)]


def predict_agreement(model: torch.nn.Module, reference, rgbs: list[np.ndarray]) -> float:
    """Share of pixels where ``model.predict`` (the Python default) labels as ``reference``'s argmax."""
    same = total = 0
    for rgb in rgbs:
        expected = reference(model.preprocessing(rgb).unsqueeze(0))[0].argmax(0).numpy()
        same += int((model.predict(rgb) == expected).sum())
        total += expected.size
    return same / total


FP32_ALIGNED = "fcnseg aligned fp32"


def worth_timing(paths: list[str]) -> list[str]:
    """``paths`` without the bf16 ones on a CPU that only emulates bf16, slower than fp32 (the bf16 class needs
    native bf16)."""
    return [p for p in paths if bf16_is_native() or "bf16" not in p]


def fcnseg_paths(
    caffe: torch.nn.Module, aligned: torch.nn.Module, calibration: list[torch.Tensor], workdir: Path
) -> dict:
    """fcnseg's contenders: every path of the aligned model, and the fp32-class paths of the caffe-mode one."""
    paths = {
        "fcnseg caffe mode fp32": make_runner(caffe, "eager"),
        "fcnseg caffe mode winograd": make_runner(caffe, "winograd"),
        "fcnseg caffe mode ONNX fp32": make_runner(caffe, "onnx", workdir=workdir / "caffe"),
        FP32_ALIGNED: make_runner(aligned, "eager"),
        "fcnseg aligned winograd": make_runner(aligned, "winograd"),
        "fcnseg aligned ONNX fp32": make_runner(aligned, "onnx", workdir=workdir / "aligned"),
        "fcnseg aligned ONNX int8": make_runner(
            aligned, "onnx-int8", calibration=calibration, workdir=workdir / "aligned"
        ),  # fmt: skip
    }
    for path in worth_timing(["bf16", *(OPENVINO_PATHS if openvino_available() else ())]):
        paths[f"fcnseg aligned {path}"] = make_runner(aligned, path, calibration=calibration,
                                                      workdir=workdir / "aligned")  # fmt: skip
    return paths


def built_files(model: torch.nn.Module, calibration: list[torch.Tensor], folder: Path) -> tuple[Path, Path]:
    """The fp32 and int8 ONNX files that ``onnx-int8`` built for ``model`` in ``folder``, the int8 one named by its
    calibration images (:func:`fcnseg.runtime.onnx.int8_file`)."""
    return folder / "model.onnx", folder / f"{int8_stem(model, (), calibration)}.onnx"


def peer_engines(fp32: Path, int8: Path) -> dict:
    """The peer engines as a user would run them on the same exported files, outside fcnseg: ONNX Runtime fp32,
    OpenVINO with its CPU plugin's latency settings (f32 forced, and its own default precision, which is bf16 on
    a CPU with AVX512_BF16 or AMX), and OpenVINO on the int8 QDQ file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
    peers = {"peer ONNX Runtime fp32": lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])}
    if not openvino_available():
        return peers
    import openvino as ov

    core = ov.Core()
    base = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    for name, file, extra in (("f32", fp32, {"INFERENCE_PRECISION_HINT": "f32"}), ("default precision", fp32, {}),
                              ("int8 QDQ", int8, {})):  # fmt: skip
        compiled = core.compile_model(str(file), "CPU", {**base, **extra})
        label = f"peer OpenVINO {name} ({compiled.get_property('INFERENCE_PRECISION_HINT')})"
        request = compiled.create_infer_request()
        peers[label] = lambda x, r=request: torch.from_numpy(r.infer({0: x.numpy()})[0].copy())
    return peers


def build_contenders(size: tuple[int, int], calibration_images: int) -> tuple[dict, dict, dict]:
    """(runners by name, agreement by name, GFLOP per image by name)."""
    ref = randomised_torchfcn()
    ckpt = torchfcn_to_fcnseg(ref.state_dict(), model="fcn8s")
    caffe = model_from_checkpoint(ckpt)
    aligned = model_from_checkpoint({**ckpt, "config": {**ckpt["config"], "alignment": "aligned"}})  # no pad 100
    images = sample_images(aligned, size, calibration_images + 2)

    def torchfcn_run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref(x)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs-torchfcn-") as tmp:  # the sessions no longer read their files
        calibration = images[:calibration_images]
        ours = fcnseg_paths(caffe, aligned, calibration, Path(tmp))
        peers = peer_engines(*built_files(aligned, calibration, Path(tmp) / "aligned"))
        contenders = {TORCHFCN_HERE: torchfcn_run, **ours, **peers}
    checks = images[calibration_images:]
    for run in contenders.values():  # the first call of a new size measures the winograd path's kernels
        run(checks[0])
    print(f"built every path in {time.perf_counter() - t0:.0f} s (ONNX export, int8 calibration, kernel choice)",
          file=sys.stderr)  # fmt: skip
    # model.predict, the Python default (runtime auto, measured once and kept with the model), timed on an image;
    # and auto-reduced, judged on the calibration images.
    rgbs = sample_rgb(size, calibration_images + 2)[calibration_images:]
    reduced = Predictor(aligned, runtime="auto-reduced", calibration=images[:calibration_images], verbose=True)
    contenders["fcnseg caffe mode model.predict"] = lambda x, rgb=rgbs[0]: caffe.predict(rgb)
    contenders["fcnseg aligned model.predict"] = lambda x, rgb=rgbs[0]: aligned.predict(rgb)
    contenders["fcnseg aligned auto-reduced"] = reduced.runner(checks[0])  # measured before the clock starts
    caffe.predict(rgbs[0], verbose=True), aligned.predict(rgbs[0], verbose=True)
    predicted = {k: v for k, v in contenders.items() if k.endswith("model.predict")}
    agree = {k: agreement(run, torchfcn_run, checks) for k, run in contenders.items() if "caffe mode" in k
             and k not in predicted}  # fmt: skip
    agree["fcnseg caffe mode model.predict"] = predict_agreement(caffe, torchfcn_run, rgbs)
    agree["fcnseg aligned model.predict"] = predict_agreement(aligned, contenders[FP32_ALIGNED], rgbs)
    for name, run in contenders.items():
        if name.startswith(("fcnseg aligned", "peer")) and name != FP32_ALIGNED and name not in predicted:
            agree[name] = agreement(run, contenders[FP32_ALIGNED], checks)
    x = checks[0]
    gflop = {name: count_gflop(caffe if "caffe" in name else aligned, x) for name in contenders}
    gflop[TORCHFCN_HERE] = gflop[TORCHFCN] = gflop["fcnseg caffe mode fp32"]
    return contenders, agree, gflop


def demo_agreement(checkpoint: str, size: tuple[int, int], calibration_images: int) -> dict[str, float]:
    """Each aligned path's agreement with eager fp32, built from the trained demo model, on synthetic images
    (int8 calibrated on training-split images, judged on validation ones)."""
    model = load(checkpoint)
    calibration = sample_images(model, size, calibration_images, split="train")
    checks = sample_images(model, size, 8)
    fp32 = make_runner(model, "eager")
    out = {}
    paths = worth_timing(["winograd", "bf16", "onnx", "onnx-int8", *(OPENVINO_PATHS if openvino_available() else ())])
    with tempfile.TemporaryDirectory(prefix="vs-torchfcn-demo-") as folder:
        for path in paths:
            out[path] = agreement(make_runner(model, path, calibration=calibration, workdir=folder), fp32, checks)
    reduced = Predictor(model, runtime="auto-reduced", calibration=calibration, verbose=True)
    run = reduced.runner(checks[0])
    out[f"auto-reduced ({reduced.path})"] = agreement(run, fp32, checks)
    return out


def torchfcn_own_process(size: tuple[int, int], runs: int, warmup: int, threads: int) -> list[float]:
    """Milliseconds of ``runs`` torchfcn passes on the benchmark's input in a process of its own, in the environment
    a user gives it (glibc's default malloc, no huge pages)."""
    command = [sys.executable, __file__, "--one-torchfcn-inference", "--size", *map(str, size), "--runs", str(runs),
               "--warmup", str(warmup), "--threads", str(threads)]  # fmt: skip
    return child_result(command, torchfcn_env())


def child_result(command: list[str], env: dict[str, str]):
    """Run ``command`` (this script or another in a mode of its own) in ``env``; the JSON its last line prints."""
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_torchfcn_inference(size: tuple[int, int], runs: int, warmup: int) -> None:
    """Print the milliseconds of each of ``runs`` timed torchfcn passes (a process of torchfcn_own_process)."""
    net = randomised_torchfcn()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            net(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps(times))


def alternate(contenders: dict, x: torch.Tensor, runs: int, warmup: int) -> dict[str, list[float]]:
    """Each contender's ms per call in ``runs`` rounds; a round runs every contender in turn, and gives each its
    :func:`round_ms`."""
    for run in contenders.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(runs):
        for name, run in contenders.items():
            times[name].append(round_ms(run, x))
        print(f"round {r + 1}/{runs} done", file=sys.stderr)
    return times


# A path's first call after another's pays for the caches and TLB that the other filled with its own data: timed
# once a round, OpenVINO bf16 at about 100 ms moved by 5-6% against the same engine run by another name. So each
# round runs a path once untimed, then times it for ROUND_S and at least ROUND_CALLS calls, alike for every path.
ROUND_S, ROUND_CALLS = 0.5, 3


def round_ms(run: Callable, x: torch.Tensor) -> float:
    """The median ms of ``run(x)`` over :data:`ROUND_S` and at least :data:`ROUND_CALLS` calls, after one untimed."""
    calls = time_ms(lambda: run(x), ROUND_CALLS, warmup=1)
    while sum(calls) < ROUND_S * 1000:
        calls += time_ms(lambda: run(x), 1)
    return statistics.median(calls)


def torchfcn_optimizer(net: torch.nn.Module) -> torch.optim.Optimizer:
    """torchfcn's FCN8s recipe (examples/voc/train_fcn8s.py): SGD, momentum 0.99, weight decay 5e-4 on the
    convolution weights, biases at 2x lr without decay; its bilinear upsamplers are left out of the optimiser but
    keep ``requires_grad``, so their gradients are still computed."""
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    groups = [
        {"params": [m.weight for m in convs]},
        {"params": [m.bias for m in convs], "lr": 2e-14, "weight_decay": 0},
    ]
    return torch.optim.SGD(groups, lr=1e-14, momentum=0.99, weight_decay=5e-4)


TRAINING_VARIANTS = {
    "fcnseg": {"conv_kernels": "onednn"},
    "fcnseg measured kernels": {"conv_kernels": "measured"},
    "fcnseg bf16 (--amp)": {"amp": True},  # on the measured kernels too, where --conv-kernels auto takes them
}


def training_steps(size: int = 320, only: str | None = None) -> dict[str, Callable[[], None]]:
    """One training step each (forward + backward + optimiser step, batch 1, summed cross-entropy: the release's
    loss) of torchfcn as its recipe trains, and of fcnseg as ``fcnseg train --preset paper`` does (``place_model``,
    ``build_optimizer``, ``amp_context``) on oneDNN's kernels, on the measured ones, and with ``--amp`` where the
    CPU has native bf16 (elsewhere --amp trains in fp32 and is left out); ``only`` builds that one alone. The first
    call of the measured kernels also measures them."""
    import copy

    from fcnseg.engine.config import TrainConfig
    from fcnseg.engine.run import amp_context, build_optimizer, place_model, training_precision
    from fcnseg.models import get_model

    cpu = torch.device("cpu")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 21, (1, size, size), generator=torch.Generator().manual_seed(1))
    steps = {}
    if only in (None, "torchfcn"):
        ref = randomised_torchfcn(1).train()
        steps["torchfcn"] = _step(ref, torchfcn_optimizer(ref), contextlib.nullcontext, x, y)
    torch.manual_seed(0)
    ours = get_model("fcn8s", num_classes=21).train()  # aligned mode, frozen bilinear upsampling as released
    for name, overrides in TRAINING_VARIANTS.items():
        cfg = TrainConfig(preset="paper", model="fcn8s", deterministic=False, **overrides).resolved()
        if only not in (None, name) or (cfg.amp and training_precision(cfg, cpu).dtype != torch.bfloat16):
            continue
        net = place_model(copy.deepcopy(ours), cfg, cpu)
        steps[name] = _step(net, build_optimizer(net, cfg), amp_context(cfg, cpu)[0], x, y)
    return steps


def training_step_ms(rounds: int, threads: int) -> dict[str, float]:
    """Milliseconds per step of each of :func:`training_steps` at 320 x 320: each contender in a process of its own
    (each holds ~1.6 GB of weights, gradients and momentum, and in one process their memory traffic slowed one
    another's steps by up to 2x), ``rounds`` alternating rounds of one warm-up and three timed steps; the median of
    the rounds' medians."""
    names = ["torchfcn", *TRAINING_VARIANTS]
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            command = [sys.executable, __file__, "--one-training-step", name, "--threads", str(threads)]
            median = child_result(command, training_env(name))
            if median is not None:
                times[name].append(median)
    return {name: statistics.median(t) for name, t in times.items() if t}


def torchfcn_env() -> dict[str, str]:
    """The environment of a torchfcn process, as its users give it: without fcnseg's huge pages (fcnseg._memory)."""
    return {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}


def training_env(name: str) -> dict[str, str]:
    """The environment of a training contender's process: fcnseg's as ``fcnseg train`` sets it (huge pages for
    large tensors, ``fcnseg._memory``; ``place_model`` keeps freed memory), torchfcn's as a user runs it."""
    return torchfcn_env() if name == "torchfcn" else {**torchfcn_env(), HUGE_PAGES_ENV: "1"}


def one_training_step(name: str) -> None:
    """Print the median milliseconds of three steps of ``name`` after a warm-up (null where it does not apply)."""
    step = training_steps(320, only=name).get(name)
    if step is None:
        print("null")
        return
    step()  # warm-up; the measured kernels' first step also measures them (cached for later processes)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps(statistics.median(times)))


def _step(
    net: torch.nn.Module, opt: torch.optim.Optimizer, autocast: Callable, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = net(x)
        F.cross_entropy(logits.float(), y, reduction="sum").backward()
        opt.step()

    return step


def print_table(times: dict, agree: dict, gflop: dict, gemm: float) -> list[dict]:
    base = statistics.median(times[TORCHFCN])
    print(f"{'path':<44} {'median ms':>10} {'min':>8} {'max':>8} {'speed-up':>9} {'GFLOP/s':>8} {'of GEMM':>8} "
          f"{'agreement':>10}")  # fmt: skip
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        a, rate = agree.get(name), gflop[name] / (med / 1000)
        rows.append({"path": name, "median_ms": med, "min_ms": min(t), "max_ms": max(t), "speedup": base / med,
                     "gflop": gflop[name], "gflop_per_s": rate, "of_gemm": rate / gemm, "agreement": a})  # fmt: skip
        shown = "-" if a is None else f"{100 * a:.2f}%"
        print(f"{name:<44} {med:>10.1f} {min(t):>8.1f} {max(t):>8.1f} {base / med:>8.2f}x {rate:>8.0f} "
              f"{100 * rate / gemm:>7.0f}% {shown:>10}")  # fmt: skip
    return rows


def print_training(train: dict[str, float], threads: int) -> None:
    from fcnseg.runtime import cpu_model_name

    print(f"\n{cpu_model_name()}, {threads} threads; training step 320x320 batch 1: " + ", ".join(
        f"{k} {v:.0f} ms ({train['torchfcn'] / v:.2f}x)" for k, v in train.items()))  # fmt: skip


def main() -> None:
    from fcnseg.runtime import cpu_model_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", nargs=2, type=int, default=[375, 500], metavar=("H", "W"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-images", type=int, default=4)
    ap.add_argument("--demo", metavar="CKPT", help="the trained demo FCN-8s: agreement of each path on it")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--training-only", action="store_true", help="time the training step only (minutes)")
    ap.add_argument("--one-training-step", metavar="NAME", help=argparse.SUPPRESS)  # a process of training_step_ms
    ap.add_argument("--one-torchfcn-inference", action="store_true", help=argparse.SUPPRESS)  # torchfcn_own_process
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_training_step:
        one_training_step(args.one_training_step)
        return
    if args.one_torchfcn_inference:
        one_torchfcn_inference(tuple(args.size), args.runs, args.warmup)
        return
    if args.training_only:
        print_training(training_step_ms(args.runs, args.threads), args.threads)
        return
    size = tuple(args.size)
    contenders, agree, gflop = build_contenders(size, args.calibration_images)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    before = torchfcn_own_process(size, args.runs, args.warmup, args.threads)
    times = {TORCHFCN: [], **alternate(contenders, x, args.runs, args.warmup)}
    after = torchfcn_own_process(size, args.runs, args.warmup, args.threads)
    times[TORCHFCN] = before + after
    print(f"torchfcn in a process of its own: {statistics.median(before):.0f} ms before the rounds, "
          f"{statistics.median(after):.0f} ms after")  # fmt: skip
    gemm = gemm_gflops()
    features = " ".join(sorted(cpu_features() & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16"}))
    print(f"\n{cpu_model_name()} ({features}; torch sees {torch.backends.cpu.get_cpu_capability()}), torch "
          f"{torch.__version__}, {args.threads} threads, {size[0]}x{size[1]}, median of {args.runs} rounds; fp32 "
          f"GEMM {gemm:.0f} GFLOP/s")  # fmt: skip
    rows = print_table(times, agree, gflop, gemm)
    demo = demo_agreement(args.demo, size, args.calibration_images) if args.demo else {}
    if demo:
        print("agreement with eager fp32 on the trained demo model: "
              + ", ".join(f"{k} {100 * v:.3f}%" for k, v in demo.items()))  # fmt: skip
    train = training_step_ms(args.runs, args.threads)
    print_training(train, args.threads)
    if args.json:
        doc = {"cpu": cpu_model_name(), "features": features, "size": list(size), "threads": args.threads,
               "runs": args.runs, "gemm_gflop_per_s": gemm, "inference": rows, "demo_agreement": demo,
               "training_step_ms": train}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
