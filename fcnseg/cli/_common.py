"""Flags that several commands take, each declared here once, and the one-line error of the command line.

A flag's name, type and action live here; a command passes only what it says differently (its help, a default).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

DOWNLOAD_HELP = "fetch voc / sbd first (torchvision's downloader)"


def error(msg: str) -> None:
    """``fcnseg: error: MSG`` on stderr: how every command reports a user's mistake."""
    print(f"fcnseg: error: {msg}", file=sys.stderr)


def parse_key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(key, value)``, the value read as YAML (``size=96`` gives the int 96)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def add_data_option(
    p: argparse.ArgumentParser, examples: str, *, dest: str = "data_option", default: list | None = None
) -> None:
    """``--data-option KEY=VALUE``, repeatable: ``args.<dest>`` is a list of ``(key, value)`` pairs (``default``
    when none is given)."""
    p.add_argument(
        "--data-option",
        dest=dest,
        action="append",
        type=parse_key_value,
        default=default,
        metavar="KEY=VALUE",
        help=f"extra dataset argument, repeatable (e.g. {examples})",
    )


def add_dataset_flags(
    p: argparse.ArgumentParser,
    *,
    dataset_help: str | None = None,
    root_help: str | None = None,
    split_help: str | None = None,
    split_default: str | None = None,
) -> None:
    """``--dataset NAME`` (required), ``--root DIR`` and ``--split NAME``."""
    p.add_argument("--dataset", required=True, metavar="NAME", help=dataset_help or dataset_names_help())
    p.add_argument("--root", metavar="DIR", help=root_help or "the dataset's folder")
    default = f" (default: {split_default})" if split_default else ""
    p.add_argument("--split", default=split_default, metavar="NAME", help=(split_help or "split to read") + default)


def dataset_names_help() -> str:
    """``a registered dataset: folder, nyud, ...``, from the registry (so that it lists every one)."""
    from ..data import list_datasets

    return f"a registered dataset: {', '.join(list_datasets())}"


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--download", action="store_true", help=DOWNLOAD_HELP)


def add_device(p: argparse.ArgumentParser, default: str, help_text: str | None = None) -> None:
    text = help_text or f"torch device: auto, cpu, cuda or cuda:N (default: {default})"
    p.add_argument("--device", default=default, help=text)


def add_runtime(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--runtime PATH``: an execution path of :func:`fcnseg.runtime.make_runner` (default: eager)."""
    p.add_argument("--runtime", default="eager", metavar="PATH", help=f"{help_text} (default: eager)")


def add_weights(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--weights NAME``: published weights (``fcnseg weights``)."""
    p.add_argument("--weights", metavar="NAME", help=help_text)


def add_weights_file(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--weights-file FILE``: a local copy of published weights, read instead of downloaded."""
    p.add_argument("--weights-file", metavar="FILE", help=help_text)


def add_out(p: argparse.ArgumentParser, help_text: str, default: str | None = None) -> None:
    """``--out PATH``: required unless a ``default`` is given."""
    p.add_argument("--out", required=default is None, default=default, help=help_text)


def add_quiet(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--quiet", action="store_true", help=help_text)
