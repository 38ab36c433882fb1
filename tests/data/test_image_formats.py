"""Every place the data package opens an image does so through the format allowlist (PNG, JPEG, BMP, TIFF, WebP,
GIF, PPM): a file in another format, such as EPS (which Pillow hands to Ghostscript), is never given to the plugin
of its format, whatever its suffix."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from PIL import EpsImagePlugin

from fcnseg.data.check import _opens
from fcnseg.data.folder import _mode
from fcnseg.errors import FcnsegError
from fcnseg.imageio import read_depth_or_hha

PACKAGE = Path(__file__).resolve().parents[2] / "fcnseg"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


@pytest.fixture
def eps_as_png(tmp_path, monkeypatch):
    """An EPS file named like a PNG, and an EPS plugin that fails the test if it is ever asked to parse it."""

    def parsed(self):
        raise AssertionError("the EPS plugin parsed an upload")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", parsed)
    path = tmp_path / "depth.png"
    path.write_bytes(EPS)
    return path


def test_check_data_folder_and_depth_readers_refuse_other_formats_unparsed(eps_as_png):
    assert _opens(eps_as_png, oriented=True) is None  # check-data: unreadable
    assert _mode(eps_as_png) is None  # folder dataset: the real read then says why
    with pytest.raises(FcnsegError, match="cannot read"):
        read_depth_or_hha(eps_as_png)  # predict --extra, serve's extra images


def _opens_without_formats(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "open"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "Image"
        and not any(k.arg == "formats" for k in node.keywords)
    ]


def test_no_image_is_opened_without_the_allowlist():
    found = {
        str(path.relative_to(PACKAGE)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := _opens_without_formats(ast.parse(path.read_text())))
    }
    assert found == {}, f"Image.open without formats= (the allowlist): {found}"
