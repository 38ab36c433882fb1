"""The image files that command-line inputs name: files, folders (their images) and glob patterns."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from ..imageio import IMAGE_EXTENSIONS

__all__ = ["collect_inputs"]


def _expand_input(item: str) -> tuple[list[Path], str | None]:
    """The files one input names, and the problem with it (None when it names some)."""
    p = Path(item)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        return found, None if found else f"{item}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    if p.is_file():
        return [p], None
    if glob.has_magic(item):
        found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
        return found, None if found else f"{item}: pattern matches no file"
    return [], f"{item}: no such file or folder"


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (their images, sorted) and glob patterns; returns (files, problems).

    A file named twice (directly and through a folder, say) is kept once, at its first place."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        found, problem = _expand_input(item)
        files.extend(found)
        if problem:
            problems.append(problem)
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))], problems
