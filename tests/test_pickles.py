"""No file fcnseg reads with torch.load runs code: each place that reads one, through its public entry point, is
given a pickle whose unpickling would create a marker file, and must refuse it in one clear line with the marker
never made (every read is ``weights_only=True``).

The places: checkpoints (``fcnseg.load``, ``predict``; a cached conversion is read by the same function), torchfcn
files (``fcnseg convert``),
VGG16 state-dict files (``--backbone-weights FILE``), the Caffe VGG16 in the cache (``CAFFE``) and torchvision's
ImageNet weights in torch.hub's cache.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from torchvision.models import VGG16_Weights

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from tests.helpers import TINY, code_pickle


@pytest.fixture
def crafted(tmp_path):
    """(a crafted file, the marker its unpickling would create)."""
    marker = tmp_path / "ran"
    return code_pickle(tmp_path / "crafted.pt", marker), marker


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint(tmp_path, zip_format, capsys):
    marker = tmp_path / "ran"
    path = code_pickle(tmp_path / "m.pt", marker, zip_format=zip_format)
    with pytest.raises(FcnsegError) as caught:
        fcnseg.load(path)
    assert str(caught.value) == (
        f"{path}: holds Python objects beyond tensors, which fcnseg does not unpickle (not an fcnseg checkpoint)"
    )
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["predict", str(path), str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"fcnseg: error: {caught.value}\n"
    assert not marker.exists()


def test_a_torchfcn_file_to_convert(crafted, tmp_path, capsys):
    path, marker = crafted
    assert main(["convert", str(path), "--format", "torchfcn", "--out", str(tmp_path / "out.pt")]) == 2
    assert capsys.readouterr().err == f"fcnseg: error: {path}: not a readable PyTorch file (UnpicklingError)\n"
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_a_backbone_state_dict_file(crafted):
    path, marker = crafted
    with pytest.raises(FcnsegError, match=rf"^{path}: cannot read VGG16 weights \(UnpicklingError\)$"):
        fcnseg.get_model("fcn32s", backbone_weights=str(path), **TINY)
    assert not marker.exists()


def test_the_cached_caffe_vgg16(crafted, hub, monkeypatch):
    # The crafted file stands in the cache where the download would put it, and the catalogue is given its md5,
    # so that it passes the hash check: the read itself must refuse it.
    from fcnseg.models import weights

    path, marker = crafted
    cached = hub / weights.VGG16_CAFFE.file_name
    cached.write_bytes(path.read_bytes())
    md5 = hashlib.md5(cached.read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "VGG16_CAFFE", dataclasses.replace(weights.VGG16_CAFFE, md5=md5))
    with pytest.raises(FcnsegError, match=rf"^{cached}: cannot read it as a VGG16 state dict \(UnpicklingError\)$"):
        fcnseg.get_model("fcn32s", backbone_weights="CAFFE", **TINY)
    assert not marker.exists()


def test_torchvisions_cached_imagenet_weights(crafted, hub):
    # torch.hub reads a cached file without checking its hash, and unpickles anything unless told weights_only.
    path, marker = crafted
    cached = hub / VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cached.write_bytes(path.read_bytes())
    with pytest.raises(FcnsegError, match=rf"cannot read {cached} \(UnpicklingError\); delete it to download again"):
        fcnseg.get_model("fcn32s", backbone_weights="IMAGENET1K_V1", **TINY)
    assert not marker.exists()
