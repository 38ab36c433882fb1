"""Prediction on a Ray cluster with Ray Data: one model per worker, the files ``fcnseg predict`` writes.

:func:`predict_dataset` segments a ``ray.data.Dataset`` of images (the bytes of image files, or H x W x 3 arrays)
and returns a dataset of masks, for pipelines of one's own. ``fcnseg predict --engine ray`` runs on the same
workers through :func:`write_predictions`: each input (a path that every node reads, or an fsspec URL) goes to a
pool of Ray actors, each holding one model and one :class:`~fcnseg.inference.Predictor`, which write the input's
files with :func:`fcnseg.predict.write_prediction`, as the single-process command does.

An input's files are written in a staging folder inside the output folder and renamed into place together, once
all of them are complete. A worker that dies is restarted by Ray and its unfinished batch retried; an input whose
files this run has already written is not written again. The output folder keeps a record (:data:`RECORD`) of the
files written for each input, so that the same command run again skips the inputs whose files are as recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FcnsegError, ImageError, first_line
from .imageio import IMAGE_EXTENSIONS, load_image

if TYPE_CHECKING:
    import ray.data

    from .inference import Predictor
    from .models.base import SegmentationModel

__all__ = [
    "RECORD",
    "Input",
    "Job",
    "ModelSource",
    "WriteOptions",
    "connect",
    "decode_image",
    "expand_url",
    "identities",
    "is_recorded",
    "is_url",
    "local_input",
    "predict_dataset",
    "read_image",
    "read_record",
    "remove_staging",
    "require_ray",
    "run_key",
    "user_error",
    "write_predictions",
]

RECORD = ".fcnseg-predict.jsonl"
"""The output folder's record: a first line naming the run's settings, then one line per input whose files a run
wrote (its stem, its input and the identity of each file)."""

STAGE_PREFIX = ".fcnseg-stage-"  # an input's files are written in OUT/.fcnseg-stage-*.tmp/, then renamed into OUT

# Ray Data restarts a dead actor and retries its tasks without bound by default; bounded here so that a worker that
# dies on every try (out of memory on one input, say) fails the run instead of looping. Ray's actor fault tolerance
# (docs.ray.io, "Actor Fault Tolerance"): max_restarts re-runs the constructor, max_task_retries resubmits the task.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3

# At most this many blocks in the dataset of inputs: a block is the unit Ray Data hands to a worker (and retries
# when the worker dies), so one input per block up to here, and more per block beyond.
MAX_BLOCKS = 1024

RAY_MISSING = "Ray Data is not installed: pip install 'fcnseg[ray]'"


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line FcnsegError naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships as the ray[data] extra)
    except ImportError:
        raise FcnsegError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def connect(address: str | None, *, quiet: bool = False) -> Iterator[Any]:
    """Ray, connected for the block: the connection this process already has, else ``ray.init(address)`` (None:
    Ray's own rule, RAY_ADDRESS, else a cluster ``ray start`` started on this machine, else a new local one),
    disconnected afterwards. A cluster that cannot be reached is a one-line FcnsegError. ``quiet``: Ray's and Ray
    Data's messages below warnings are left out."""
    ray = require_ray()
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    if quiet:
        data_log.setLevel(logging.WARNING)
    try:
        if ray.is_initialized():
            yield ray
            return
        try:
            ray.init(address=address, logging_level=logging.WARNING if quiet else logging.INFO)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--address {address}" if address else "Ray"
            raise FcnsegError(f"{where}: cannot connect to a Ray cluster ({first_line(e)})") from None
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        data_log.setLevel(level)


# ------------------------------------------------------------------------------------------------ inputs


def is_url(text: str) -> bool:
    """Whether ``text`` names a file by an fsspec URL (``s3://...``, ``file://...``) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


@dataclass(frozen=True)
class Input:
    """One input: where a worker reads it (an absolute path or a URL), the name the user knows it by, and its
    identity (size and modification time), which the record compares."""

    source: str
    name: str
    identity: str


def local_input(path: Path) -> Input:
    """A local file as an :class:`Input`: read by its absolute path (a worker's working folder is its own)."""
    try:
        st = path.stat()
        identity = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        identity = ""  # reading it says why
    return Input(str(path.absolute()), str(path), identity)


def _url_identity(info: Mapping[str, Any]) -> str:
    stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "ETag") if k in info), "")
    return f"{info.get('size', '')}:{stamp}"


def expand_url(item: str) -> tuple[list[Input], str | None]:
    """The image files an fsspec URL names (a file, a folder's images sorted, or a glob pattern) and the problem
    with it (None when it names some), as :func:`fcnseg.cli._inputs.collect_inputs` does for local paths."""
    try:
        import fsspec
    except ImportError:
        raise FcnsegError(f"{item}: reading URLs needs fsspec: pip install 'fcnseg[ray]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(item)
        if any(c in path for c in "*?["):
            found = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") == "file"}
            problem = None if found else f"{item}: pattern matches no file"
        elif fs.isdir(path):
            found = {i["name"]: i for i in fs.ls(path, detail=True) if i.get("type") == "file"}
            found = {p: i for p, i in found.items() if PurePosixPath(p).suffix.lower() in IMAGE_EXTENSIONS}
            problem = None if found else f"{item}: folder holds no image files"
        else:
            found = {path: fs.info(path)}
            problem = None
    except FileNotFoundError:
        return [], f"{item}: no such file or folder"
    except (OSError, ValueError, ImportError) as e:  # an unknown protocol, or one whose library is missing
        return [], f"{item}: cannot list ({first_line(e)})"
    urls = [(fs.unstrip_protocol(p), info) for p, info in sorted(found.items())]
    return [Input(url, url, _url_identity(info)) for url, info in urls], problem


def _renamed(error: FcnsegError, names: Mapping[str, str]) -> ImageError:
    message = str(error)
    for old, new in sorted(names.items(), key=lambda item: -len(item[0])):
        message = message.replace(old, new)
    return ImageError(message)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes as H x W x 3 uint8, read by :func:`fcnseg.imageio.load_image` (every check it makes)
    from a private temporary copy; an error names the file ``name``."""
    suffix = PurePosixPath(name).suffix
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
    with tempfile.TemporaryDirectory(prefix="fcnseg-ray-") as tmp:
        path = Path(tmp) / f"image{suffix}"
        path.write_bytes(data)
        try:
            return load_image(path)
        except FcnsegError as e:
            raise _renamed(e, {str(path): name, path.name: name}) from None


def read_image(source: str, name: str) -> np.ndarray:
    """The image at ``source`` (a local path, or an fsspec URL this process can open) as H x W x 3 uint8, its
    errors naming it ``name``, as :func:`fcnseg.imageio.load_image` words them."""
    if not is_url(source):
        try:
            return load_image(source)
        except FcnsegError as e:
            raise _renamed(e, {source: name}) from None
    import fsspec

    try:
        with fsspec.open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{name}: cannot read image (file not found)") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot read image ({first_line(e)})") from None
    return decode_image(data, name)


# ------------------------------------------------------------------------------------------------ workers


@dataclass(frozen=True)
class ModelSource:
    """How each worker gets its model: :func:`fcnseg.hub.load` of a checkpoint file or published weights name
    (``file`` and ``sha256`` as there), or a checkpoint dict (:func:`fcnseg.checkpoint.checkpoint_dict`)."""

    source: str | None = None
    file: str | None = None
    sha256: str | None = None
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)
    device: str = "cpu"

    def load(self) -> SegmentationModel:
        from .device import pick_device
        from .hub import load, model_from_checkpoint

        device = pick_device(self.device)
        if self.checkpoint is not None:
            return model_from_checkpoint(self.checkpoint).to(device)
        return load(self.source, map_location=device, file=self.file, sha256=self.sha256)

    def identity(self) -> list:
        """What the record keeps of a model loaded by name: the checkpoint file's (or the local weights file's, or
        a saved folder's two files') path, size and modification time, or the name (a Hub source pinned to its
        commit) and the pin."""
        from .pretrained import CONFIG_NAME, WEIGHTS_NAME

        files = []
        for f in (Path(f) for f in (self.source, self.file) if f):
            files += [f] if f.is_file() else [f / CONFIG_NAME, f / WEIGHTS_NAME] if f.is_dir() else []
        stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
        return [self.source, self.sha256, stats]


class _Worker:
    """What every Ray actor here holds: one model (loaded once, in the constructor) and its Predictor, computing on
    ``threads`` CPU threads (the CPUs Ray reserved for it)."""

    def __init__(self, model: ModelSource, make_predictor: Callable[[SegmentationModel], Predictor], threads: int):
        import torch

        # Float sums are split across threads, so the thread count decides the last bits of the probabilities:
        # set, not left to the environment, so that a run is repeatable.
        torch.set_num_threads(threads)
        self.predictor = make_predictor(model.load())

    def outputs(self, images: list[np.ndarray], **asked: bool) -> list[Any]:
        """Each image's :class:`~fcnseg.inference.Outputs`, or the FcnsegError it raised: in one call where all
        go through, else one by one (one image the model refuses would fail its whole batch)."""
        try:
            return self.predictor.outputs(images, **asked)
        except FcnsegError as e:
            if len(images) == 1:
                return [e]
        return [result for image in images for result in self.outputs([image], **asked)]


def _mask_columns(heads: Sequence[str]) -> list[str]:
    # The first head's masks are `mask`, the others' `mask_<head>`: the file names' rule (STEM, STEM_<head>).
    return ["mask", *(f"mask_{head}" for head in heads[1:])]


class _Masker(_Worker):
    """Masks of a batch of images (``column``: encoded files' bytes, or arrays); the other columns pass through."""

    def __init__(self, model: ModelSource, make_predictor: Callable, threads: int, column: str) -> None:
        super().__init__(model, make_predictor, threads)
        self.column = column

    def _image(self, value: Any, name: str) -> np.ndarray:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image(bytes(value), name)
        return np.asarray(value)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        values = batch[self.column]
        names = batch["path"] if "path" in batch else [self.column] * len(values)  # what an error names
        images, errors = [], [""] * len(values)
        for i, (value, name) in enumerate(zip(values, names, strict=True)):
            try:
                images.append(self._image(value, str(name)))
            except FcnsegError as e:
                images.append(None)
                errors[i] = str(e)
        good = [i for i, image in enumerate(images) if image is not None]
        for i, result in zip(good, self.outputs([images[i] for i in good]), strict=True):
            images[i] = result
            if isinstance(result, FcnsegError):
                errors[i] = str(result)
        heads = list(self.predictor.model.heads)
        out = {k: v for k, v in batch.items() if k != self.column}
        for head, column in zip(heads, _mask_columns(heads), strict=True):
            empty = np.zeros((0, 0), np.uint8)
            out[column] = [empty if errors[i] else images[i].masks[head] for i in range(len(values))]
        out["error"] = np.array(errors, dtype=object)
        return out


def _pool(concurrency: int | None) -> Any:
    """Ray Data's actor pool: ``concurrency`` actors, else from one up to what the cluster holds (Ray Data's
    ``map_batches``: ``compute=ActorPoolStrategy(size=n)``; ``concurrency=`` is deprecated in Ray 2.60)."""
    import ray.data

    if concurrency is None:
        return ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    if concurrency < 1:
        raise FcnsegError(f"concurrency {concurrency}: expected at least 1 worker")
    return ray.data.ActorPoolStrategy(size=concurrency)


def _map(ds: ray.data.Dataset, worker: type, kwargs: dict[str, Any], options: Mapping[str, Any]) -> ray.data.Dataset:
    """``ds.map_batches`` over a pool of ``worker`` actors of ``options["cpus"]`` CPUs each (and one GPU where the
    model goes to CUDA), restarted, and their tasks retried, when one dies."""
    gpu = str(kwargs["model"].device).startswith("cuda")
    cpus = int(options.get("cpus", 1))
    if cpus < 1:
        raise FcnsegError(f"cpus {cpus}: expected at least 1 CPU per worker")
    with warnings.catch_warnings():
        # max_restarts and max_task_retries reach the actors only as `ray_remote_args`, which Ray 2.60 flags.
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.*")
        return ds.map_batches(
            worker,
            fn_constructor_kwargs={**kwargs, "threads": cpus},
            batch_size=options.get("batch_size", 1),
            compute=_pool(options.get("concurrency")),
            num_cpus=cpus,
            num_gpus=1 if gpu else 0,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )


def predict_dataset(
    ds: ray.data.Dataset,
    model: SegmentationModel | str | os.PathLike,
    *,
    column: str = "image",
    runtime: str = "eager",
    tile: int | None = None,
    overlap: int = 64,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 1,
    concurrency: int | None = None,
    cpus: int = 1,
    device: str = "cpu",
) -> ray.data.Dataset:
    """``ds`` with each row's masks: ``mask`` (H x W uint8 labels of the first head), ``mask_<head>`` for every
    further head, and ``error`` (an image that cannot be read or segmented: its one-line reason, and 0 x 0 masks;
    else empty). ``column`` holds the images, as the bytes of image files (``ray.data.read_binary_files``; a
    ``path`` column names them in errors) or as H x W x 3 arrays (``ray.data.read_images``, ``from_items``); it is
    left out of the result, the other columns pass through.

    ``model``: a model, or a checkpoint file or published weights name every node can load. Each of
    ``concurrency`` Ray actors (default: from one up to what the cluster holds) of ``cpus`` CPUs (torch threads)
    loads it once and segments with a :class:`~fcnseg.inference.Predictor` of these options (``device="cuda"``:
    one GPU per actor). Lazy, as Ray Data is: nothing runs until the result is consumed."""
    import functools

    from .inference import Predictor

    require_ray()
    if isinstance(model, (str, os.PathLike)):  # a file by its absolute path: a worker's working folder is its own
        path = Path(model)
        source = ModelSource(source=str(path.absolute()) if path.exists() else os.fspath(model), device=device)
    else:
        from .checkpoint import checkpoint_dict

        source = ModelSource(checkpoint=checkpoint_dict(model), device=device)
    options = {"runtime": runtime, "tile": tile, "overlap": overlap, "flip": flip, "scales": list(scales),
               "batch_size": batch_size}  # fmt: skip
    make = functools.partial(Predictor, **options)
    kwargs = {"model": source, "make_predictor": make, "column": column}
    return _map(ds, _Masker, kwargs, {"batch_size": batch_size, "concurrency": concurrency, "cpus": cpus})


# ------------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class Job:
    """One input to write: its place in the input order, the input, its output stem, the names of its files and
    their identities before the run (None where absent), by which a retried batch sees what this run wrote."""

    index: int
    input: Input
    stem: str
    names: tuple[str, ...]
    before: tuple[tuple[int, int, int] | None, ...]


def identities(out: Path, names: Sequence[str]) -> tuple[tuple[int, int, int] | None, ...]:
    """(inode, size, modification time in ns) of each file ``out/NAME``, None where absent: a file renamed into
    place is a new inode, so a file rewritten is told from the one it replaced."""
    found = []
    for name in names:
        try:
            st = os.stat(out / name)
            found.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            found.append(None)
    return tuple(found)


def _written_by_this_run(out: Path, job: Job) -> tuple | None:
    """The files' identities where every one of ``job``'s files is there and was replaced since the run began
    (a worker that died after writing them; its batch is retried), else None."""
    now = identities(out, job.names)
    if any(ident is None for ident in now) or any(a == b for a, b in zip(now, job.before, strict=True)):
        return None
    return now


def _keep_mode(staged: Path, target: Path) -> None:
    # A file written over an older one keeps the older one's mode, as fcnseg.io.atomic_write leaves it.
    with contextlib.suppress(OSError):
        os.chmod(staged, target.stat().st_mode & 0o7777)


@dataclass(frozen=True)
class WriteOptions:
    """What ``fcnseg predict`` writes besides masks: overlays (their format), probabilities, confidence."""

    out: str
    overlay: str | None = None
    probs: bool = False
    confidence: bool = False


class _FileWriter(_Worker):
    """Reads, segments and writes the files of a batch of :class:`Job` rows; returns each one's index, its
    problem (empty when written) and its files' identities (JSON)."""

    def __init__(self, model: ModelSource, make_predictor: Callable, threads: int, options: WriteOptions) -> None:
        from .predict import mask_colors

        super().__init__(model, make_predictor, threads)
        self.options, self.out = options, Path(options.out)
        self.colors = mask_colors(self.predictor.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [_job(row) for row in batch["job"]]
        done: dict[int, tuple[str, Any]] = {}
        read: list[tuple[Job, np.ndarray]] = []
        for job in jobs:
            if (already := _written_by_this_run(self.out, job)) is not None:
                done[job.index] = ("", already)
                continue
            try:
                read.append((job, read_image(job.input.source, job.input.name)))
            except FcnsegError as e:
                done[job.index] = (str(e), None)
        asked = {"proba": self.options.probs, "confidence": self.options.confidence}
        results = self.outputs([rgb for _, rgb in read], **asked) if read else []
        for (job, rgb), result in zip(read, results, strict=True):
            done[job.index] = (str(result), None) if isinstance(result, FcnsegError) else self._write(job, rgb, result)
        rows = [done[job.index] for job in jobs]
        return {
            "index": np.array([job.index for job in jobs], dtype=np.int64),
            "problem": np.array([problem for problem, _ in rows], dtype=object),
            "files": np.array([json.dumps(files) for _, files in rows], dtype=object),
        }

    def _write(self, job: Job, rgb: np.ndarray, result: Any) -> tuple[str, Any]:
        """Write ``job``'s files in a staging folder, then rename each into place: (problem, identities)."""
        from .predict import write_prediction

        overlay = {"overlay_on": rgb, "overlay_format": self.options.overlay} if self.options.overlay else {}
        try:
            stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, suffix=".tmp", dir=self.out))
        except OSError as e:
            return f"--out {self.out}: cannot write ({e.strerror or e})", None
        try:
            model = self.predictor.model
            write_prediction(model, result, stage, job.stem, colors=self.colors, **overlay)
            for name in job.names:
                _keep_mode(stage / name, self.out / name)
                os.replace(stage / name, self.out / name)
        except OSError as e:
            return f"{self.out / job.stem}: cannot write ({e.strerror or e})", None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return "", identities(self.out, job.names)


def _row(job: Job) -> dict[str, str]:
    return {"job": json.dumps(asdict(job))}


def _job(text: str) -> Job:
    d = json.loads(text)
    before = tuple(tuple(x) if x is not None else None for x in d["before"])
    return Job(d["index"], Input(**d["input"]), d["stem"], tuple(d["names"]), before)


def remove_staging(out: Path) -> None:
    """Remove the staging folders a killed worker left in ``out`` (each holds one input's unfinished files)."""
    for stage in Path(out).glob(f"{STAGE_PREFIX}*.tmp"):
        shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the record


def run_key(settings: Mapping[str, Any]) -> str:
    """A digest of what decides the files' contents (model, execution path and options)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def read_record(out: Path, key: str) -> dict[str, dict[str, Any]]:
    """The record's entries by stem (the last one of each), where its settings are ``key``; else none."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        lines = (Path(out) / RECORD).read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return entries
    if not lines or lines[0].strip() != json.dumps({"key": key}):
        return entries
    for line in lines[1:]:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if line.endswith("\n"):  # a line a killed run left unfinished is no entry
                entry = json.loads(line)
                entries[entry["stem"]] = entry
    return entries


def is_recorded(out: Path, job: Job, entries: Mapping[str, dict[str, Any]]) -> bool:
    """Whether ``job``'s files are all as the record says this input's were written: the same input (path and
    identity) and every file still the one written then."""
    entry = entries.get(job.stem)
    if entry is None or entry.get("input") != [job.input.source, job.input.identity]:
        return False
    now = identities(out, job.names)
    return entry.get("files") == [list(ident) if ident else None for ident in now]


def _begin_record(out: Path, key: str) -> None:
    from .io import atomic_write

    path = Path(out) / RECORD
    header = json.dumps({"key": key}) + "\n"
    with contextlib.suppress(OSError), open(path) as f:
        if f.readline() == header:
            return
    with atomic_write(path, "w") as f:  # other settings: what the old record says no longer holds
        f.write(header)


def write_predictions(
    jobs: Sequence[Job],
    *,
    model: ModelSource,
    make_predictor: Callable[[SegmentationModel], Predictor],
    options: WriteOptions,
    key: str,
    workers: int | None = None,
    cpus: int = 1,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[int, str]:
    """Write every job's files over the Ray cluster this process is connected to: ``{index: problem}`` of the
    jobs that could not be written. Each job written is added to the record (settings ``key``) as its result
    arrives; ``progress(n)`` is told of every n results. ``workers`` actors (default: from one up to what the
    cluster holds) of ``cpus`` CPUs each."""
    import ray.data

    out = Path(options.out)
    _begin_record(out, key)
    remove_staging(out)
    blocks = min(MAX_BLOCKS, -(-len(jobs) // batch_size))
    ds = ray.data.from_items([_row(job) for job in jobs], override_num_blocks=blocks)
    kwargs = {"model": model, "make_predictor": make_predictor, "options": options}
    pool = {"batch_size": batch_size, "concurrency": workers and min(workers, blocks), "cpus": cpus}
    results = _map(ds, _FileWriter, kwargs, pool)
    by_index = {job.index: job for job in jobs}
    problems: dict[int, str] = {}
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False  # the caller's `progress` instead
    try:
        with open(out / RECORD, "a") as record:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                _take(batch, by_index, problems, record)
                if progress:
                    progress(len(batch["index"]))
    except Exception as e:
        if (mistake := user_error(e)) is not None:
            raise mistake from None
        raise
    finally:
        context.enable_progress_bars = bars
        remove_staging(out)
    return problems


def user_error(error: BaseException) -> FcnsegError | None:
    """The user's mistake behind an error of a Ray run, where a worker raised one: an FcnsegError reaches the
    driver as the last line of the worker's traceback, in the message of the error Ray raises (a worker whose
    constructor failed -- no checkpoint at that path on its node, say -- is an ActorDiedError)."""
    seen = error
    while seen is not None:
        if isinstance(seen, FcnsegError):
            return FcnsegError(first_line(seen))
        seen = seen.__cause__
    found = re.findall(r"^fcnseg\.[\w.]*Error: (.+)$", str(error), flags=re.MULTILINE)
    return FcnsegError(found[-1]) if found else None


def _take(batch: Mapping[str, np.ndarray], jobs: Mapping[int, Job], problems: dict[int, str], record: Any) -> None:
    """Note a batch of results: each problem by its index, each job written as a line of the record."""
    for index, problem, files in zip(batch["index"], batch["problem"], batch["files"], strict=True):
        job = jobs[int(index)]
        if problem:
            problems[job.index] = str(problem)
            continue
        problems.pop(job.index, None)  # a retried batch's result of a job that failed in a first try
        entry = {"stem": job.stem, "input": [job.input.source, job.input.identity], "files": json.loads(files)}
        record.write(json.dumps(entry) + "\n")
    record.flush()
