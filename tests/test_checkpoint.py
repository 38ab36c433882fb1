import pytest
import torch

import fcnseg
from fcnseg.checkpoint import SCHEMA_VERSION, checkpoint_dict, read_checkpoint
from fcnseg.errors import CheckpointError, FcnsegError
from fcnseg.preprocessing import CAFFE, IMAGENET
from tests.helpers import TINY, tiny_options

CLASSES = ["background", "road", "car"]


def _model(name="fcn8s", **kw):
    torch.manual_seed(0)
    model = fcnseg.get_model(name, num_classes=3, **{**tiny_options(name), **kw})
    with torch.no_grad():  # non-zero scores so that identical outputs mean something
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("alignment", ["caffe", "aligned"])
def test_round_trip_gives_identical_outputs(tmp_path, alignment):
    model = _model(alignment=alignment)
    path = fcnseg.save_checkpoint(model, tmp_path / "m.pt", classes=CLASSES, preprocessing=CAFFE)
    loaded = fcnseg.load(path)
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.classes == CLASSES
    assert loaded.alignment == alignment
    assert loaded.preprocessing == CAFFE
    assert not loaded.training
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]


def test_checkpoint_records_what_predict_needs(tmp_path):
    model = _model("fcn16s", alignment="caffe")
    fcnseg.save_checkpoint(model, tmp_path / "m.pt", classes=CLASSES, extra={"iteration": 7})
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["schema_version"] == SCHEMA_VERSION
    assert ckpt["model"] == "fcn16s"
    assert ckpt["alignment"] == "caffe"
    assert ckpt["config"]["alignment"] == "caffe" and "backbone_weights" not in ckpt["config"]
    assert ckpt["num_classes"] == 3 and ckpt["classes"] == CLASSES
    assert len(ckpt["palette"]) == 3 and all(len(c) == 3 for c in ckpt["palette"])
    assert ckpt["preprocessing"] == IMAGENET.to_dict()
    assert ckpt["extra"] == {"iteration": 7}
    # Nothing but plain types and tensors: it loads with weights_only=True.
    torch.load(tmp_path / "m.pt", weights_only=True)


def test_no_temporary_files_are_left(tmp_path):
    fcnseg.save_checkpoint(_model(), tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_truncated_checkpoint_is_refused(tmp_path):
    path = fcnseg.save_checkpoint(_model(), tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated: the zip archive ends before its directory"):
        fcnseg.load(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        fcnseg.load(tmp_path / "absent.pt")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    ckpt = checkpoint_dict(_model("fcn32s"))
    fcnseg.save_checkpoint(_model("fcn32s"), tmp_path / "m32.pt")
    with pytest.raises(CheckpointError, match="holds model 'fcn32s', expected 'fcn8s'"):
        fcnseg.load(tmp_path / "m32.pt", model="fcn8s")
    # A record whose weights belong to another network (e.g. an 8s state dict labelled 32s).
    ckpt["state_dict"] = checkpoint_dict(_model("fcn8s"))["state_dict"]
    torch.save(ckpt, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"weights do not fit model 'fcn32s'.*unexpected"):
        fcnseg.load(tmp_path / "mixed.pt")
    ckpt["state_dict"] = checkpoint_dict(_model("fcn32s", width=1 / 8))["state_dict"]
    torch.save(ckpt, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="of another shape"):
        fcnseg.load(tmp_path / "wide.pt")


def test_newer_schema_and_foreign_files_are_refused(tmp_path):
    ckpt = checkpoint_dict(_model())
    ckpt["schema_version"] = SCHEMA_VERSION + 1
    torch.save(ckpt, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="schema version 3 is newer"):
        fcnseg.load(tmp_path / "new.pt")
    torch.save(_model().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not an fcnseg checkpoint"):
        fcnseg.load(tmp_path / "bare.pt")


def test_save_errors(tmp_path):
    with pytest.raises(FcnsegError, match="3 names given for a model of 5 classes"):
        fcnseg.save_checkpoint(fcnseg.get_model("fcn32s", num_classes=5, **TINY), tmp_path / "x.pt", classes=CLASSES)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FcnsegError, match="cannot write checkpoint"):
        fcnseg.save_checkpoint(_model(), blocker / "sub" / "m.pt")
