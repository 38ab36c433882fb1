from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.serving import random_checkpoint


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A tiny random FCN-8s of 5 named classes, saved with a recorded mean IU."""
    return random_checkpoint(tmp_path / "tiny.pt")
