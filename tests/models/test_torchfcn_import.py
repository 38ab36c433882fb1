"""torchfcn -> fcnseg: converted models give torchfcn's own logits (torchfcn 1.9.7 from PyPI, installed --no-deps
by the README's test command and .ci/run).

torchfcn's package __init__ imports its trainer (pytz, scikit-image, the `fcn` package); its model modules need
only torch, numpy and an importable `fcn` (used for downloads alone). The fixture loads `torchfcn.models` under a
bare package with an empty `fcn` module standing in, and puts sys.modules back afterwards.
"""

import sys

import pytest
import torch

from fcnseg.checkpoint import read_checkpoint
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.hub import load, model_from_checkpoint
from fcnseg.models.convert import caffe_layer_names, torchfcn_to_fcnseg
from fcnseg.models.registry import get_model
from fcnseg.palette import VOC_CLASSES
from fcnseg.preprocessing import CAFFE
from tests.helpers import assert_span_close, randomise

ARCHS = {"FCN32s": "fcn32s", "FCN16s": "fcn16s", "FCN8s": "fcn8s", "FCN8sAtOnce": "fcn8s_atonce"}
SIZES = [(17, 29), (63, 101), (1, 1)]


@pytest.fixture(scope="module")
def torchfcn():
    from benchmarks.torchfcn_loader import load_torchfcn_models

    saved = {k: v for k, v in sys.modules.items() if k == "fcn" or k == "torchfcn" or k.startswith("torchfcn.")}
    try:
        yield load_torchfcn_models()
    except ImportError as e:
        pytest.fail(f"{e} (README, 'Start here')")
    finally:
        for k in [k for k in sys.modules if k == "fcn" or k == "torchfcn" or k.startswith("torchfcn.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _randomised(cls, seed: int) -> torch.nn.Module:
    # torchfcn starts every convolution at zero; He-scaled random weights everywhere (the upsamplers included,
    # so that full C x C transposed convolutions are compared too) give logits of order 1.
    torch.manual_seed(seed)
    return randomise(cls(n_class=21).eval())


# One architecture goes through `fcnseg convert` and the file it writes (--classes too); the others through the
# function the command calls on the state dict it reads (import_file's torch.load, then torchfcn_to_fcnseg), and the
# rebuild `load` does after reading the file: writing, fsyncing and reading two 540 MB files per architecture cost
# 10 s each and test nothing that depends on the architecture. FCN8s's file is also the bare FCN-8s state dict that
# the refusals test converts without --model.
THROUGH_THE_CLI = "FCN8s"


@pytest.fixture(scope="module")
def fcn8s_file(torchfcn, tmp_path_factory):
    """torchfcn's FCN8s with random weights, and its state dict on disk (540 MB, written once)."""
    ref = _randomised(torchfcn.FCN8s, seed=len("FCN8s"))
    path = tmp_path_factory.mktemp("torchfcn") / "FCN8s.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def _converted(torchfcn, arch: str, request, tmp_path) -> tuple:
    """torchfcn's ``arch`` with random weights and its conversion to fcnseg: (the torchfcn model, the fcnseg
    model, the classes it should name, the source it should record, the checkpoint dict)."""
    if arch != THROUGH_THE_CLI:
        ref, src = _randomised(getattr(torchfcn, arch), seed=len(arch)), str(tmp_path / f"{arch}.pth")
        ckpt = torchfcn_to_fcnseg(ref.state_dict(), model=ARCHS[arch], source=src)
        return ref, model_from_checkpoint(ckpt, source=src), list(VOC_CLASSES), src, ckpt
    ref, src = request.getfixturevalue("fcn8s_file")
    dst = tmp_path / f"{arch}.pt"
    classes = [f"thing {i}" for i in range(21)]  # --classes: a text file of names, one a line
    (tmp_path / "names.txt").write_text("\n".join(classes) + "\n\n")
    args = ["convert", str(src), "--format", "torchfcn", "--model", ARCHS[arch], "--out", str(dst)]
    assert main([*args, "--classes", str(tmp_path / "names.txt")]) == 0
    return ref, load(dst), classes, str(src), read_checkpoint(dst)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_converted_torchfcn_gives_torchfcn_logits(torchfcn, arch, request, tmp_path):
    ref, model, classes, source, ckpt = _converted(torchfcn, arch, request, tmp_path)
    assert model.build_config["name"] == ARCHS[arch] and model.alignment == "caffe"
    assert model.preprocessing == CAFFE and model.classes == classes
    assert ckpt["extra"]["converted_from"] == source
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected, got = ref(x), model(x)
        assert got.shape == expected.shape == (1, 21, h, w)
        # min_span: 1 x 1 inputs give nearly flat maps; larger ones spread over units
        assert_span_close(got, expected, min_span=0.01, msg=(h, w))


def test_every_torchfcn_tensor_lands_on_the_derived_name(torchfcn):
    ref = torchfcn.FCN8s(n_class=21)
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            p.fill_(i)  # each tensor identifiable by its value
    ckpt = torchfcn_to_fcnseg(ref.state_dict(), model="fcn8s")
    names = caffe_layer_names(get_model("fcn8s", alignment="caffe", width=0.25, fc_dim=8))
    assert names["conv3_2"] == "backbone.features.12" and names["conv5_3"] == "backbone.features.28"
    head = "score_heads.out."  # the one head's layers
    assert names["upscore2"] == head + "upsample_skip.pool4" and names["upscore_pool4"] == head + "upsample_skip.pool3"
    assert names["upscore8"] == head + "upsample_out"
    sd = ref.state_dict()
    for key, value in sd.items():
        layer, kind = key.rsplit(".", 1)
        assert torch.equal(ckpt["state_dict"][f"{names[layer]}.{kind}"], value), key
    assert len(ckpt["state_dict"]) == len(sd)


def test_torchfcn_refusals(fcn8s_file, tmp_path, capsys):
    ref, src = fcn8s_file
    sd = ref.state_dict()
    # A bare FCN-8s state dict cannot say whether it is the staged or the at-once network.
    assert main(["convert", str(src), "--out", str(tmp_path / "x.pt")]) == 2
    assert "say which with --model fcn8s or --model fcn8s_atonce" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(FcnsegError, match="holds a torchfcn fcn8s .* not the requested fcn16s"):
        torchfcn_to_fcnseg(sd, model="fcn16s")
    with pytest.raises(FcnsegError, match="not a torchfcn FCN state dict"):
        torchfcn_to_fcnseg({"features.0.weight": torch.zeros(1)})
    with pytest.raises(FcnsegError, match="'extra.weight' has no counterpart"):
        torchfcn_to_fcnseg({**sd, "extra.weight": torch.zeros(1)}, model="fcn8s")
    with pytest.raises(FcnsegError, match="'nodot' has no counterpart"):
        torchfcn_to_fcnseg({**sd, "nodot": torch.zeros(1)}, model="fcn8s")
    bad = {**sd, "score_pool4.weight": torch.zeros(21, 256, 1, 1)}
    with pytest.raises(
        FcnsegError, match=r"'score_pool4.weight' has shape \(21, 256, 1, 1\), fcnseg expects \(21, 512"
    ):
        torchfcn_to_fcnseg(bad, model="fcn8s", source="x.pth")
    with pytest.raises(FcnsegError, match=r"x.pth: missing torchfcn parameter\(s\) score_pool3.bias"):
        torchfcn_to_fcnseg({k: v for k, v in sd.items() if k != "score_pool3.bias"}, model="fcn8s", source="x.pth")
    with pytest.raises(FcnsegError, match="'model_state_dict' is a list"):
        torchfcn_to_fcnseg({"model_state_dict": [1, 2]})


def test_torchfcn_trainer_checkpoint_names_its_arch(torchfcn):
    # torchfcn's Trainer saves {"arch": class name, "model_state_dict": ..., "optim_state_dict": ...}.
    sd = torchfcn.FCN8sAtOnce(n_class=5).state_dict()
    ckpt = torchfcn_to_fcnseg({"arch": "FCN8sAtOnce", "model_state_dict": sd, "iteration": 7})
    assert ckpt["model"] == "fcn8s_atonce" and ckpt["num_classes"] == 5 and ckpt["classes"] == []
