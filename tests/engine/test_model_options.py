"""TrainConfig hands the model builder one mapping of options: the ones every builder takes, and VGG's own (fc_dim,
batch_norm, dropout) only when set, so that another backbone's builder is never given them; --resume compares
model options as the builders took them."""

import pytest
import torch

from fcnseg.engine import fitting
from fcnseg.engine.checkpointing import check_resume_config
from fcnseg.engine.config import TrainConfig
from fcnseg.engine.fitting import build_model
from fcnseg.engine.run import build_data
from fcnseg.errors import FcnsegError
from tests.engine.conftest import TINY_TRAIN


def test_model_options_pass_only_what_is_set():
    cfg = TrainConfig(model="fcn8s_resnet50", width=0.5)
    assert cfg.model_options() == {"alignment": "aligned", "width": 0.5, "learnable_upsampling": False}
    vgg = TrainConfig(fc_dim=16, batch_norm=False, dropout=0.0, backbone_weights="CAFFE")
    options = vgg.model_options()
    assert (options["fc_dim"], options["batch_norm"], options["dropout"]) == (16, False, 0.0)
    assert options["backbone_weights"] == "CAFFE"


def test_build_model_gives_a_builder_the_options_set_and_the_data_ones(monkeypatch):
    seen = {}
    real = fitting.get_model

    def spy(name, **options):
        seen.update(options)
        return real(name, **options)

    monkeypatch.setattr(fitting, "get_model", spy)
    ds = build_data(TrainConfig(**TINY_TRAIN).resolved())[0]
    build_model(TrainConfig(**{**TINY_TRAIN, "model": "fcn8s_resnet50", "fc_dim": None}), ds)
    assert "fc_dim" not in seen and "dropout" not in seen and "batch_norm" not in seen
    assert seen["num_classes"] == len(ds.classes) and seen["width"] == TINY_TRAIN["width"]
    seen.clear()
    model = build_model(TrainConfig(**TINY_TRAIN), ds)
    assert seen["fc_dim"] == 16 and model.build_config["kwargs"]["fc_dim"] == 16


class _Built(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.build_config = {"name": "fcn32s", "kwargs": kwargs}


def _ckpt(saved, built):
    return {"extra": {"config": saved}, "config": built}


def test_resume_compares_model_options_as_the_builders_took_them(tmp_path):
    path = tmp_path / "run" / "last.pt"
    # Trained with fc_dim unset (the builder's 4096), resumed with --fc-dim 4096: the same net.
    check_resume_config(path, _ckpt({"fc_dim": None}, {"fc_dim": 4096}), TrainConfig(fc_dim=4096), _Built(fc_dim=4096))
    # A builder without the option: nothing to compare.
    check_resume_config(path, _ckpt({"fc_dim": None}, {}), TrainConfig(model="fcn32s"), _Built())
    # Trained with --fc-dim 16, resumed without it: the builder's default does not fit, and the message says so.
    with pytest.raises(FcnsegError) as e:
        check_resume_config(path, _ckpt({"fc_dim": 16}, {"fc_dim": 16}), TrainConfig(), _Built(fc_dim=4096))
    assert str(e.value).startswith(f"--resume: --fc-dim 4096 does not fit the run in {path.parent}, trained with "
                                   "--fc-dim 16")  # fmt: skip


def test_a_run_saved_with_the_once_ignored_options_resumes(tmp_path):
    # Runs of a ResNet FCN made while every builder took fc_dim / batch_norm / dropout saved them in config.yaml and
    # in the checkpoint's config; they had no effect, and --resume neither passes them on nor compares them.
    from fcnseg.engine.config import layered_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: fcn8s_resnet50\nwidth: 0.0625\nfc_dim: 4096\nbatch_norm: false\n"
                                     "dropout: 0.5\niters: 3\n")  # fmt: skip
    cfg = layered_config({"resume": True, "out": str(run)})
    assert (cfg.model, cfg.width, cfg.iters) == ("fcn8s_resnet50", 0.0625, 3)
    assert (cfg.fc_dim, cfg.batch_norm, cfg.dropout) == (None, None, None)
    assert cfg.model_options() == {"alignment": "aligned", "width": 0.0625, "learnable_upsampling": False}
    saved = {"model": "fcn8s_resnet50", "fc_dim": 4096, "batch_norm": False, "dropout": 0.5, "width": 0.0625}
    built = _Built(width=0.0625)
    check_resume_config(run / "last.pt", _ckpt(saved, {"fc_dim": 4096, "width": 0.0625}), cfg, built)
    # A VGG16 run keeps them: its saved fc_dim is still compared.
    with pytest.raises(FcnsegError, match="--fc-dim"):
        check_resume_config(run / "last.pt", _ckpt({"fc_dim": 16}, {"fc_dim": 16}), TrainConfig(), _Built(fc_dim=4096))


def test_train_refuses_an_option_the_model_has_not_in_one_line(tmp_path, capsys):
    from fcnseg.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "fcn8s_resnet50", "--fc-dim", "16", "--iters", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'fcn8s_resnet50' takes no option(s) fc_dim" in err, err
    assert not out.exists()  # refused before the run folder is made
