"""The ``fcnseg`` command line.

A user's mistake (:class:`FcnsegError`) is printed as one line on stderr with exit status 2; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import FcnsegError

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".ppm",
    ".pgm",
}


def _error(msg: str) -> None:
    print(f"fcnseg: error: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- models


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .bench import count_gflop
    from .models import get_model, list_models
    from .models.upsampling import BilinearUpsample

    size = 500

    def gflop(model: torch.nn.Module) -> float:
        """GFLOP of one size x size image, counted on the meta device (shapes only: no memory, no arithmetic).

        A frozen upsampler runs per class (``BilinearUpsample``), but whether its weight is diagonal cannot be
        read off a meta tensor: it is counted as the full C x C transposed convolution, and the C - 1 parts in C
        that the per-class run skips are taken off again."""
        extra: list[float] = []

        def dense_part(up: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _: object) -> None:
            _, c, h, w = inputs[0].shape  # FlopCounterMode counts 2 x N x H x W x k x k x C_in x C_out
            k = up.kernel_size[0] * up.kernel_size[1]
            extra.append(2 * h * w * k * c * (c - 1) / 1e9)  # per image

        hooks = []
        for m in model.modules():
            if isinstance(m, BilinearUpsample):
                m.weight.requires_grad_(True)  # the full transposed convolution, which meta tensors can run
                hooks.append(m.register_forward_hook(dense_part))
        try:
            total = count_gflop(model, torch.empty(1, getattr(model, "in_channels", 3), size, size, device="meta"))
        finally:
            for h in hooks:
                h.remove()
        return total - sum(extra)

    print(f"{'model':<26} {'skips':<24} {'trainable':>12} {f'GFLOP at {size}x{size}':>22}   crops (caffe mode)")
    print(f"{'':<26} {'':<24} {'':>12} {'caffe':>10} {'aligned':>11}")
    for name in list_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation time
            caffe = get_model(name, alignment="caffe")
            aligned = get_model(name, alignment="aligned")
        params = sum(p.numel() for p in caffe.parameters() if p.requires_grad)
        crops = ", ".join(f"{k} {v}" for k, v in caffe.crop_offsets.items())
        print(
            f"{name:<26} {'+'.join(caffe.skips) or '-':<24} {params:>12,} {gflop(caffe):>10.1f} {gflop(aligned):>11.1f}"
            f"   {crops}"
        )
    return 0


# --------------------------------------------------------------------------------------------- predict


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (their images, sorted) and glob patterns; returns (files, problems)."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{item}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{item}: pattern matches no file")
            files.extend(found)
        else:
            problems.append(f"{item}: no such file or folder")
    seen: set[Path] = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    return unique, problems


def _output_stems(files: Sequence[Path]) -> list[str]:
    # Two inputs with one stem (a/x.jpg, b/x.png) must not overwrite each other's mask.
    counts: dict[str, int] = {}
    stems = []
    for f in files:
        n = counts.get(f.stem, 0)
        counts[f.stem] = n + 1
        stems.append(f.stem if n == 0 else f"{f.stem}-{n + 1}")
    return stems


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FcnsegError(f"--out {out}: cannot create folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise FcnsegError(f"--out {out}: folder is not writable")


def _checkpoint_and_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    # `predict CKPT IMAGES...` or `predict --weights NAME IMAGES...`: with --weights every positional is an input.
    if args.weights:
        from .models.weights import get_weights

        get_weights(args.weights)  # an unknown name fails here, listing the known ones
        return args.weights, list(args.items)
    if args.weights_file:
        raise FcnsegError("--weights-file goes with --weights NAME (the published weights it is a copy of)")
    if len(args.items) < 2:
        raise FcnsegError("predict: expected a CHECKPOINT and at least one image, folder or pattern")
    return args.items[0], list(args.items[1:])


def _runner_for(args: argparse.Namespace, model, files: Sequence[Path]):
    """The execution path asked for; onnx-int8 calibrates on --calibration images or the first inputs."""
    from .imageio import load_image
    from .runtime import check_path, make_runner, normalised

    check_path(args.runtime)
    if args.runtime == "eager":
        return None
    calibration = []
    if args.runtime == "onnx-int8":
        sources, problems = collect_inputs([args.calibration]) if args.calibration else (list(files), [])
        if problems:
            raise FcnsegError(f"--calibration {args.calibration}: {problems[0]}")
        images = []
        for f in sources[: args.calibration_images]:
            with contextlib.suppress(FcnsegError):  # a bad file is reported when it is predicted
                images.append(load_image(f))
        calibration = normalised(model, images)
    return make_runner(model, args.runtime, calibration=calibration)


def _report_agreement(model, runner, first: Path | None, quiet: bool) -> None:
    # Reduced precision changes some pixels: say how many, on the first image, against eager fp32.
    if runner is None or first is None or quiet:
        return
    from .imageio import load_image
    from .predict import default_runner
    from .runtime import agreement, normalised

    with contextlib.suppress(FcnsegError):
        share = agreement(runner, default_runner(model), normalised(model, [load_image(first)]), model)
        print(f"runtime agrees with eager fp32 on {100 * share:.2f}% of the pixels of {first.name}", file=sys.stderr)


def _check_predictable(model, args: argparse.Namespace, checkpoint: str | None) -> None:
    source = checkpoint or args.weights_file or "the model"
    if model.in_channels != 3 and not args.extra:
        raise FcnsegError(
            f"{source}: the model takes {model.in_channels} input channels (colour, then depth or HHA); pass --extra "
            "DIR, a folder of each image's depth or HHA image under the colour image's name (repeat in channel order)"
        )
    if args.extra and model.in_channels == 3:
        raise FcnsegError(f"--extra: {source} takes colour images only (3 channels); expected no --extra")
    if len(model.heads) > 1 and (args.probs or args.overlay):
        raise FcnsegError(f"{source}: --probs and --overlay are for one-headed models; this one has "
                          f"heads {', '.join(model.heads)}")  # fmt: skip


def _with_extras(rgb, path: Path, folders: Sequence[str], channels: int):
    """``rgb`` (H x W x 3) followed by the same-named depth or HHA image of each of ``folders``: a one-channel image
    is depth (16-bit millimetres, encoded as the NYUDv2 dataset encodes it; 8 bits taken as encoded), a colour one
    is HHA. Every problem is an FcnsegError naming the file."""
    import numpy as np
    from PIL import Image

    from .data.nyud import read_depth
    from .imageio import load_image

    parts = [rgb]
    for folder in folders:
        found = [Path(folder) / path.name] if (Path(folder) / path.name).is_file() else []
        found = found or sorted(Path(folder).glob(f"{glob.escape(path.stem)}.*"))
        if not found:
            raise FcnsegError(f"{path}: --extra {folder} holds no {path.stem}.*; expected its depth or HHA image there")
        try:
            with Image.open(found[0]) as im:
                depth = im.mode in ("I", "L") or im.mode.startswith("I;16")
        except Exception:
            raise FcnsegError(f"{found[0]}: cannot read it as an image; expected a depth or HHA PNG") from None
        extra = read_depth(found[0])[:, :, None] if depth else load_image(found[0])
        if extra.shape[:2] != rgb.shape[:2]:
            raise FcnsegError(f"{found[0]}: is {extra.shape[1]}x{extra.shape[0]} but {path.name} is "
                              f"{rgb.shape[1]}x{rgb.shape[0]}; expected the same size")  # fmt: skip
        parts.append(extra)
    x = np.concatenate(parts, axis=2)
    if x.shape[2] != channels:
        raise FcnsegError(f"{path}: colour and --extra give {x.shape[2]} channels; the model takes {channels}")
    return x


def _save_heads(model, rgb, out: Path, stem: str, runner, tiling: dict) -> int:
    """A two-headed model's masks: STEM.png for the first head, STEM_<head>.png for the others."""
    import numpy as np

    from .imageio import save_mask_png
    from .palette import palette_for

    masks = model.predict(rgb, runner=runner, **tiling)
    names = getattr(model, "head_classes", {}) or {}
    for i, (head, mask) in enumerate(masks.items()):
        classes = names.get(head) or None
        colours = model.palette if i == 0 and model.palette else palette_for(classes, model.heads[head])
        save_mask_png(out / (f"{stem}.png" if i == 0 else f"{stem}_{head}.png"), mask, np.asarray(colours, np.uint8))
    return 1


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from .hub import load
    from .imageio import load_image, overlay, save_mask_png, save_rgb
    from .io import atomic_write
    from .palette import palette_for
    from .predict import predict_logits, predict_mask

    checkpoint, inputs = _checkpoint_and_inputs(args)
    files, problems = collect_inputs(inputs)
    model = load(checkpoint, map_location=args.device, file=args.weights_file)
    _check_predictable(model, args, checkpoint)
    out = Path(args.out)
    _check_writable(out)
    runner = _runner_for(args, model, files)
    _report_agreement(model, runner, files[0] if files else None, args.quiet)
    tiling = {"tile": args.tile, "overlap": args.overlap}
    colors = np.asarray(model.palette or palette_for(model.classes, model.num_classes), np.uint8)
    written = 0
    bar = tqdm(files, unit="img", disable=len(files) <= 1 or args.quiet, file=sys.stderr)
    for path, stem in zip(bar, _output_stems(files), strict=True):
        try:
            rgb = load_image(path)
            x = _with_extras(rgb, path, args.extra, model.in_channels) if args.extra else rgb
            if len(model.heads) > 1:
                written += _save_heads(model, x, out, stem, runner, tiling)
                continue
            if args.probs:
                logits = predict_logits(model, x, runner=runner, **tiling)
                mask = logits.argmax(0).cpu().numpy().astype(np.uint8)
            else:  # labels only: with --tile, made band by band in bounded memory
                mask = predict_mask(model, x, runner=runner, **tiling)
            save_mask_png(out / f"{stem}.png", mask, colors)
            if args.overlay:
                save_rgb(out / f"{stem}_overlay.{args.overlay}", overlay(rgb, mask, colors))
            if args.probs:
                with atomic_write(out / f"{stem}.npy") as f:
                    np.save(f, logits.softmax(0).cpu().numpy().astype(np.float32))
            written += 1
        except FcnsegError as e:
            problems.append(str(e))
    if not args.quiet:
        print(f"wrote {written} mask(s) to {out}")
    for p in problems:
        _error(p)
    return 2 if problems else 0


# ------------------------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    from .hub import load

    model = load(args.checkpoint, file=args.weights_file)
    report = export(model, args.out, args.format, opset=args.opset)
    sizes = ", ".join(f"{k} {v:.1e}" for k, v in report.max_rel_diff.items())
    opset = f", opset {report.opset}" if report.opset else ""
    print(f"wrote {report.path} ({report.format}{opset}, any input height and width); "
          f"max |exported - eager| / logit range: {sizes}")  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_model, format_results, write_json
    from .hub import load
    from .imageio import load_image
    from .models import get_model
    from .runtime import normalised

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise FcnsegError(f"--size {args.size!r}: expected HEIGHTxWIDTH, e.g. 375x500") from None
    if args.checkpoint:
        model = load(args.checkpoint)
    else:
        model = get_model(args.model, num_classes=args.num_classes, alignment=args.alignment)
    check = None
    if args.images:
        files, problems = collect_inputs([args.images])
        if problems:
            raise FcnsegError(f"--images {args.images}: {problems[0]}")
        check = normalised(model, [load_image(f) for f in files[:8]])
    doc = bench_model(model, size=(h, w), batch=args.batch, paths=args.paths, runs=args.runs, warmup=args.warmup,
                      check=check, progress=not args.quiet)  # fmt: skip
    print(format_results(doc))
    if args.json:
        write_json(doc, args.json)
    return 0


# ------------------------------------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from .engine.demo import describe, format_table, run_demo

    t0 = time.perf_counter()
    results = run_demo(args.out, quick=args.quick, progress=not args.quiet)
    out = Path(args.out)
    print()
    print(format_table(results))
    print(
        f"\n{describe(args.quick)}; {'quick' if args.quick else 'full'} run in {time.perf_counter() - t0:.0f} s.\n"
        f"checkpoints: {out}/<model>/best.pt; evaluation reports: {out}/<model>/eval/; "
        f"pictures: {out}/predictions.png, {out}/comparison.png; figures: {out}/results.json"
    )
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from .models.weights import FCNWeights, cache_dir

    entries = list(FCNWeights)
    wn, wm = (
        max(len(x), 5) for x in (max((w.id for w in entries), key=len), max((w.value.model for w in entries), key=len))
    )
    print(f"{'name':<{wn}} {'model':<{wm}} {'classes':>7} {'input':<5} {'mean IU':>8}  reported on / file")
    for w in entries:
        e = w.value
        dataset, m = next(iter(e.metrics.items()), ("-", {}))
        cached = "  (cached)" if (cache_dir() / e.file_name).is_file() else ""
        iu = f"{m['mean_iu']:.2f}" if m else "-"
        print(f"{w.id:<{wn}} {e.model:<{wm}} {e.num_classes:>7} {e.preprocessing.channel_order:<5} {iu:>8}  "
              f"{dataset} / {e.file_name}{cached}")  # fmt: skip
    print(f"\ncache: {cache_dir()}; use: fcnseg predict --weights NAME IMAGES --out DIR, or fcnseg.load(NAME)")
    return 0


def _read_classes(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"--classes {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .hub import import_file
    from .io import atomic_write
    from .models.weights import get_weights

    options: dict = {"model": args.model, "classes": _read_classes(args.classes) if args.classes else None}
    if args.weights:  # a published file converted by hand: the entry knows its model, classes and input
        entry = get_weights(args.weights).value
        options = {"model": args.model or entry.model, "classes": options["classes"] or entry.classes}
        options.update(preprocessing=entry.preprocessing, head_classes=entry.head_classes)
    try:
        ckpt = import_file(args.src, args.format, **options)
    except FcnsegError as e:
        if args.classes and str(e).startswith("classes:"):  # a count that does not fit the weights
            raise FcnsegError(f"--classes {args.classes}: {str(e).removeprefix('classes: ')}") from None
        raise
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out) as f:
            torch.save(ckpt, f)
    except OSError as e:
        raise FcnsegError(f"--out {out}: cannot write ({e.strerror or e})") from None
    if ckpt["extra"].get("assumed_input"):
        print(f"fcnseg: note: {args.src}: {ckpt['extra']['assumed_input']}", file=sys.stderr)
    n = sum(v.numel() for v in ckpt["state_dict"].values())
    print(f"wrote {out}: {ckpt['model']} ({ckpt['alignment']} alignment), {ckpt['num_classes']} classes, "
          f"{n:,} parameters, input {ckpt['preprocessing']['channel_order']}")  # fmt: skip
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.check import run_check_data

    options = dict(args.data_option)
    return run_check_data(
        args.dataset, args.root, args.split, quiet=args.quiet, download=args.download, options=options
    )


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnseg", description="Fully Convolutional Networks for semantic segmentation."
    )
    parser.add_argument("--version", action="version", version=f"fcnseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "predict",
        help="segment images with a checkpoint or published weights",
        usage="fcnseg predict (CHECKPOINT | --weights NAME) INPUT [INPUT ...] --out DIR [options]",
    )
    p.add_argument("items", nargs="+", metavar="INPUT", help="[CHECKPOINT] then image files, folders or globs")
    p.add_argument("--weights", metavar="NAME", help="published weights instead of a checkpoint (fcnseg weights)")
    p.add_argument("--weights-file", metavar="FILE", help="a local copy of the --weights file (no download)")
    p.add_argument("--out", required=True, help="output folder: <stem>.png palette masks")
    p.add_argument(
        "--overlay",
        nargs="?",
        const="jpg",
        choices=["jpg", "png"],
        help="also write <stem>_overlay.jpg|png, the mask blended over the image",
    )
    p.add_argument("--probs", action="store_true", help="also write <stem>.npy, C x H x W probabilities")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--runtime", default="eager", help="eager (fp32), bf16, onnx, onnx-int8 or compile")
    p.add_argument("--calibration", metavar="DIR", help="onnx-int8: images to calibrate on (default: the inputs)")
    p.add_argument("--calibration-images", type=int, default=8, help="onnx-int8: how many (default: 8)")
    p.add_argument("--tile", type=int, help="run overlapping TILE x TILE windows (a multiple of 32) for large images")
    p.add_argument("--overlap", type=int, default=64, help="overlap of the --tile windows in pixels (default: 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument(
        "--extra", action="append", default=[], metavar="DIR",
        help="fusion nets: a folder of each image's depth (16-bit mm PNG) or HHA image, under the colour image's "
        "name; repeat in channel order (RGBD: the depth folder; RGB-HHA: the HHA folder)",
    )  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (checked against PyTorch)")
    p.add_argument("checkpoint", help="an fcnseg checkpoint (.pt) or published weights name")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--weights-file", metavar="FILE", help="a local copy of the published weights file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="latency, throughput, GFLOP and memory of a model on each execution path")
    p.add_argument("--model", default="fcn8s", help="a registered model (default: fcn8s), random weights")
    p.add_argument("--checkpoint", help="bench this checkpoint instead of --model")
    p.add_argument("--alignment", default="aligned", choices=["aligned", "caffe"])
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--size", default="375x500", help="input HEIGHTxWIDTH (default: 375x500)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--paths", nargs="+", default=["eager"], help="eager bf16 onnx onnx-int8 compile")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime threads (default: torch's)")
    p.add_argument("--images", metavar="DIR", help="images for int8 calibration and the fp32 agreement check")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("weights", help="list the published weights fcnseg can download and convert")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("convert", help="import torchfcn or Caffe weights into an fcnseg checkpoint")
    p.add_argument("src", help="a torchfcn state dict (.pth) or a Caffe .caffemodel")
    p.add_argument("--format", default="auto", choices=["auto", "torchfcn", "caffe"], help="default: by extension")
    p.add_argument("--out", required=True, help="the fcnseg checkpoint to write (.pt)")
    p.add_argument("--model", help="fcnseg model name when the file cannot tell (torchfcn FCN8s vs FCN8sAtOnce)")
    p.add_argument("--classes", help="a text file of class names, one a line (default: VOC names for 21 classes)")
    p.add_argument(
        "--weights", metavar="NAME", help="SRC is this published file (fcnseg weights): take its classes and input"
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="train and evaluate FCN-32s/16s/8s on synthetic data")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (about a minute)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    from .engine.commands import add_eval_arguments, add_train_arguments, cmd_eval, cmd_train, parse_key_value

    p = sub.add_parser("train", help="train a model (paper or modern recipe)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: the paper's four metrics, per-class table, plots")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("check-data", help="read every image and mask of a dataset and report every problem")
    p.add_argument(
        "--dataset", required=True, help="dataset name (voc, sbd, seg11valid, nyud, siftflow, folder, synthetic)"
    )
    p.add_argument("--root", help="the dataset's folder")
    p.add_argument(
        "--split", help="only this split (default: every split, e.g. train and val; test too for nyud, synthetic)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary; problems only")
    p.add_argument("--download", action="store_true", help="fetch voc / sbd first (torchvision's downloader)")
    p.add_argument(
        "--data-option", action="append", type=parse_key_value, default=[], metavar="KEY=VALUE",
        help="extra dataset argument, repeatable (e.g. modality=rgbd for nyud, target=both for siftflow)",
    )  # fmt: skip
    p.set_defaults(func=cmd_check_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FcnsegError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # `fcnseg models | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
