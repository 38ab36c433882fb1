"""``fcnseg predict``: palette masks of images, folders and globs, with a checkpoint or published weights.

Each image that cannot be segmented is reported on stderr and the others are still written (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import FcnsegError
from ._common import (
    add_augmentation,
    add_calibration,
    add_device,
    add_out,
    add_quiet,
    add_runtime,
    add_sha256,
    add_tiling,
    add_weights,
    add_weights_file,
    error,
    predictor_from_flags,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="segment images with a checkpoint or published weights",
        usage="fcnseg predict (CHECKPOINT | --weights NAME) INPUT [INPUT ...] --out DIR [options]",
    )
    p.add_argument("items", nargs="+", metavar="INPUT", help="[CHECKPOINT] then image files, folders or globs")
    add_weights(p, "published weights instead of a checkpoint (fcnseg weights)")
    add_weights_file(p, "a local copy of the --weights file (no download)")
    add_sha256(p, "refuse the checkpoint or weights file unless its SHA-256 is HEX")
    add_out(p, "output folder: <stem>.png palette masks")
    p.add_argument(
        "--overlay",
        nargs="?",
        const="jpg",
        choices=["jpg", "png"],
        help="also write <stem>_overlay.jpg|png, the mask blended over the image",
    )
    p.add_argument("--probs", action="store_true", help="also write <stem>.npy, C x H x W probabilities")
    p.add_argument(
        "--confidence", action="store_true",
        help="also write <stem>_confidence.png, each pixel's largest class probability as 16-bit grey (x 65535)",
    )  # fmt: skip
    add_device(p, "cpu", "torch device (default: cpu)")
    add_runtime(p)
    add_calibration(p, "the inputs")
    add_tiling(p)
    add_augmentation(p)
    add_quiet(p, "no progress bar or summary")
    p.add_argument(
        "--extra", action="append", default=[], metavar="DIR",
        help="fusion nets: a folder of each image's depth (16-bit mm PNG) or HHA image, under the colour image's "
        "name; repeat in channel order (RGBD: the depth folder; RGB-HHA: the HHA folder)",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def _checkpoint_and_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    # `predict CKPT IMAGES...` or `predict --weights NAME IMAGES...`: with --weights every positional is an input.
    if args.weights:
        from ..models.weights import get_weights

        get_weights(args.weights)  # an unknown name fails here, listing the known ones
        return args.weights, list(args.items)
    if args.weights_file:
        raise FcnsegError("--weights-file goes with --weights NAME (the published weights it is a copy of)")
    if len(args.items) < 2:
        raise FcnsegError("predict: expected a CHECKPOINT and at least one image, folder or pattern")
    return args.items[0], list(args.items[1:])


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FcnsegError(f"--out {out}: cannot create folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise FcnsegError(f"--out {out}: folder is not writable")


def _read_files(args: argparse.Namespace, files: list[Path], checkpoint: str | None) -> list[Path]:
    """Every file this run reads: the images, each --extra folder's files, the --calibration images and the
    checkpoint or weights file."""
    from ._inputs import collect_inputs

    read = [*files, *(Path(f) for f in (checkpoint, args.weights_file) if f and Path(f).is_file())]
    for folder in args.extra:
        with contextlib.suppress(OSError):
            read.extend(p for p in Path(folder).iterdir() if p.is_file())
    if args.calibration:
        read.extend(collect_inputs([args.calibration])[0])
    return read


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_no_input_overwritten(out: Path, plan: Sequence[tuple[Path, list[str]]], read: Sequence[Path]) -> None:
    """Refuse, before anything is written, a run whose outputs (``plan``: each input with the file names it
    writes in ``out``) would replace a file it reads: the same path once resolved (symbolic links followed), or
    the same file on disk (a hard link)."""
    by_path = {p.resolve(): p for p in read}
    by_identity = {ident: p for p in read if (ident := _identity(p)) is not None}
    for source, names in plan:
        for name in names:
            target = out / name
            hit = by_path.get(target.resolve()) or by_identity.get(_identity(target))
            if hit is not None:
                raise FcnsegError(
                    f"--out {out}: the output {name} of {source.name} would overwrite the input {hit}; expected an "
                    "--out folder where no input has an output's name (a folder of its own, say)"
                )


def _check_predictable(model, args: argparse.Namespace, checkpoint: str | None) -> None:
    source = checkpoint or args.weights_file or "the model"
    if model.in_channels != 3 and not args.extra:
        raise FcnsegError(
            f"{source}: the model takes {model.in_channels} input channels (colour, then depth or HHA); pass --extra "
            "DIR, a folder of each image's depth or HHA image under the colour image's name (repeat in channel order)"
        )
    if args.extra and model.in_channels == 3:
        raise FcnsegError(f"--extra: {source} takes colour images only (3 channels); expected no --extra")
    from ..runtime import check_path

    check_path(args.runtime)
    if args.tile:
        from ..tiling import check_tiling

        check_tiling(args.tile, args.overlap, model.stride)


def _report_agreement(predictor, first: Path | None, quiet: bool) -> None:
    # Reduced precision changes some pixels: say how many, on the first image, against eager fp32.
    if first is None or quiet:
        return
    from ..imageio import load_image
    from ..inference import Predictor, agreement

    reference = Predictor(predictor.model, runtime="eager")
    with contextlib.suppress(FcnsegError):
        x = predictor.inputs([load_image(first)])[0][None]  # the model's normalised 1 x C x H x W input
        share = agreement(predictor, reference, [x])
        print(f"runtime agrees with eager fp32 on {100 * share:.2f}% of the pixels of {first.name}", file=sys.stderr)


def _predict_one(predictor, path: Path, stem: str, args: argparse.Namespace, colors) -> None:
    """Read ``path`` (and its --extra images) and write its mask(s) under ``stem``."""
    from ..imageio import load_image
    from ..predict import save_prediction

    rgb = load_image(path)
    x = rgb
    if args.extra:  # fusion nets only
        from ..imageio import stack_extra_channels

        x = stack_extra_channels(rgb, path, args.extra, predictor.model.in_channels)
    overlay = {"overlay_on": rgb, "overlay_format": args.overlay} if args.overlay else {}
    save_prediction(predictor, x, Path(args.out), stem, colors=colors, probs=args.probs,
                    confidence=args.confidence, **overlay)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..device import pick_device
    from ..hub import load
    from ..predict import mask_colors, output_names, output_stems
    from ..runtime import FP32_CLASS
    from ._inputs import collect_inputs

    checkpoint, inputs = _checkpoint_and_inputs(args)
    files, problems = collect_inputs(inputs)
    model = load(checkpoint, map_location=pick_device(args.device), file=args.weights_file, sha256=args.sha256)
    _check_predictable(model, args, checkpoint)
    if not files:  # nothing to do: refused before the output folder is made
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise FcnsegError(f"{problems[0]}{more}" if problems else "predict: no input images")
    out = Path(args.out)
    names = functools.partial(
        output_names, model, overlay_format=args.overlay, probs=args.probs, confidence=args.confidence
    )
    stems = output_stems(files, names)
    plan = [(f, names(stem)) for f, stem in zip(files, stems, strict=True)]
    check_no_input_overwritten(out, plan, _read_files(args, files, checkpoint))
    _check_writable(out)
    predictor = predictor_from_flags(args, model, files)
    if args.runtime not in FP32_CLASS:
        _report_agreement(predictor, files[0] if files else None, args.quiet)
    colors = mask_colors(model)
    written = 0
    bar = tqdm(files, unit="img", disable=len(files) <= 1 or args.quiet, file=sys.stderr)
    for path, stem in zip(bar, stems, strict=True):
        try:
            _predict_one(predictor, path, stem, args, colors)
            written += 1
        except FcnsegError as e:
            problems.append(str(e))
    if not args.quiet:
        print(f"wrote {written} mask(s) to {out}")
    for p in problems:
        error(p)
    return 2 if problems else 0
