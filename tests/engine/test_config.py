import pytest
import yaml

from fcnseg.cli import build_parser
from fcnseg.cli.train import config_from_args
from fcnseg.engine.config import PAPER_LR, TrainConfig
from fcnseg.errors import FcnsegError


@pytest.mark.parametrize("model", sorted(PAPER_LR))
def test_paper_preset_is_the_release_recipe(model):
    cfg = TrainConfig(preset="paper", model=model).resolved()
    assert cfg.lr == {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}[model]
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.bias_lr_mult) == ("sgd", 0.99, 5e-4, 2.0)
    assert (cfg.loss, cfg.loss_reduction, cfg.batch_size, cfg.crop_size, cfg.learnable_upsampling) == (
        "ce",
        "sum",
        1,
        0,
        False,
    )


def test_modern_preset_and_explicit_values_win():
    cfg = TrainConfig(preset="modern", iters=2000, lr=0.02).resolved()
    assert (cfg.loss, cfg.loss_reduction, cfg.optimizer, cfg.lr, cfg.warmup_iters, cfg.poly_power) == (
        "ce",
        "mean",
        "sgd",
        0.02,
        100,
        0.9,
    )
    assert TrainConfig(preset="modern", optimizer="adamw").resolved().lr == 1e-3
    with pytest.raises(FcnsegError, match="--preset 'fast'"):
        TrainConfig(preset="fast").resolved()
    with pytest.raises(FcnsegError, match="--loss 'max'"):
        TrainConfig(loss="max").resolved()


def test_yaml_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("model: fcn16s\niters: 50\nlr: 1\nbatch-size: 4\ndata_options: {size: 64}\n")
    args = build_parser().parse_args(
        ["train", "--config", str(tmp_path / "c.yaml"), "--iters", "70", "--data-option", "seed=3", "--no-flip"]
    )
    cfg = config_from_args(args)
    assert (cfg.model, cfg.iters, cfg.lr, cfg.batch_size, cfg.flip) == ("fcn16s", 70, 1.0, 4, False)
    assert cfg.data_options == {"seed": 3}  # a flag replaces the file's value as a whole


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("iters: 5\nlearning_rate: 0.1\n", "unknown option 'learning_rate'"),
        ("iters: five\n", "option 'iters': expected int, got 'five'"),
        ("flip: 3\n", "option 'flip': expected bool or null"),
        ("- iters\n", "expected a mapping"),
        ("iters: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FcnsegError, match=message):
        TrainConfig.from_yaml(path)


def test_saved_config_round_trips(tmp_path):
    weights = {"out": [0.1, 1 / 3, 2.0, 0.0]}  # every float back exactly: a resumed run trains with the same ones
    cfg = TrainConfig(model="fcn8s", iters=5, data_options={"size": 32}, class_weight_values=weights).resolved()
    cfg.save(tmp_path / "config.yaml")
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert doc["fcnseg_version"] and "git_commit" in doc
    loaded = {k: v for k, v in doc.items() if k not in ("fcnseg_version", "git_commit")}
    assert TrainConfig(**loaded) == cfg


@pytest.mark.parametrize(
    ("file_text", "flags", "want"),
    [
        # loss once held the reduction: sum / mean in any layer mean cross-entropy with that reduction, and a later
        # layer's loss or loss_reduction overrides it as it would the new spelling.
        ("loss: sum\n", [], ("ce", "sum")),
        ("loss: sum\n", ["--loss", "focal"], ("focal", "sum")),
        ("loss: sum\n", ["--loss-reduction", "mean"], ("ce", "mean")),
        ("loss: dice\n", ["--loss", "mean"], ("ce", "mean")),
        ("loss: lovasz\nloss_reduction: sum\n", [], ("lovasz", "sum")),
        ("loss: mean\nloss_reduction: mean\n", ["--preset", "paper"], ("ce", "mean")),
        ("preset: paper\n", [], ("ce", "sum")),
    ],
)
def test_the_former_loss_reduction_spelling_keeps_its_meaning(tmp_path, file_text, flags, want):
    (tmp_path / "c.yaml").write_text(file_text)
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), *flags]))
    assert (cfg.resolved().loss, cfg.resolved().loss_reduction) == want


def test_loss_options_are_checked():
    assert (TrainConfig(loss="sum").resolved().loss, TrainConfig(loss="sum").resolved().loss_reduction) == ("ce", "sum")
    with pytest.raises(FcnsegError, match="--loss mean .* contradicts --loss-reduction 'sum'"):
        TrainConfig(loss="mean", loss_reduction="sum").resolved()
    with pytest.raises(FcnsegError, match="--focal-gamma must be >= 0"):
        TrainConfig(focal_gamma=float("nan")).resolved()
    with pytest.raises(FcnsegError, match="--loss-reduction 'avg': expected sum or mean"):
        TrainConfig(loss_reduction="avg").resolved()


def test_class_weight_values_are_no_option(tmp_path):
    (tmp_path / "c.yaml").write_text("class_weight_values: {out: [1, 2]}\n")
    with pytest.raises(FcnsegError, match="option 'class_weight_values' is written by the run"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--class-weight-value", "out=[1, 2]"])
