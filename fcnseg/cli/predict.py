"""``fcnseg predict``: palette masks of images, folders and globs, with a checkpoint or published weights.

Each image that cannot be segmented is reported on stderr and the others are still written (exit status 2). With
``--batch N``, images of one size (not necessarily consecutive: headers are read ahead) run as one forward pass of up
to N images and :data:`~fcnseg.predict.BATCH_PIXELS` padded pixels; the files written are those of ``--batch 1``.
With ``--engine ray``, the same files are written by a pool of Ray workers (:mod:`fcnseg.ray_batch`), the inputs may
be fsspec URLs, and a second run of the same command skips the inputs whose files are complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from ..errors import FcnsegError, first_line
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
        usage="fcnseg predict (CHECKPOINT | --weights NAME|hf:USER/NAME) INPUT [INPUT ...] --out DIR [options]",
    )
    p.add_argument("items", nargs="+", metavar="INPUT", help="[CHECKPOINT] then image files, folders or globs")
    add_weights(p, "published weights (fcnseg weights) or a Hub model hf:USER/NAME[@REVISION], instead of a checkpoint")
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
    add_engine(p)
    p.add_argument(
        "--extra", action="append", default=[], metavar="DIR",
        help="fusion nets: a folder of each image's depth (16-bit mm PNG) or HHA image, under the colour image's "
        "name; repeat in channel order (RGBD: the depth folder; RGB-HHA: the HHA folder)",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def add_engine(p: argparse.ArgumentParser) -> None:
    """``--engine local|ray``, and ``--address ADDR``, ``--workers N`` and ``--worker-cpus N`` for ray."""
    p.add_argument(
        "--engine", choices=["local", "ray"], default="local",
        help="local: this process (default); ray: a pool of Ray workers, each loading the model once "
        "(fcnseg[ray]); inputs may then be fsspec URLs (s3://...), --out must be a folder every node writes to, "
        "and a rerun skips the inputs whose files are complete",
    )  # fmt: skip
    p.add_argument(
        "--address", metavar="ADDR",
        help="--engine ray: the cluster, auto (the one `ray start` runs on this machine) or ray://HOST:PORT "
        "(default: RAY_ADDRESS, else a cluster started on this machine, else a new local one for this run)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, metavar="N",
        help="--engine ray: N workers, each holding one copy of the model (default: from 1 up to what the cluster "
        "holds)",
    )  # fmt: skip
    p.add_argument(
        "--worker-cpus", type=int, default=1, metavar="N",
        help="--engine ray: the CPUs each worker reserves and computes on, as torch threads (default: 1); with "
        "--device cuda each worker also reserves one GPU",
    )  # fmt: skip


def _checkpoint_and_inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    # `predict CKPT IMAGES...` or `predict --weights NAME IMAGES...`: with --weights every positional is an input.
    if args.weights:
        from ..hub import is_hf_source

        if not is_hf_source(args.weights):  # hf:USER/NAME is checked when it is read
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


def _probed(jobs: Iterable[_Job]) -> Iterator[_Job]:
    """``jobs`` with their header sizes (no pixel decoded), for the batches and the memory check. A file whose
    header cannot be read keeps no size: reading it says why, as it would unbatched."""
    from ..imageio import probe_image

    for job in jobs:
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


# What segmenting one image can raise besides a user's error: torch's RuntimeError (memory it cannot allocate, a
# size an operation cannot take) and MemoryError. Each is that image's problem; the other images are still written.
_FORWARD_ERRORS = (FcnsegError, RuntimeError, MemoryError)


def _problem(path: Path, e: BaseException) -> str:
    """One line for an image the model failed on."""
    if isinstance(e, FcnsegError):
        return str(e)
    text = first_line(e)
    if isinstance(e, MemoryError) or "allocate" in text:
        return f"{path}: out of memory segmenting it; segment large images in windows with --tile 512"
    return f"{path}: cannot segment it ({text[:200]})"


def _outputs(predictor, read: list, args: argparse.Namespace, problems: dict[int, str]) -> list:
    """``(job, rgb, outputs)`` of each of ``read`` (``(job, input, rgb)``), in one pass where they share a size."""
    try:
        results = predictor.outputs([x for _, x, _ in read], proba=args.probs, confidence=args.confidence)
    except _FORWARD_ERRORS as e:
        if len(read) == 1:
            problems[read[0][0].index] = _problem(read[0][0].path, e)
            return []
        # One image the model refuses would fail its whole batch: one by one, each says its own problem.
        return [done for one in read for done in _outputs(predictor, [one], args, problems)]
    return [(job, rgb, result) for (job, _, rgb), result in zip(read, results, strict=True)]


def _predict_group(
    predictor, group: list[_Job], args: argparse.Namespace, colors, problems: dict[int, str], *, memory=None
) -> int:
    """Read the images of ``group``, segment them together and write their files; returns how many were written.
    A problem is kept in ``problems`` under its input's index. ``memory`` (a :class:`~fcnseg.predict.MemoryCheck`):
    a group whose pass would not fit runs image by image, and an image that does not fit alone is a problem."""
    from ..predict import write_prediction

    if memory is not None and len(group) > 1 and not memory.fits([job.size for job in group]):
        return sum(_predict_group(predictor, [job], args, colors, problems, memory=memory) for job in group)
    if memory is not None and group[0].size is not None and not memory.fits([group[0].size]):
        problems[group[0].index] = memory.refusal(group[0].path, group[0].size)
        return 0
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
        except OSError as e:  # a full disk, a folder where a file goes: the next image may still be written
            problems[job.index] = f"{job.path}: cannot write its files ({e})"
    if memory is not None:
        memory.ran([job.size for job, *_ in read])
    return written


def _predict_all(predictor, files: list[Path], stems: list[str], args: argparse.Namespace) -> tuple[int, list[str]]:
    """Segment ``files`` in groups of one size (up to ``--batch`` and :data:`~fcnseg.predict.BATCH_PIXELS`) and
    write each one's files under its stem: (how many were written, the problems in input order)."""
    from tqdm import tqdm

    from ..predict import BATCH_PIXELS, MemoryCheck, batch_groups, forward_area, mask_colors

    colors = mask_colors(predictor.model)
    memory = None if predictor.tile else MemoryCheck(predictor)  # a tile bounds each pass
    jobs = _probed(_Job(i, f, stem) for i, (f, stem) in enumerate(zip(files, stems, strict=True)))

    def cost(job: _Job) -> int:
        return forward_area(predictor, job.size)

    groups = batch_groups(jobs, key=lambda job: job.size, cost=cost, batch=args.batch, max_pixels=BATCH_PIXELS,
                          window=max(LOOKAHEAD, args.batch))  # fmt: skip
    problems: dict[int, str] = {}
    written = 0
    with tqdm(total=len(files), unit="img", disable=len(files) <= 1 or args.quiet, file=sys.stderr) as bar:
        for group in groups:
            written += _predict_group(predictor, group, args, colors, problems, memory=memory)
            bar.update(len(group))
    return written, [problems[i] for i in sorted(problems)]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "engine", "local") == "ray":
        return run_ray(args)
    for flag, default in (("address", None), ("workers", None), ("worker_cpus", 1)):
        if getattr(args, flag, default) != default:
            raise FcnsegError(f"--{flag.replace('_', '-')} goes with --engine ray")
    return run_local(args)


def run_local(args: argparse.Namespace) -> int:
    """``fcnseg predict`` in this process."""
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


# ---------------------------------------------------------------------------------------------- --engine ray

# The flags predictor_from_flags reads: each Ray worker builds its Predictor from them, as this process would.
PREDICTOR_FLAGS = ("runtime", "calibration", "calibration_images", "tile", "overlap", "flip", "scales", "batch",
                   "quiet")  # fmt: skip


def flag_predictor(flags: dict, calibration: list[str], model):
    """The Predictor ``predictor_from_flags`` builds from ``flags`` (:data:`PREDICTOR_FLAGS`), int8 calibrating
    on ``calibration`` where no --calibration folder is given: what each Ray worker runs."""
    return predictor_from_flags(argparse.Namespace(**flags), model, [Path(f) for f in calibration])


def _check_ray_flags(args: argparse.Namespace) -> None:
    from ..ray_batch import require_ray

    require_ray()
    if args.extra:
        raise FcnsegError("--extra: fusion nets run with --engine local; expected no --extra with --engine ray")
    if args.device not in ("cpu", "cuda"):  # auto would take a GPU that Ray has not reserved for the worker
        raise FcnsegError(
            f"--device {args.device}: with --engine ray each worker gets its GPU from Ray; expected cpu or cuda"
        )
    for flag, value in (("--workers", args.workers), ("--worker-cpus", args.worker_cpus)):
        if value is not None and value < 1:
            raise FcnsegError(f"{flag} {value}: expected at least 1")


def _gather(items: Sequence[str]) -> tuple[list, list[str]]:
    """The inputs that ``items`` name (local files, folders and globs; fsspec URLs of files, folders and globs),
    each once, and the problems with them, in the order given."""
    from ..ray_batch import expand_url, is_url, local_input
    from ._inputs import collect_inputs

    inputs, problems, seen = [], [], set()
    for item in items:
        if is_url(item):
            found, problem = expand_url(item)
        else:
            files, missing = collect_inputs([item])
            found, problem = [local_input(f) for f in files], (missing[0] if missing else None)
        for one in found:
            key = one.source if is_url(one.source) else Path(one.source).resolve()
            if key not in seen:
                seen.add(key)
                inputs.append(one)
        if problem:
            problems.append(problem)
    return inputs, problems


def _named(one) -> PurePath:
    """An input as a path whose name gives its output stem: a local file's, a URL's path part."""
    from ..ray_batch import is_url

    return PurePosixPath(one.source.split("://", 1)[1]) if is_url(one.source) else Path(one.name)


def _local_file(one) -> Path | None:
    """The local file an input reads (a path, or a file:// URL), for the check that no output overwrites it."""
    from ..ray_batch import is_url

    if not is_url(one.source):
        return Path(one.source)
    import fsspec

    fs, path = fsspec.core.url_to_fs(one.source)
    return Path(path) if "file" in fs.protocol else None


def _ray_settings(args: argparse.Namespace, source) -> dict:
    """What decides the files' contents, for the record: a later run with other settings writes them again."""
    from .. import __version__

    keys = ("runtime", "calibration", "calibration_images", "tile", "overlap", "flip", "scales", "overlay", "probs",
            "confidence", "device")  # fmt: skip
    return {"fcnseg": __version__, "model": source.identity(), **{k: getattr(args, k) for k in keys}}


def _ray_jobs(args: argparse.Namespace, model, inputs: list, checkpoint: str | None) -> list:
    """Each input's job (its stem, the names of its files and their identities now), once the run is known not
    to overwrite an input."""
    from ..predict import output_names, output_stems
    from ..ray_batch import Job, identities

    out = Path(args.out)
    names = functools.partial(
        output_names, model, overlay_format=args.overlay, probs=args.probs, confidence=args.confidence
    )
    paths = [_named(one) for one in inputs]
    stems = output_stems(paths, names)
    plan = [(path, names(stem)) for path, stem in zip(paths, stems, strict=True)]
    local = [f for f in map(_local_file, inputs) if f is not None]
    check_no_input_overwritten(out, plan, _read_files(args, local, checkpoint))
    return [
        Job(i, one, stem, tuple(names(stem)), identities(out, names(stem)))
        for i, (one, stem) in enumerate(zip(inputs, stems, strict=True))
    ]


def _ray_model_and_inputs(args: argparse.Namespace) -> tuple:
    """The model (on this process's CPU: the workers load their own), its checkpoint, the inputs and the problems
    with them; every refusal made before the output folder is touched."""
    from ..hub import is_hf_source, load, pinned_hub_source
    from ..ray_batch import is_url

    _check_ray_flags(args)
    args.batch = check_batch(args.batch)
    checkpoint, items = _checkpoint_and_inputs(args)
    inputs, problems = _gather(items)
    if is_hf_source(checkpoint):  # every worker loads the commit read here, and the record names it
        checkpoint = pinned_hub_source(checkpoint, sha256=args.sha256)
    model = load(checkpoint, map_location="cpu", file=args.weights_file, sha256=args.sha256)
    _check_predictable(model, args, checkpoint)
    if not inputs:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise FcnsegError(f"{problems[0]}{more}" if problems else "predict: no input images")
    local = [one for one in inputs if not is_url(one.source)]
    if args.runtime in ("onnx-int8", "openvino-int8") and not (local or args.calibration):
        raise FcnsegError(f"{args.runtime} with URL inputs needs calibration images on every node (--calibration DIR)")
    return model, checkpoint, inputs, problems


def run_ray(args: argparse.Namespace) -> int:
    """``fcnseg predict --engine ray``: the inputs' files written by a pool of Ray workers; those whose files a
    run of the same settings wrote, and which are still there, are skipped."""
    from ..ray_batch import ModelSource, is_recorded, is_url, read_record, run_key

    model, checkpoint, inputs, problems = _ray_model_and_inputs(args)
    # Files by absolute path: a worker's working folder is its own.
    ckpt, file = (str(Path(f).absolute()) if f and Path(f).exists() else f for f in (checkpoint, args.weights_file))
    source = ModelSource(source=ckpt, file=file, sha256=args.sha256, device=args.device)
    jobs = _ray_jobs(args, model, inputs, checkpoint)
    out, key = Path(args.out), run_key(_ray_settings(args, source))
    entries = read_record(out, key)
    todo = [job for job in jobs if not is_recorded(out, job, entries)]
    if len(todo) < len(jobs) and not args.quiet:
        print(f"skipped {len(jobs) - len(todo)} input(s) whose files in {out} are complete")
    calibration = [one.source for one in inputs if not is_url(one.source)][: args.calibration_images]
    failed = _write_on_ray(args, source, todo, key, calibration) if todo else {}
    problems.extend(failed[i] for i in sorted(failed))
    if not args.quiet:
        print(f"wrote {len(todo) - len(failed)} mask(s) to {out}")
    for p in problems:
        error(p)
    return 2 if problems else 0


def _write_on_ray(args: argparse.Namespace, source, todo: list, key: str, calibration: list[str]) -> dict[int, str]:
    from tqdm import tqdm

    from ..ray_batch import WriteOptions, connect, write_predictions

    flags = {k: getattr(args, k) for k in PREDICTOR_FLAGS}
    if args.calibration:  # each worker reads it from its own working folder
        flags["calibration"] = str(Path(args.calibration).absolute())
    make = functools.partial(flag_predictor, flags, calibration)
    options = WriteOptions(str(Path(args.out).absolute()), args.overlay, args.probs, args.confidence)
    with connect(args.address, quiet=args.quiet):  # a cluster that cannot be reached leaves --out untouched
        _check_writable(Path(args.out))
        with tqdm(total=len(todo), unit="img", disable=len(todo) <= 1 or args.quiet, file=sys.stderr) as bar:
            return write_predictions(todo, model=source, make_predictor=make, options=options, key=key,
                                     workers=args.workers, cpus=args.worker_cpus, batch_size=args.batch,
                                     progress=bar.update)  # fmt: skip
