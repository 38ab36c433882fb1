"""``fcnseg predict``: palette masks of images, folders and globs, with a checkpoint or published weights.

Each image that cannot be segmented is reported on stderr and the others are still written (exit status 2). With
``--batch N``, images of one size (not necessarily consecutive: headers are read ahead) run as one forward pass of up
to N images and :data:`~fcnseg.predict.BATCH_PIXELS` padded pixels; the files written are those of ``--batch 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FcnsegError
from ._common import (
    add_augmentation,
    add_batch,
    add_calibration,
    add_device,
    add_out,
    add_quiet,
    add_runtime,
    add_sha256,
    add_tiling,
    add_weights,
    add_weights_file,
    check_batch,
    error,
    predictor_from_flags,
)

LOOKAHEAD = 256  # --batch: files whose headers are read ahead to find images of one size (no pixel decoded)


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
    add_batch(
        p, "images of one size run as one forward pass, up to N images and 8,388,608 padded pixels in all (one "
        "larger image runs alone); the files written are the same as with 1 (default: 1)",
    )  # fmt: skip
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
    from ..runtime import FP32_CLASS

    reference = Predictor(predictor.model, runtime="eager")
    with contextlib.suppress(FcnsegError):
        x = predictor.inputs([load_image(first)])[0][None]  # the model's normalised 1 x C x H x W input
        predictor.runner(x)  # built, and auto measured, on the first image
        if predictor.path in FP32_CLASS:
            return
        share = agreement(predictor, reference, [x])
        print(f"runtime agrees with eager fp32 on {100 * share:.2f}% of the pixels of {first.name}", file=sys.stderr)


@dataclass
class _Job:
    """One input: its place in the input order, its file, its output stem and its header's (height, width)."""

    index: int
    path: Path
    stem: str
    size: tuple[int, int] | None = None


def _probed(jobs: Iterable[_Job], batch: int) -> Iterator[_Job]:
    """``jobs`` with their header sizes (no pixel decoded); with ``--batch 1``, none is read: each image is its own
    batch. A file whose header cannot be read keeps no size: reading it says why, as it would unbatched."""
    from ..imageio import probe_image

    for job in jobs:
        if batch > 1:
            with contextlib.suppress(FcnsegError):
                header = probe_image(job.path)
                job.size = (header.height, header.width)
        yield job


def _read_one(predictor, path: Path, args: argparse.Namespace):
    """The model's input for ``path`` (with its --extra images) and its colour image."""
    from ..imageio import load_image

    rgb = load_image(path)
    if not args.extra:
        return rgb, rgb
    from ..imageio import stack_extra_channels  # fusion nets only

    return stack_extra_channels(rgb, path, args.extra, predictor.model.in_channels), rgb


def _outputs(predictor, read: list, args: argparse.Namespace, problems: dict[int, str]) -> list:
    """``(job, rgb, outputs)`` of each of ``read`` (``(job, input, rgb)``), in one pass where they share a size."""
    try:
        results = predictor.outputs([x for _, x, _ in read], proba=args.probs, confidence=args.confidence)
    except FcnsegError as e:
        if len(read) == 1:
            problems[read[0][0].index] = str(e)
            return []
        # One image the model refuses would fail its whole batch: one by one, each says its own problem.
        return [done for one in read for done in _outputs(predictor, [one], args, problems)]
    return [(job, rgb, result) for (job, _, rgb), result in zip(read, results, strict=True)]


def _predict_group(predictor, group: list[_Job], args: argparse.Namespace, colors, problems: dict[int, str]) -> int:
    """Read the images of ``group``, segment them together and write their files; returns how many were written.
    A problem is kept in ``problems`` under its input's index."""
    from ..predict import write_prediction

    read = []
    for job in group:
        try:
            read.append((job, *_read_one(predictor, job.path, args)))
        except FcnsegError as e:
            problems[job.index] = str(e)
    written = 0
    for job, rgb, result in _outputs(predictor, read, args, problems) if read else []:
        overlay = {"overlay_on": rgb, "overlay_format": args.overlay} if args.overlay else {}
        try:
            write_prediction(predictor.model, result, Path(args.out), job.stem, colors=colors, **overlay)
            written += 1
        except FcnsegError as e:
            problems[job.index] = str(e)
    return written


def _predict_all(predictor, files: list[Path], stems: list[str], args: argparse.Namespace) -> tuple[int, list[str]]:
    """Segment ``files`` in groups of one size (up to ``--batch`` and :data:`~fcnseg.predict.BATCH_PIXELS`) and
    write each one's files under its stem: (how many were written, the problems in input order)."""
    from tqdm import tqdm

    from ..predict import BATCH_PIXELS, batch_groups, forward_size, mask_colors

    colors = mask_colors(predictor.model)
    jobs = _probed((_Job(i, f, stem) for i, (f, stem) in enumerate(zip(files, stems, strict=True))), args.batch)

    def cost(job: _Job) -> int:  # an unreadable header costs nothing: its file fails before the model runs
        if job.size is None:
            return 0
        rows, cols = forward_size(predictor, *job.size)
        return rows * cols

    groups = batch_groups(jobs, key=lambda job: job.size, cost=cost, batch=args.batch, max_pixels=BATCH_PIXELS,
                          window=max(LOOKAHEAD, args.batch))  # fmt: skip
    problems: dict[int, str] = {}
    written = 0
    with tqdm(total=len(files), unit="img", disable=len(files) <= 1 or args.quiet, file=sys.stderr) as bar:
        for group in groups:
            written += _predict_group(predictor, group, args, colors, problems)
            bar.update(len(group))
    return written, [problems[i] for i in sorted(problems)]


def run(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from ..hub import load
    from ..predict import output_names, output_stems
    from ._inputs import collect_inputs

    args.batch = check_batch(args.batch)
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
    _report_agreement(predictor, files[0] if files else None, args.quiet)
    written, failed = _predict_all(predictor, files, stems, args)
    problems.extend(failed)
    if not args.quiet:
        print(f"wrote {written} mask(s) to {out}")
    for p in problems:
        error(p)
    return 2 if problems else 0
