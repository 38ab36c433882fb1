"""Helpers shared by the test files: the tiny model, torch.hub's cache moved into a test's folder, He-scaled random
weights, comparison relative to the span of a reference output, and locating a crop in its source image.

Import them from here (``from tests.helpers import TINY, randomise``); the ``hub`` fixture reaches every test
through ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# A width-reduced VGG16 (channels / 16, fc6/fc7 of 16): same geometry as the published network, tiny compute.
TINY = {"width": 1 / 16, "fc_dim": 16}

# Seconds a test waits for a subprocess (or a file it writes) before calling it hung. Only a real hang may reach
# it: a loaded CI machine can be ten times slower than an idle one, and no verdict may depend on speed.
HANG_TIMEOUT = 1800


def tiny_options(name: str) -> dict:
    """:data:`TINY`'s options that model ``name``'s builder takes: every network is width-reduced, and fc6/fc7 are
    cut to 16 channels where the network has them (VGG16, AlexNet; the others refuse ``fc_dim``)."""
    import inspect

    from fcnseg.models.registry import get_builder

    accepted = inspect.signature(get_builder(name)).parameters
    return {k: v for k, v in TINY.items() if k in accepted}


# ------------------------------------------------------------------------------------- torch.hub's cache, faked


@contextlib.contextmanager
def fake_hub(root: Path, *, create: bool = True) -> Iterator[Path]:
    """torch.hub's folder moved to ``root / "hub"`` while the block runs, and put back afterwards.

    Yields its ``checkpoints`` folder, where torchvision and fcnseg cache downloaded weights: created, unless
    ``create=False`` leaves it to the first download to make.
    """
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(root / "hub"))
    checkpoints = root / "hub" / "checkpoints"
    if create:
        checkpoints.mkdir(parents=True)
    try:
        yield checkpoints
    finally:
        torch.hub.set_dir(old)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's cache in ``tmp_path`` for the test: its ``checkpoints`` folder, created; restored afterwards."""
    with fake_hub(tmp_path) as checkpoints:
        yield checkpoints


# ------------------------------------------------------------------------------------------- random weights


def randomise(
    model: torch.nn.Module, seed: int | None = None, *, bias_std: float | None = 0.1, trainable_only: bool = False
) -> torch.nn.Module:
    """He-scaled random weights in every layer, the score and skip-score layers included (they start at zero), so
    that no output is trivially zero and the logits are of order 1.

    Every weight (a parameter of two or more dimensions) is drawn from N(0, 2 / fan_in) with fan_in =
    ``p[0].numel()``; every bias from N(0, ``bias_std``²), or left as it is where ``bias_std`` is None.
    ``trainable_only`` leaves the parameters that do not train (the fixed bilinear upsampling kernels) as they are.
    Draws from torch's global generator, seeded with ``seed`` first where one is given. Returns ``model``, its
    train / eval mode unchanged.
    """
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if trainable_only and not p.requires_grad:
                continue
            if p.dim() > 1:
                p.normal_(0, (2 / p[0].numel()) ** 0.5)
            elif bias_std is not None:
                p.normal_(0, bias_std)
    return model


def export_folder(model: torch.nn.Module, root: Path) -> Path:
    """The folder under ``root`` for ``model``'s ONNX / OpenVINO files, one per distinct model: named by a hash of
    its builder options, heads, preprocessing and every tensor of its state dict. Test files that build the same
    model share one checked export (``exported_fp32`` reuses the ``model.onnx`` it finds), while a model that
    differs in any weight gets a folder of its own and is exported and checked anew. The int8 files in it are
    named by the layers kept in float, not by their calibration images: tests that share a folder must not make
    the same int8 file from different images."""
    digest = hashlib.sha256()
    about = [model.build_config, model.heads, model.preprocessing]  # the model contract; heads: classes per head
    digest.update(json.dumps(about, sort_keys=True, default=repr).encode())
    for key, value in model.state_dict().items():
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    folder = root / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -------------------------------------------------------------------------------- comparison relative to span


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def span_error(got: Any, expected: Any, *, min_span: float = 0.1) -> float:
    """max |got - expected| as a fraction of the span (max - min) of the reference ``expected``.

    Tensors or arrays of one shape. Fails unless the span exceeds ``min_span``: a flat reference output proves
    nothing.
    """
    got, expected = _array(got), _array(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    span = float(expected.max() - expected.min())
    assert span > min_span, f"a degenerate reference output (span {span:.3g}) proves nothing"
    return float(np.abs(got - expected).max()) / span


def assert_span_close(got: Any, expected: Any, *, tol: float = 1e-4, min_span: float = 0.1, msg: Any = None) -> None:
    """max |got - expected| <= ``tol`` x the span of ``expected`` (see :func:`span_error`); ``msg`` names the case."""
    err = span_error(got, expected, min_span=min_span)
    assert err <= tol, (msg, f"max |got - expected| = {err:.2e} of the span")


def kernel_tolerance(model: torch.nn.Module, expected: Any) -> float:
    """The absolute tolerance for ``model``'s output computed by other kernels (another CPU's AVX2, AVX-512 or AMX
    code, another thread count): float32's epsilon for every layer the signal passes through, relative to the
    output's range. Each convolution sums in its own order, so each may add a rounding of that size; a wrong weight
    or a wrong crop moves the output by a sizeable fraction of its range instead."""
    depth = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)) for m in model.modules())
    expected = _array(expected)
    return depth * float(np.finfo(np.float32).eps) * float(np.abs(expected).max())


def assert_same_output_across_kernels(model: torch.nn.Module, got: Any, expected: Any) -> None:
    """``got`` (N x C x H x W scores) equals ``expected`` as far as other kernels allow: the same shape, values
    within :func:`kernel_tolerance`, and the same argmax at every pixel whose top two scores are further apart than
    twice that tolerance (nearer ones may swap honestly)."""
    got, expected = _array(got), _array(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    tol = kernel_tolerance(model, expected)
    err = float(np.abs(got - expected).max())
    assert err <= tol, f"max |got - expected| = {err:.3g}, over the tolerance {tol:.3g}"
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert decided.mean() > 0.9, "too few pixels with a clear winner to compare the argmax"
    np.testing.assert_array_equal(got.argmax(1)[decided], expected.argmax(1)[decided])


# ------------------------------------------------------------------------------------------------ crops


def find_window(source: torch.Tensor, window: torch.Tensor) -> list[tuple[bool, int, int]]:
    """Every (flipped, top, left) at which ``window`` is a crop of ``source`` or of its horizontal mirror."""
    h, w = window.shape[-2:]
    found = []
    for flipped in (False, True):
        s = source.flip(-1) if flipped else source
        for top in range(s.shape[-2] - h + 1):
            for left in range(s.shape[-1] - w + 1):
                if torch.equal(s[..., top : top + h, left : left + w], window):
                    found.append((flipped, top, left))
    return found


# ------------------------------------------------------------------------------------------- crafted pickles


class RunsCode:
    """An object whose unpickling runs code: it opens (so creates) ``marker``. A file that holds one shows whether
    a reader unpickles arbitrary objects (``torch.load(weights_only=False)``) or refuses them."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def code_pickle(path: Path, marker: Path, *, zip_format: bool = True) -> Path:
    """Write ``path``: a ``torch.save`` file of a state dict (one tensor) beside a :class:`RunsCode` that would
    create ``marker``; torch's zip archive, or with ``zip_format=False`` its legacy pickle format."""
    payload = {"features.0.weight": torch.zeros(1), "payload": RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    assert not Path(marker).exists()
    return path


@functools.cache
def pillow_reads_its_ycbcr_tiff() -> bool:
    """Whether this Pillow reads back the uncompressed YCbCr TIFF it writes: Pillow 12 writes one whose reader then
    expects four bytes a pixel (the file is "truncated"), so such files cannot be read at all there."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("YCbCr", (3, 2), (128, 128, 128)).save(buf, format="TIFF")
    try:
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            back.load()
    except OSError:
        return False
    return True


def progressive_jpeg(scans: int | None = None) -> bytes:
    """A 64 x 48 progressive JPEG (libjpeg's standard progression, about 10 scans) whose last scan is repeated
    until the file holds ``scans`` start-of-scan markers: a small file that would make a decoder refine the whole
    picture once per scan."""
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last, have = data.rindex(b"\xff\xda"), data.count(b"\xff\xda")
    extra = 0 if scans is None else scans - have
    assert extra >= 0, f"the progression alone has {have} scans"
    return data[:-2] + data[last:-2] * extra + data[-2:]
