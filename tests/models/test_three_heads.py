"""A third head needs no change outside fcnseg/models/: a three-headed FCN, built here from the models' own parts
(one backbone, one ScoreHead per label set), trains, evaluates and predicts through the ordinary commands on a
fake dataset of three label sets.

Each label set is one colour channel of blocks of 16 x 16 pixels: "red" labels a block 1 where its red channel
is high, "green" and "blue" likewise. Every set is learnable from the colour alone, and the three disagree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

import fcnseg
from fcnseg.cli import main
from fcnseg.data.base import SegmentationDataset, register_dataset
from fcnseg.engine.config import TrainConfig
from fcnseg.engine.train import train
from fcnseg.metrics import ConfusionMatrix
from fcnseg.models import FCN, ScoreHead, VGG16Backbone, register_model
from fcnseg.palette import palette_for

HEADS = ("red", "green", "blue")
LEVELS = ("low", "high")


def _blocks(split: str, index: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 image, 3 x H x W masks): 4 x 4 blocks, each channel high (220) or low (30) at random."""
    rng = np.random.default_rng([{"train": 0, "val": 1}[split], index])
    bits = rng.integers(0, 2, (3, 4, 4))
    masks = bits.repeat(size // 4, 1).repeat(size // 4, 2).astype(np.uint8)
    image = np.where(masks.transpose(1, 2, 0) == 1, 220, 30) + rng.integers(-10, 10, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), masks


class ThreeSets(SegmentationDataset):
    """Generated blocks with three label sets (red, green, blue: each low or high)."""

    def __init__(self, root: Any = None, split: str = "train", transforms: Callable | None = None) -> None:
        super().__init__(transforms)
        self.split, self.ids = split, [f"im{i}" for i in range(4)]
        self.classes = LEVELS
        self.palette = palette_for(LEVELS, 2)

    @property
    def head_classes(self) -> dict[str, tuple[str, ...]]:
        return dict.fromkeys(HEADS, LEVELS)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, masks = _blocks(self.split, index)
        return image, masks[0]

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, masks = _blocks(self.split, index)
        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(masks).to(torch.int64))
        return self.transforms(img, mask) if self.transforms is not None else (img, mask)


def fcn16s_threehead(
    *,
    num_classes: int = 2,
    heads: dict[str, int] | None = None,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
) -> FCN:
    """FCN-16s with one head per label set (red, green, blue by default); no pretrained weights here."""
    assert backbone_weights is None
    backbone = VGG16Backbone(alignment=alignment, width=width, fc_dim=fc_dim, batch_norm=batch_norm, dropout=dropout)
    counts = heads or dict.fromkeys(HEADS, num_classes)
    options = {"skips": ("pool4",), "learnable_upsampling": learnable_upsampling}
    return FCN(backbone, {k: ScoreHead(backbone, n, **options) for k, n in counts.items()})


@pytest.fixture
def registered():
    """The model and the dataset registered for this test only: the registry-wide tests must not see them."""
    from fcnseg.data.base import _DATASETS
    from fcnseg.models.registry import _MODELS

    register_model()(fcn16s_threehead)
    register_dataset("test-three-sets")(ThreeSets)
    yield
    _MODELS.pop("fcn16s_threehead")
    _DATASETS.pop("test-three-sets")


def test_three_heads_train_evaluate_and_predict(tmp_path: Path, registered: None) -> None:
    cfg = TrainConfig(
        dataset="test-three-sets", val_split="train", model="fcn16s_threehead", width=1 / 8, fc_dim=32, batch_norm=True,
        preset="modern", optimizer="adamw", lr=3e-3, iters=60, warmup_iters=0, batch_size=4, crop_size=0,
        scale_min=1.0, scale_max=1.0, flip=False, jitter=0.0, val_every=60, num_workers=0, out=str(tmp_path / "run"),
        progress=False, deterministic=True, dropout=0.0,
    )  # fmt: skip
    state = train(cfg)
    last = state.history[-1]
    # Every head learnt its own label set: the first picks the best checkpoint, the others are logged per head.
    assert last["pixel_acc"] > 0.95 and last["green/pixel_acc"] > 0.95 and last["blue/pixel_acc"] > 0.95, last
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"green/mean_iu", "blue/mean_iu"} <= set(header)

    model = fcnseg.load(tmp_path / "run" / "best.pt")
    assert model.heads == dict.fromkeys(HEADS, 2) and model.head_classes == dict.fromkeys(HEADS, list(LEVELS))
    image, masks = _blocks("train", 0)  # the images it was fitted to
    pred = model.predict(image)
    assert list(pred) == list(HEADS)
    for k, head in enumerate(HEADS):
        assert (pred[head] == masks[k]).mean() > 0.95, head

    # eval: a report per head, equal to confusion matrices counted here from model.predict.
    out = tmp_path / "eval"
    argv = ["eval", str(tmp_path / "run" / "best.pt"), "--dataset", "test-three-sets", "--split", "train", "--out",
            str(out), "--num-workers", "0"]  # fmt: skip
    assert main(argv) == 0
    hand = {head: ConfusionMatrix(2) for head in HEADS}
    for i in range(4):
        image, masks = _blocks("train", i)
        pred = model.predict(image)
        for k, head in enumerate(HEADS):
            hand[head].update(
                torch.from_numpy(pred[head].astype(np.int64)), torch.from_numpy(masks[k].astype(np.int64))
            )
    for head in HEADS:
        figures = json.loads((out / head / "metrics.json").read_text())
        assert figures["mean_iu"] == pytest.approx(hand[head].compute()["mean_iu"], abs=1e-12), head

    # predict: one mask per head, the first as STEM.png, the others as STEM_<head>.png.
    Image.fromarray(_blocks("train", 1)[0]).save(tmp_path / "x.png")
    assert (
        main(["predict", str(tmp_path / "run" / "best.pt"), str(tmp_path / "x.png"), "--out", str(tmp_path / "m")]) == 0
    )
    _, masks = _blocks("train", 1)
    written = {p.name for p in (tmp_path / "m").iterdir()}
    assert written == {"x.png", "x_green.png", "x_blue.png"}
    for k, name in enumerate(["x.png", "x_green.png", "x_blue.png"]):
        got = np.asarray(Image.open(tmp_path / "m" / name))
        assert (got == masks[k]).mean() > 0.95, name
