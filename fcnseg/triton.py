"""A Triton Inference Server model repository: ``REPO/NAME/config.pbtxt``, ``labels.txt``, ``fcnseg.json`` and
``REPO/NAME/<version>/model.onnx``, served by Triton's ONNX Runtime backend (and by KServe's Triton runtime).

The layout and every field follow Triton's model repository documentation and its ``model_config.proto``
(github.com/triton-inference-server/common, ``protobuf/model_config.proto``). The graph itself is written by the
caller (:func:`fcnseg.export.export_triton`: fp32 checked against eager PyTorch, or int8); this module knows the
folder, the configuration and the versions. A new model folder is built whole under a temporary name beside its
place and renamed into place; a folder this module made before gets a new version folder (``2/`` beside ``1/``)
when the new graph has the same interface (input, classes, preprocessing), since Triton serves every version of
a model with the one ``config.pbtxt``. Any other folder of that name is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from . import __version__
from .checkpoint import describe
from .errors import FcnsegError, shown
from .io import atomic_write, current_umask

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models (model_config.proto: platform)
MARKER = "fcnseg.json"
"""The file that marks a model folder fcnseg wrote: its interface and the model's description."""
MARKER_FORMAT = "fcnseg-triton-model"
MAX_QUEUE_DELAY_US = 1000
"""dynamic_batching's wait for more requests of the same shape: 1 ms, small next to one image's inference."""
GRAPH_FILE = "model.onnx"  # the file name Triton's ONNX Runtime backend loads from a version folder by default

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def check_name(name: str) -> str:
    """``name`` if it can name a model folder of the repository (letters, digits, ``_``, ``.``, ``-``, starting
    with a letter or digit: no ``/``, no ``..``); else an FcnsegError naming ``--name``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FcnsegError(
            f"--name {shown(name)}: expected 1-128 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit (the model's folder in the repository and its name in Triton's API)"
        )
    return name


def default_name(source: str | None, model: nn.Module | None = None) -> str:
    """The model name a repository gets without ``--name``: the checkpoint file's stem or the published weights
    name, other characters replaced by ``_``; else the model's architecture (``fcn8s``)."""
    text = ""
    if source:
        p = Path(source)
        text = p.stem if p.suffix.lower() in _WEIGHT_SUFFIXES else p.name
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip("._-")[:128]
    if not text and model is not None and model.build_config:
        text = model.build_config["name"]
    return check_name(text or "fcnseg")


def labels(model: nn.Module) -> list[str]:
    """One name per output channel: every head's class names, the heads in output order (one line each in
    ``labels.txt``, so a line break in a name becomes a space)."""
    names = [n for head in model.class_names().values() for n in head]
    return [" ".join(str(n).splitlines()) or f"class {i}" for i, n in enumerate(names)]


def interface(model: nn.Module, cpu_only: bool = False) -> dict[str, Any]:
    """What a client and the server depend on: input channels, heads, labels, preprocessing and whether the graph
    is for the CPU only (int8) (JSON-ready). Versions of one model folder must share it: one ``config.pbtxt``,
    with its one instance group, describes them all."""
    value = {
        "cpu_only": cpu_only,
        "input_channels": model.in_channels,
        "heads": dict(model.heads),
        "labels": labels(model),
        "preprocessing": model.preprocessing.to_dict(),
    }
    return json.loads(json.dumps(value))  # tuples as lists: equal to what a marker file reads back


def _number(v: float) -> str:
    return repr(float(v))


def parameters(model: nn.Module, extra: dict[str, str] | None = None) -> dict[str, str]:
    """``config.pbtxt``'s ``parameters``: what a client needs to prepare an input and read the output. Triton's
    parameters are string values (model_config.proto: ``ModelParameter.string_value``); lists are comma-separated."""
    pp = model.preprocessing
    heads = model.heads
    layout = "N x K x H x W logits, argmax over K gives the class in labels.txt"
    if len(heads) > 1:
        layout = (
            "N x K x H x W logits of every head concatenated along K in the order of 'heads'; argmax over each "
            "head's slice; labels.txt lists every head's classes in that order"
        )
    values = {
        "model": (model.build_config or {}).get("name", type(model).__name__),
        "fcnseg_version": __version__,
        "mean": ",".join(map(_number, pp.mean)),
        "std": ",".join(map(_number, pp.std)),
        "channel_order": pp.channel_order,
        "value_range": _number(pp.value_range),
        "normalisation": "x = (pixel / 255 * value_range - mean) / std per channel, channels in channel_order, "
        "N x C x H x W float32, any H and W",
        "alignment": model.alignment,
        "heads": ",".join(f"{h}:{k}" for h, k in heads.items()),
        "output_layout": layout,
    }
    return {**values, **(extra or {})}


def _quoted(text: str) -> str:
    """A protobuf text-format string literal: quotes and backslashes escaped, bytes outside printable ASCII as
    octal escapes of their UTF-8 (the escapes protobuf's text format reads)."""
    out = []
    for b in str(text).encode():
        ch = chr(b)
        out.append("\\" + ch if ch in '"\\' else ch if 32 <= b < 127 else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


IO = tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]


def graph_io(path: str | os.PathLike) -> tuple[IO, dict[str, str]]:
    """The ONNX graph's inputs and outputs as ``(name, dims without the batch axis)``, a dynamic axis as -1, as
    ``config.pbtxt`` spells them, and its IR version and opset (what the server's ONNX Runtime must read); an
    FcnsegError unless every tensor is float32 with a dynamic batch axis."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}

    def dims(value) -> tuple[str, list[int]]:
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if t.elem_type != onnx.TensorProto.FLOAT or len(shape) < 2 or shape[0] != -1:
            raise FcnsegError(f"{path}: tensor {value.name!r} is not float32 with a dynamic batch axis")
        return value.name, shape[1:]

    inputs = [dims(v) for v in proto.graph.input if v.name not in weights]
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    versions = {"onnx_ir_version": str(proto.ir_version), "onnx_opset": str(opset)}
    return (inputs, [dims(v) for v in proto.graph.output]), versions


def config_text(
    name: str,
    io: IO,
    max_batch_size: int,
    params: dict[str, str],
    *,
    cpu_only: bool = False,
) -> str:
    """``config.pbtxt`` in protobuf text format (the fields of Triton's ``ModelConfig``)."""

    def tensor(tensor_name: str, shape: list[int], label: bool) -> str:
        extra = '\n    label_filename: "labels.txt"' if label else ""
        return (f"  {{\n    name: {_quoted(tensor_name)}\n    data_type: TYPE_FP32\n"
                f"    dims: [ {', '.join(map(str, shape))} ]{extra}\n  }}")  # fmt: skip

    inputs, outputs = io
    lines = [
        f"# Written by fcnseg {__version__} (fcnseg export --format triton); {GRAPH_FILE} in each version folder.",
        f"name: {_quoted(name)}",
        f'platform: "{PLATFORM}"',
        # > 0: Triton adds the batch axis in front of every dims below (model_config.proto: max_batch_size).
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(tensor(n, s, False) for n, s in inputs) + "\n]",
        "output [\n" + ",\n".join(tensor(n, s, True) for n, s in outputs) + "\n]",
        # Requests of one image size are joined into one batch (requests of other sizes run apart).
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}",
    ]
    if cpu_only:
        # int8 QDQ graphs are made for the CPU's u8 x s8 kernels; fp32 keeps Triton's default instead
        # (model_config.proto: one instance on each available GPU, the CPU where there is none).
        lines.append("instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]")
    for key, value in params.items():
        lines.append(f"parameters {{\n  key: {_quoted(key)}\n  value: {{ string_value: {_quoted(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def _versions(folder: Path) -> list[int]:
    """The version folders Triton serves: numerically named, not starting with 0 (Triton ignores the others)."""
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0")


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def check_destination(repo: str | os.PathLike, name: str) -> int:
    """The version the next export of ``name`` into ``repo`` gets: 1 for a new model folder, else one more than
    the newest of a folder fcnseg wrote. An FcnsegError naming ``--out`` for a repository that is a file or a
    model folder of that name fcnseg did not write."""
    repo = Path(repo)
    folder = repo / check_name(name)
    if repo.exists() and not repo.is_dir():
        raise FcnsegError(f"--out {repo}: is a file; expected the model repository's folder")
    if not folder.exists():
        return 1
    if not folder.is_dir() or _marker(folder) is None:
        raise FcnsegError(
            f"--out {repo}: {folder} exists and is not a model fcnseg exported (no {MARKER}); "
            "choose another --name or another --out"
        )
    return max(_versions(folder), default=0) + 1


def _check_same_interface(folder: Path, model: nn.Module, cpu_only: bool) -> None:
    old = (_marker(folder) or {}).get("interface") or {}
    new = interface(model, cpu_only)
    if old.get("cpu_only") != new["cpu_only"]:
        held = "int8 (CPU only)" if old.get("cpu_only") else "fp32"
        raise FcnsegError(
            f"--out {folder.parent}: {folder} holds {held} versions, and Triton serves every version with one "
            "config.pbtxt and one instance group; export the other precision under another --name"
        )
    if old != new:
        raise FcnsegError(
            f"--out {folder.parent}: {folder} holds a model of another input, classes or preprocessing, and Triton "
            "serves every version with one config.pbtxt; choose another --name"
        )


def _open_folder(path: Path) -> None:
    """``path`` readable by others as a plain ``mkdir`` leaves it (mkdtemp makes it private): the server reading
    the repository often runs as another user (KServe's Triton runtime runs as user 1000)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o777 & ~current_umask())


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _describe_folder(folder: Path, model: nn.Module, config: str, cpu_only: bool) -> None:
    """``config.pbtxt``, ``labels.txt`` and the marker, each written atomically."""
    _write_text(folder / "labels.txt", "".join(f"{n}\n" for n in labels(model)))
    marker = {"format": MARKER_FORMAT, "interface": interface(model, cpu_only), "model": describe(model)}
    _write_text(folder / MARKER, json.dumps(marker, indent=1) + "\n")
    _write_text(folder / "config.pbtxt", config)


WriteGraph = Callable[[Path], dict[str, str]]
"""Writes the graph at the path given and returns the configuration parameters it adds."""


def write_repository(
    model: nn.Module,
    repo: str | os.PathLike,
    name: str,
    write_graph: WriteGraph,
    *,
    max_batch_size: int = 8,
    cpu_only: bool = False,
) -> tuple[Path, int]:
    """Write ``repo/name`` for ``model``, its graph written by ``write_graph``; returns the model folder and the
    version written. A new folder is staged as ``repo/.name.*.tmp`` and renamed into place; in a folder fcnseg
    wrote before (same interface), the version is staged as ``.N.*.tmp`` (Triton ignores folders that are not
    numbers), renamed to ``N``, and then the configuration files are replaced."""
    if max_batch_size < 1:
        raise FcnsegError(f"--max-batch-size {max_batch_size}: expected at least 1")
    version = check_destination(repo, name)
    repo, folder = Path(repo), Path(repo) / name
    if version > 1:
        _check_same_interface(folder, model, cpu_only)
    try:
        repo.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{name if version == 1 else version}.", suffix=".tmp",
                                      dir=repo if version == 1 else folder))  # fmt: skip
    except OSError as e:
        raise FcnsegError(f"--out {repo}: cannot write ({e.strerror or e})") from None
    try:
        graph_dir = stage / "1" if version == 1 else stage
        graph_dir.mkdir(exist_ok=True)
        extra = write_graph(graph_dir / GRAPH_FILE)
        io, versions = graph_io(graph_dir / GRAPH_FILE)
        params = parameters(model, {**extra, **versions})
        config = config_text(name, io, max_batch_size, params, cpu_only=cpu_only)
        _open_folder(stage)
        if version == 1:
            _describe_folder(stage, model, config, cpu_only)
        _rename(stage, folder if version == 1 else folder / str(version))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if version > 1:
        _describe_folder(folder, model, config, cpu_only)
    return folder, version


def _rename(stage: Path, target: Path) -> None:
    try:
        os.rename(stage, target)  # fails on a non-empty target: an export that finished first is kept
    except OSError as e:
        raise FcnsegError(f"--out {target.parent}: cannot put {target.name} in place ({e.strerror or e})") from None
