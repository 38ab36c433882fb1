"""Models as Hugging Face Hub repositories: ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

The folder :func:`save_pretrained` writes is what :func:`push_to_hub` uploads and what ``fcnseg.from_pretrained``
(:mod:`fcnseg.hub`) reads back. The weights are a safetensors file, which holds tensors and a JSON header only, so
reading one runs no code; ``config.json`` holds what a checkpoint holds besides the tensors (architecture and
builder options, classes, palette, preprocessing, alignment). This module is the repository format and the upload;
it knows the models only through their checkpoint dict (:func:`fcnseg.checkpoint.checkpoint_dict`), so that a
model's own ``save_pretrained`` can call it. Both optional libraries come with ``pip install 'fcnseg[hub]'``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .checkpoint import FORMAT, checkpoint_dict, read_checkpoint
from .errors import CheckpointError, FcnsegError, first_line, shown
from .io import atomic_write, staged_path
from .preprocessing import Preprocessing

__all__ = [
    "CARD_NAME", "CONFIG_FORMAT", "CONFIG_NAME", "CONFIG_SCHEMA_VERSION", "WEIGHTS_NAME", "hub_error",
    "pretrained_checkpoint", "pretrained_config", "push_to_hub", "read_config", "read_metrics", "read_weights",
    "save_pretrained",
]  # fmt: skip

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CONFIG_FORMAT = "fcnseg"
# 1: tensor names as checkpoint schema 2 (every head under score_heads.<name>.). A change of either the keys of
# config.json or the tensor names bumps it; a reader refuses a newer one rather than misread it.
CONFIG_SCHEMA_VERSION = 1
HUB_EXTRA = "pip install 'fcnseg[hub]'"

# metrics.json's four figures (fractions) as the model card names them: (model-index metric type, name).
METRICS = {
    "pixel_acc": ("pixel_accuracy", "Pixel accuracy (%)"),
    "mean_acc": ("mean_accuracy", "Mean accuracy (%)"),
    "mean_iu": ("mean_iou", "Mean IU (%)"),
    "fw_iu": ("frequency_weighted_iou", "Frequency weighted IU (%)"),
}


def optional(module: str, what: str) -> Any:
    """``module`` imported, or a one-line FcnsegError naming the extra that provides it."""
    try:
        return import_module(module)
    except ImportError:
        raise FcnsegError(f"{what} needs huggingface_hub and safetensors: {HUB_EXTRA}") from None


# ------------------------------------------------------------------------------------------------ writing


def save_pretrained(
    source: nn.Module | str | os.PathLike | Mapping[str, Any],
    save_directory: str | os.PathLike,
    *,
    metrics: str | os.PathLike | Mapping[str, Any] | None = None,
    license: str | None = None,
    datasets: str | Sequence[str] | None = None,
    tags: Sequence[str] = (),
    repo_id: str | None = None,
    eval_split: str | None = None,
) -> Path:
    """Write ``source`` (a model built through the registry, an fcnseg checkpoint file or its dict) into
    ``save_directory`` as a Hub repository: ``model.safetensors``, ``config.json`` and ``README.md``, each
    atomically. Returns the folder.

    ``metrics``: an evaluation to show on the card (``fcnseg eval --out DIR``'s folder, its ``metrics.json``, or
    that document; one per head as ``{head: document}``), measured on the first of ``datasets`` (Hub dataset ids,
    or names) and its split ``eval_split``. ``license``: a Hub license id (``mit``, ``apache-2.0``, ``other``).
    ``tags`` are added to fcnseg's own. ``repo_id`` names the repository in the card's usage lines.
    """
    save_file = optional("safetensors.torch", "save_pretrained").save_file
    ckpt, in_channels = _checkpoint_of(source)
    config = pretrained_config(ckpt, in_channels=in_channels)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    per_head = read_metrics(metrics) if metrics is not None else {}
    if per_head:  # fcnseg eval records the dataset and split it measured on
        first = next(iter(per_head.values()))
        datasets = datasets or ([first["dataset"]] if isinstance(first.get("dataset"), str) else [])
        eval_split = eval_split or (first["split"] if isinstance(first.get("split"), str) else None)
    if per_head and not datasets:
        raise FcnsegError("metrics: name the dataset they were measured on (datasets=..., --dataset NAME)")
    card = model_card(config, per_head, license=license, datasets=datasets, tags=tags, repo_id=repo_id,
                      eval_split=eval_split)  # fmt: skip
    folder = Path(save_directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with staged_path(folder / WEIGHTS_NAME) as tmp:
            # The metadata is informative only (safetensors docs, Torch API: save_file); "format": "pt" is how
            # Hugging Face's libraries mark PyTorch weights.
            save_file(plain_tensors(ckpt["state_dict"]), str(tmp), metadata={"format": "pt"})
        with atomic_write(folder / CONFIG_NAME, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        with atomic_write(folder / CARD_NAME, "w") as f:
            f.write(card)
    except OSError as e:
        raise FcnsegError(f"{folder}: cannot write the model folder ({e.strerror or e})") from None
    return folder


def _checkpoint_of(source: nn.Module | str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The checkpoint dict of ``source`` and its input channels."""
    if isinstance(source, nn.Module):
        return checkpoint_dict(source), int(source.in_channels)
    ckpt = dict(source) if isinstance(source, Mapping) else read_checkpoint(source)
    if ckpt.get("format") != FORMAT:
        raise FcnsegError("save_pretrained: expected a model, an fcnseg checkpoint file or its dict")
    # The preprocessing has one value per input channel (fcnseg.preprocessing.Preprocessing).
    return ckpt, len(ckpt["preprocessing"]["mean"])


def plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as safetensors stores it: each tensor on the CPU, contiguous, owning its memory. save_file takes
    contiguous, dense tensors only (safetensors docs, Torch API) and refuses tensors that share memory (tied
    weights); a tensor that shares its storage with an earlier one, views part of a larger one, or is not
    contiguous (an expanded zero bias) is copied."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        t = value.detach().cpu()
        storage = t.untyped_storage()
        if not t.is_contiguous() or storage.nbytes() != t.nbytes or storage.data_ptr() in seen:
            t = t.contiguous().clone()
        if t.nbytes:
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def pretrained_config(ckpt: Mapping[str, Any], *, in_channels: int) -> dict[str, Any]:
    """``config.json``: everything of checkpoint dict ``ckpt`` but its tensors, in JSON."""
    config = {
        "format": CONFIG_FORMAT,
        "schema_version": CONFIG_SCHEMA_VERSION,
        "fcnseg_version": __version__,
        "architecture": ckpt["model"],
        "options": dict(ckpt["config"]),
        "num_classes": int(ckpt["num_classes"]),
        "in_channels": int(in_channels),
        "alignment": ckpt["alignment"],
        "classes": list(ckpt.get("classes") or []),
        "head_classes": {k: list(v or []) for k, v in (ckpt.get("head_classes") or {}).items()},
        "palette": [[int(v) for v in c] for c in ckpt["palette"]],
        "preprocessing": dict(ckpt["preprocessing"]),
    }
    try:
        return json.loads(json.dumps(config, allow_nan=False))  # tuples as lists: what a reader gets back
    except (TypeError, ValueError) as e:
        raise FcnsegError(f"builder options of {shown(ckpt['model'])} cannot be written as JSON ({e})") from None


# ------------------------------------------------------------------------------------------------ the card


def read_metrics(metrics: str | os.PathLike | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{head: metrics.json document}`` of an evaluation: ``fcnseg eval --out DIR``'s folder (its metrics.json,
    or one per head in DIR/<head>/), a metrics.json file, a document, or ``{head: document}``. One head's key is
    ``""``."""
    if isinstance(metrics, Mapping):
        docs = {"": dict(metrics)} if "mean_iu" in metrics else {str(k): dict(v) for k, v in metrics.items()}
        return {head: _checked_metrics(doc, f"metrics[{head!r}]") for head, doc in docs.items()}
    path = Path(metrics)
    if path.is_dir() and not (path / "metrics.json").is_file():
        files = {p.parent.name: p for p in sorted(path.glob("*/metrics.json"))}
        if not files:
            raise FcnsegError(f"{path}: no metrics.json here or in its subfolders (fcnseg eval --out {path})")
    else:
        files = {"": path / "metrics.json" if path.is_dir() else path}
    return {head: _read_metrics_file(file) for head, file in files.items()}


def _read_metrics_file(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise FcnsegError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise FcnsegError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    return _checked_metrics(doc, str(path))


def _checked_metrics(doc: Any, where: str) -> dict[str, Any]:
    ok = isinstance(doc, Mapping) and all(
        isinstance(doc.get(k), (int, float, type(None))) and not isinstance(doc.get(k), bool) for k in METRICS
    )
    if not ok or all(doc.get(k) is None for k in METRICS):
        raise FcnsegError(f"{where}: expected fcnseg eval's metrics.json (pixel_acc, mean_acc, mean_iu, fw_iu)")
    return dict(doc)


def _percent(value: Any) -> float | None:
    return None if value is None or not math.isfinite(value) else round(100 * float(value), 2)


def eval_results(per_head: Mapping[str, Mapping[str, Any]], dataset: str, split: str | None) -> list[Any]:
    """The evaluation as huggingface_hub ``EvalResult`` objects (the card's ``model-index``), in percent."""
    hf = optional("huggingface_hub", "a model card")
    results = []
    for head, doc in per_head.items():
        for key, (metric_type, name) in METRICS.items():
            value = _percent(doc.get(key))
            if value is None:
                continue
            results.append(hf.EvalResult(
                task_type="image-segmentation", task_name="Semantic segmentation", dataset_type=dataset,
                dataset_name=dataset, dataset_split=split, metric_type=metric_type, metric_value=value,
                metric_name=f"{name} {head}".strip() if head else name,
            ))  # fmt: skip
    return results


def card_metadata(config: Mapping[str, Any], per_head: Mapping[str, Any], **card: Any) -> str:
    """The card's YAML metadata, written by huggingface_hub's ``ModelCardData`` (the Hub's model card
    specification: library_name, pipeline_tag, license, datasets, tags, and ``model-index`` for the results)."""
    hf = optional("huggingface_hub", "a model card")
    arch = config["architecture"]
    tags = list(dict.fromkeys(["fcnseg", "semantic-segmentation", "fcn", arch, *card["tags"]]))
    results = eval_results(per_head, card["datasets"][0], card["eval_split"]) if per_head else None
    name = (card["repo_id"] or arch).rsplit("/", 1)[-1]
    data = hf.ModelCardData(
        library_name="fcnseg", pipeline_tag="image-segmentation", license=card["license"],
        datasets=card["datasets"] or None, tags=tags, model_name=name if results else None, eval_results=results,
    )  # fmt: skip
    return data.to_yaml()


def model_card(config: Mapping[str, Any], per_head: Mapping[str, Any], **card: Any) -> str:
    """``README.md``: YAML metadata, then what the model is, its evaluation, how to use it and its input."""
    repo = card["repo_id"] or "USER/NAME"
    arch, n = config["architecture"], config["num_classes"]
    pp = Preprocessing.from_dict(config["preprocessing"])
    lines = [
        "---", card_metadata(config, per_head, **card).rstrip("\n"), "---", "",
        f"# {card['repo_id'].rsplit('/', 1)[-1] if card['repo_id'] else arch}", "",
        f"A fully convolutional network ({arch}, {config['alignment']} mode) for semantic segmentation, "
        f"{_heads_text(config)}, saved by fcnseg {config['fcnseg_version']}.", "",
        *_metrics_lines(per_head, card["datasets"], card["eval_split"]),
        "## Usage", "", "```bash", "pip install 'fcnseg[hub]'",
        f"fcnseg predict --weights hf:{repo} img.jpg --out masks/", "```", "",
        "```python", "import fcnseg", "", f'model = fcnseg.from_pretrained("{repo}")',
        'mask = model.predict("img.jpg")  # H x W class indices' + (", per head" if _several(config) else ""),
        "```", "",
        "## Input", "",
        f"{config['in_channels']} channels; pixels are scaled to [0, {pp.value_range:g}] in {pp.channel_order} "
        f"order, minus mean {list(pp.mean)}, divided by std {list(pp.std)}. fcnseg applies this itself.", "",
        "## Classes", "", *_class_lines(config), "",
        "## Files", "",
        f"- `{WEIGHTS_NAME}`: the {n}-class weights (safetensors: tensors only, nothing is unpickled)",
        f"- `{CONFIG_NAME}`: architecture and builder options, classes, palette, preprocessing (schema "
        f"{config['schema_version']})", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _several(config: Mapping[str, Any]) -> bool:
    return len(config["head_classes"]) > 1


def _heads_text(config: Mapping[str, Any]) -> str:
    heads = config["head_classes"]
    if len(heads) > 1:
        named = [f"{head} ({len(names)} classes)" if names else head for head, names in heads.items()]
        return f"{len(heads)} heads: {', '.join(named)}"
    return f"{config['num_classes']} classes"


def _class_lines(config: Mapping[str, Any]) -> list[str]:
    classes = config["classes"] or [f"class {i}" for i in range(config["num_classes"])]
    lines = ["| index | class | colour (RGB) |", "|---:|---|---|"]
    rows = enumerate(zip(classes, config["palette"], strict=True))
    lines += [f"| {i} | {name} | {tuple(rgb)} |" for i, (name, rgb) in rows]
    for head, names in list(config["head_classes"].items())[1:]:
        if names:
            lines += ["", f"{head}: {', '.join(names)}"]
    return lines


def _metrics_lines(per_head: Mapping[str, Mapping[str, Any]], datasets: Sequence[str], split: str | None) -> list[str]:
    if not per_head:
        return []
    where = f"{datasets[0]}" + (f", split {split}" if split else "")
    lines = ["## Evaluation", "", f"Measured by `fcnseg eval` on {where} (percent).", ""]
    lines += ["| head | " + " | ".join(name.removesuffix(" (%)") for _, name in METRICS.values()) + " |"]
    lines += ["|---|" + "---:|" * len(METRICS)]
    for head, doc in per_head.items():
        cells = [_percent(doc.get(k)) for k in METRICS]
        lines.append(f"| {head or 'out'} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ reading


def read_config(path: str | os.PathLike, source: str) -> dict[str, Any]:
    """``config.json`` read and checked; every problem is a one-line CheckpointError naming ``source``."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: cannot read {CONFIG_NAME} ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: {CONFIG_NAME} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise CheckpointError(
            f'{source}: {CONFIG_NAME} is not an fcnseg model\'s (no "format": "fcnseg"; a model of another library?)'
        )
    version = config.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{source}: {CONFIG_NAME} has no valid schema_version")
    if version > CONFIG_SCHEMA_VERSION:
        raise CheckpointError(
            f"{source}: {CONFIG_NAME} was written by a newer fcnseg (schema {version}, "
            f"{shown(config.get('fcnseg_version'))}; this one reads {CONFIG_SCHEMA_VERSION}); upgrade fcnseg"
        )
    needed = ("architecture", "options", "num_classes", "alignment", "palette", "preprocessing")
    missing = [k for k in needed if k not in config]
    if missing or not isinstance(config["options"], dict) or not isinstance(config["preprocessing"], dict):
        raise CheckpointError(f"{source}: {CONFIG_NAME} lacks or mangles {', '.join(missing) or 'options'}")
    return config


def read_weights(path: str | os.PathLike, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (its JSON header and raw data; no code runs), on the CPU."""
    load_file = optional("safetensors.torch", "reading a Hub model").load_file
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{source}: no {WEIGHTS_NAME}") from None
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        why = first_line(e)
        raise CheckpointError(f"{source}: {WEIGHTS_NAME} is not a readable safetensors file ({why})") from None


def pretrained_checkpoint(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A checkpoint dict (the keys :func:`fcnseg.hub.model_from_checkpoint` reads) of a config and its tensors."""
    return {
        "format": FORMAT,
        "model": config["architecture"],
        "config": dict(config["options"]),
        "alignment": config["alignment"],
        "num_classes": config["num_classes"],
        "classes": list(config.get("classes") or []),
        "head_classes": dict(config.get("head_classes") or {}),
        "palette": config["palette"],
        "preprocessing": config["preprocessing"],
        "state_dict": dict(state),
        "extra": {},
    }


# ------------------------------------------------------------------------------------------------ the upload


def hub_error(error: Exception, source: str, file: str | None = None) -> FcnsegError | None:
    """A one-line FcnsegError for what huggingface_hub raised about repository ``source`` (and its ``file``), or
    None for anything else."""
    errors = optional("huggingface_hub.errors", "the Hub")
    constants = optional("huggingface_hub.constants", "the Hub")
    what = file or "the file"
    if isinstance(error, errors.GatedRepoError):
        return FcnsegError(f"{source}: a gated repository; ask for access on its page, then log in (hf auth login)")
    if isinstance(error, errors.RepositoryNotFoundError):
        return FcnsegError(f"{source}: no such repository on the Hugging Face Hub (a private one? log in with "
                           "'hf auth login' or set HF_TOKEN)")  # fmt: skip
    if isinstance(error, errors.RevisionNotFoundError):
        return FcnsegError(f"{source}: no such revision (branch, tag or commit) in the repository")
    if isinstance(error, errors.LocalEntryNotFoundError):
        why = "the Hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return FcnsegError(f"{source}: {what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                           f"and {why}")  # fmt: skip
    if isinstance(error, errors.EntryNotFoundError):
        return FcnsegError(f"{source}: the repository has no {what} (not an fcnseg model? fcnseg push writes "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME})")  # fmt: skip
    if isinstance(error, errors.HFValidationError):
        return FcnsegError(f"{source}: not a Hub repository id (expected USER/NAME)")
    if isinstance(error, errors.HfHubHTTPError):
        return FcnsegError(f"{source}: the Hub refused: {first_line(error)}")
    # A network error: the socket's are OSErrors; the HTTP client's (huggingface_hub's httpx) are RequestErrors.
    if isinstance(error, OSError) or any(c.__name__ == "RequestError" for c in type(error).__mro__):
        return FcnsegError(f"{source}: the Hub cannot be reached ({type(error).__name__}: {error})")
    return None


def push_to_hub(
    source: nn.Module | str | os.PathLike | Mapping[str, Any],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    **card: Any,
) -> str:
    """Upload ``source`` (as :func:`save_pretrained` takes it) to the Hub repository ``repo_id``, created if need
    be (``private`` then), on branch ``revision`` (created from main if need be; default main). The token is
    huggingface_hub's own: ``HF_TOKEN`` or ``hf auth login``. ``card``: :func:`save_pretrained`'s card options.
    Returns the repository's URL."""
    hf = optional("huggingface_hub", "push_to_hub")
    with tempfile.TemporaryDirectory(prefix="fcnseg-push-") as tmp:
        folder = save_pretrained(source, tmp, repo_id=repo_id, **card)
        api = hf.HfApi()
        try:
            url = str(api.create_repo(repo_id, private=private, exist_ok=True))
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            message = commit_message or f"Upload {WEIGHTS_NAME}, {CONFIG_NAME} and the model card"
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message)
        except Exception as e:
            mapped = hub_error(e, repo_id)
            if mapped is None:
                raise
            raise mapped from None
    return f"{url.rstrip('/')}/tree/{revision}" if revision else url
