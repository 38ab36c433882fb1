"""The ``fcnseg`` command line: one module per command, each with its ``add_parser`` and a thin ``run``.

A user's mistake (:class:`FcnsegError`) is printed as one line on stderr with exit status 2; any other exception is
a bug and keeps its traceback. Commands import the library inside ``run``, so that ``fcnseg --help`` stays quick and
a command pays only for what it uses. Flags that several commands share are declared once, in :mod:`._common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from .._memory import request_huge_pages

# Before the commands import torch: large CPU tensors on huge pages (fcnseg._memory says why).
request_huge_pages()

from ..errors import FcnsegError, user_message  # noqa: E402
from . import bench, check_data, convert, demo, export, models, predict, push, serve, train, weights  # noqa: E402
from . import eval as eval_  # noqa: E402
from ._common import error  # noqa: E402

__all__ = ["build_parser", "main"]

# In the order of `fcnseg --help`.
COMMANDS = (models, predict, serve, export, bench, weights, convert, push, demo, train, eval_, check_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnseg", description="Fully Convolutional Networks for semantic segmentation."
    )
    parser.add_argument("--version", action="version", version=f"fcnseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FcnsegError as e:
        error(user_message(e))
        return 2
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:  # `fcnseg models | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
