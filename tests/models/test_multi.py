"""The paper's fusion and multi-task nets: early fusion (RGBD), late fusion (RGB-HHA), two-headed SIFT Flow FCN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.data import get_dataset
from fcnseg.data.nyud import NYUD_MEAN_HHA, NYUD_MEAN_LOG_DEPTH
from fcnseg.data.siftflow import SIFTFLOW_CLASSES, SIFTFLOW_FOLDER
from fcnseg.data.transforms import pad_collate
from fcnseg.engine.config import TrainConfig
from fcnseg.engine.fitting import build_model, staged_init
from fcnseg.engine.train import summed_loss, train
from fcnseg.errors import FcnsegError
from fcnseg.metrics import ConfusionMatrix
from fcnseg.models import LateFusionFCN, TwoHeadFCN, get_model, split_heads
from fcnseg.models.backbones import first_conv, widen_input_weight
from fcnseg.models.builders import with_input_channels
from tests.data.test_nyud import TEST as NYUD_TEST
from tests.data.test_nyud import make_nyud
from tests.helpers import TINY, randomise

# ---------------------------------------------------------------------------------------------- early fusion


def test_widened_weight_keeps_color_and_averages_it_for_the_extra_channels():
    w = torch.randn(8, 3, 3, 3)
    before = w.clone()
    out = widen_input_weight(w, 5)
    assert out.shape == (8, 5, 3, 3) and torch.equal(w, before)  # pure: the input is untouched
    assert torch.equal(out[:, :3], w)
    for c in (3, 4):
        torch.testing.assert_close(out[:, c], (w[:, 0] + w[:, 1] + w[:, 2]) / 3)
    with pytest.raises(FcnsegError, match="cannot widen"):
        widen_input_weight(torch.randn(8, 4, 3, 3), 5)


@pytest.mark.parametrize("name", ["fcn32s", "fcn32s_alexnet"])
def test_early_fusion_computes_the_color_net_plus_depth_spread_over_color(name):
    # The extra channel's filters are the mean of the colour ones, and the first layer is linear: a depth map d
    # adds what d / 3 added to each colour channel would. So the widened net on (rgb, d) equals the colour net on
    # rgb + d / 3, exactly up to float rounding, and on (rgb, 0) it equals the colour net on rgb.
    rgb_net = randomise(get_model(name, num_classes=3, alignment="caffe", **TINY), seed=0).eval()
    rgbd_net = get_model(name, num_classes=3, alignment="caffe", in_channels=4, **TINY).eval()
    state = rgb_net.state_dict()
    key = next(k for k, v in state.items() if v.dim() == 4)  # the first layer's weight
    state[key] = widen_input_weight(state[key], 4)
    rgbd_net.load_state_dict(state)
    assert rgbd_net.in_channels == 4 and first_conv(rgbd_net).weight.shape[1] == 4
    torch.manual_seed(1)
    rgb, d = torch.randn(1, 3, 41, 53), torch.randn(1, 1, 41, 53)
    with torch.no_grad():
        expected = rgb_net(rgb + d / 3)
        got = rgbd_net(torch.cat([rgb, d], 1))
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
        torch.testing.assert_close(rgbd_net(torch.cat([rgb, 0 * d], 1)), rgb_net(rgb), atol=1e-5, rtol=1e-5)


def test_in_channels_extends_the_input_normalisation():
    model = get_model("fcn32s", in_channels=4, **TINY)
    pp = model.preprocessing
    assert pp.channels == 4 and pp.mean[:3] == (0.485, 0.456, 0.406)
    assert pp.mean[3] == pytest.approx(sum(pp.mean[:3]) / 3) and pp.std[3] == pytest.approx(sum(pp.std[:3]) / 3)
    assert model.build_config["kwargs"]["in_channels"] == 4
    with pytest.raises(FcnsegError, match="in_channels must be an integer >= 3"):
        get_model("fcn8s", in_channels=1, **TINY)
    assert with_input_channels(model, 4) is model  # already 4: unchanged


def test_staged_init_widens_a_color_checkpoint(tmp_path):
    # The paper trains its RGBD net from the RGB FCN-32s: the colour checkpoint's first layer is widened on load.
    rgb = randomise(get_model("fcn32s", num_classes=40, **TINY), seed=0).eval()
    ckpt = fcnseg.save_checkpoint(rgb, tmp_path / "rgb.pt")
    rgbd = get_model("fcn32s", num_classes=40, in_channels=4, **TINY)
    left = staged_init(rgbd, ckpt)
    assert left == []  # every layer came from the colour net
    w_rgb, w = first_conv(rgb).weight, first_conv(rgbd).weight
    assert torch.equal(w[:, :3], w_rgb) and torch.allclose(w[:, 3], w_rgb.mean(1))
    assert rgbd.preprocessing.channels == 4 and rgbd.preprocessing.color() == rgb.preprocessing


# ----------------------------------------------------------------------------------------------- late fusion


@pytest.mark.parametrize("name", ["fcn32s_rgb_hha", "fcn16s_rgb_hha"])
def test_late_fusion_sums_the_two_streams_score_maps(name):
    model = randomise(get_model(name, alignment="caffe", **TINY), seed=0).eval()
    assert isinstance(model, LateFusionFCN) and model.in_channels == 6 and model.num_classes == 40
    assert list(model.streams) == ["rgb", "hha"]
    x = torch.randn(2, 6, 45, 38)
    with torch.no_grad():
        rgb, hha = model.streams["rgb"](x[:, :3]), model.streams["hha"](x[:, 3:])
        fused = model(x)
    assert rgb.abs().max() > 0.1 and hha.abs().max() > 0.1 and not torch.allclose(rgb, hha)
    torch.testing.assert_close(fused, rgb + hha, atol=0, rtol=0)
    # Trained end to end: a loss on the sum reaches both streams.
    model.train()
    F.cross_entropy(model(x), torch.randint(0, 40, (2, 45, 38))).backward()
    for stream in model.streams.values():
        assert stream.backbone.features[0].weight.grad.abs().sum() > 0


def test_late_fusion_refuses_other_inputs_and_mismatched_streams():
    with pytest.raises(FcnsegError, match="takes 6 channels"):
        get_model("fcn32s_rgb_hha", in_channels=4, **TINY)
    a = get_model("fcn32s", num_classes=5, **TINY)
    with pytest.raises(FcnsegError, match="differs from the first"):
        LateFusionFCN({"rgb": a, "hha": get_model("fcn32s", num_classes=6, **TINY)})
    with pytest.raises(FcnsegError, match="two or more streams"):
        LateFusionFCN({"rgb": a})


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s_rgb_hha", "fcn16s_twohead"])
@pytest.mark.parametrize("delta", [-3, -1, 1])
def test_a_wrong_channel_count_is_named_at_the_models_door(name, delta):
    model = get_model(name, in_channels=4, **TINY) if name == "fcn32s" else get_model(name, **TINY)
    c = model.in_channels + delta
    what = "colour first, then depth or HHA"
    with pytest.raises(FcnsegError) as e:
        model(torch.zeros(1, c, 50, 60))
    assert str(e.value) == f"input of shape (1, {c}, 50, 60): this model takes N x {model.in_channels} x H x W " + (
        f"normalised images ({what})" if model.in_channels > 3 else "normalised images (colour)"
    )
    assert model(torch.zeros(1, model.in_channels, 50, 60)).shape[-2:] == (50, 60)


def test_a_fusion_net_whose_recorded_input_is_color_only_is_refused_in_one_line(tmp_path, capsys):
    # What `fcnseg convert` used to write for the colour-HHA caffemodel: a 6-channel net, a 3-channel input.
    model = get_model("fcn32s_rgb_hha", **TINY)
    model.preprocessing = model.preprocessing.color()
    fcnseg.save_checkpoint(model, tmp_path / "old.pt")
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(
        FcnsegError, match="the model takes 6 input channels but its recorded input normalisation has 3"
    ):
        fcnseg.load(tmp_path / "old.pt").predict(tmp_path / "a.png")
    with pytest.raises(FcnsegError, match="expected an H x W x 6 uint8 array, got shape"):
        get_model("fcn32s_rgb_hha", **TINY).predict(np.zeros((50, 60, 3), np.uint8))  # colour alone: named


# ------------------------------------------------------------------------------------- NYUDv2 train and eval


def _nyud_train(tmp_path: Path, root: Path, modality: str, model: str) -> Path:
    run = tmp_path / f"run-{modality}"
    args = ["train", "--dataset", "nyud", "--root", str(root), "--data-option", f"modality={modality}",
            "--model", model, "--width", "0.0625", "--fc-dim", "16", "--iters", "2", "--val-every", "2",
            "--batch-size", "2", "--crop-size", "32", "--num-workers", "0", "--out", str(run),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return run / "last.pt"


def _eval_by_hand(model, ds) -> ConfusionMatrix:
    cm = ConfusionMatrix(40)
    for i in range(len(ds)):
        image, mask = ds.load_pair(i)
        cm.update(torch.from_numpy(model.predict(image).astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))
    return cm


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEPTH_MEAN = float(np.exp(NYUD_MEAN_LOG_DEPTH)) * 255 / 10_000  # FCN's mean log depth, encoded: about 65


def _expected_input(modality: str, pixel: list[int]) -> list[float]:
    """One pixel normalised by hand: colour channels with the ImageNet mean/std (the model's own input), depth and
    HHA with the release's means, divided by the colour channels' mean std, in their stored order."""
    means = {"rgb": [None] * 3, "hha": list(NYUD_MEAN_HHA), "rgbd": [None] * 3 + [DEPTH_MEAN],
             "rgb-hha": [None] * 3 + list(NYUD_MEAN_HHA)}[modality]  # fmt: skip
    out = []
    for c, (v, m) in enumerate(zip(pixel, means, strict=True)):
        if m is None:
            out.append((v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        else:
            out.append((v - m) / 255 / (sum(IMAGENET_STD) / 3))
    return out


@pytest.mark.parametrize(
    ("modality", "model_name"),
    [("rgb", "fcn32s"), ("hha", "fcn32s"), ("rgbd", "fcn32s"), ("rgb-hha", "fcn32s_rgb_hha")],
)
def test_nyud_fusion_trains_and_evaluates(tmp_path, modality, model_name):
    root = make_nyud(tmp_path / "nyud")
    ckpt = _nyud_train(tmp_path, root, modality, model_name)
    model = fcnseg.load(ckpt)
    channels = {"rgb": 3, "hha": 3, "rgbd": 4, "rgb-hha": 6}[modality]
    assert model.in_channels == channels and model.build_config["name"] == model_name
    # The checkpoint's input: a known pixel normalised as worked out by hand, channel by channel.
    pixel = [200, 10, 90, 65, 132, 7][:channels]
    got = model.preprocessing(np.array([[pixel]], np.uint8)).flatten().tolist()
    assert got == pytest.approx(_expected_input(modality, pixel), abs=1e-5)
    # Evaluated with random weights (two training steps barely move the zero-started scores): the command's
    # figures are those of the model's own, varied, predictions on the test images, counted here by hand.
    randomise(model, seed=5).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "random.pt")
    out = tmp_path / f"eval-{modality}"
    args = ["eval", str(ckpt), "--dataset", "nyud", "--root", str(root), "--split", "test",
            "--data-option", f"modality={modality}", "--out", str(out), "--num-workers", "0"]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    ds = get_dataset("nyud", root=root, split="test", modality=modality)
    assert len(ds) == len(NYUD_TEST)
    cm = _eval_by_hand(model, ds)
    assert int((cm.mat.sum(0) > 0).sum()) >= 2  # more than one class predicted
    hand = cm.compute()
    for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert doc[k] == pytest.approx(hand[k], abs=1e-12), k


@pytest.mark.parametrize("modality", ["rgbd", "hha"])
def test_color_jitter_is_refused_for_depth_and_hha(tmp_path, modality):
    root = make_nyud(tmp_path / "nyud")
    options = {"modality": modality}
    run = str(tmp_path / "run")
    cfg = TrainConfig(dataset="nyud", root=str(root), model="fcn32s", data_options=options, jitter=0.2, iters=1,
                      num_workers=0, out=run, progress=False, **TINY)  # fmt: skip
    with pytest.raises(FcnsegError, match="--jitter: colour jitter is for colour images; --dataset nyud gives depth"):
        train(cfg)


def test_late_fusion_starts_from_one_stream_or_a_coarser_fusion_net(tmp_path):
    # FCN-16s RGB-HHA from FCN-32s RGB-HHA (the paper's staged route), and both streams from a one-stream net.
    coarse = randomise(get_model("fcn32s_rgb_hha", **TINY), seed=0).eval()
    fine = get_model("fcn16s_rgb_hha", **TINY)
    left = staged_init(fine, fcnseg.save_checkpoint(coarse, tmp_path / "c.pt"))
    assert all(".score_skip.pool4." in k or ".upsample_" in k for k in left) and left
    assert torch.equal(fine.streams["hha"].backbone.fc7.weight, coarse.streams["hha"].backbone.fc7.weight)
    single = randomise(get_model("fcn32s", num_classes=40, **TINY), seed=0).eval()
    fused = get_model("fcn32s_rgb_hha", **TINY)
    assert staged_init(fused, fcnseg.save_checkpoint(single, tmp_path / "s.pt")) == []
    for stream in fused.streams.values():
        assert torch.equal(stream.head.score_fr.weight, single.head.score_fr.weight)


def test_nyud_modality_and_model_must_match(tmp_path, capsys):
    root = make_nyud(tmp_path / "nyud")
    cfg = TrainConfig(dataset="nyud", root=str(root), model="fcn32s_rgb_hha", data_options={"modality": "rgbd"}, **TINY)
    ds = get_dataset("nyud", root=root, split="train", modality="rgbd")
    with pytest.raises(FcnsegError, match="takes 6 input channels but --dataset nyud gives 4"):
        build_model(cfg, ds)
    assert main(["predict", str(_nyud_train(tmp_path, root, "rgbd", "fcn32s")), str(root / "data" / "images"),
                 "--out", str(tmp_path / "p")]) == 2  # fmt: skip
    assert "the model takes 4 input channels" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ two-headed FCN


def test_two_headed_fcn_shares_one_trunk():
    model = get_model("fcn16s_twohead", **TINY)
    assert isinstance(model, TwoHeadFCN) and model.heads == {"semantic": 33, "geometric": 3}
    backbones = [n for n, _ in model.named_modules() if n.endswith("backbone")]
    assert backbones == ["backbone"]  # one trunk
    randomise(model, seed=0).eval()
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        out = model(x)
        heads = split_heads(model, out)
        feats = model.backbone(model.pad(x))
        geo = model.score_heads["geometric"].decode(feats, 40, 52)
    assert out.shape == (1, 36, 40, 52) and {k: v.shape[1] for k, v in heads.items()} == model.heads
    torch.testing.assert_close(heads["geometric"], geo, atol=0, rtol=0)
    # The first head is the FCN's own layers: its logits are an fcn16s's with the same weights.
    single = get_model("fcn16s", num_classes=33, **TINY).eval()
    first = {k.replace(".semantic.", ".out."): v for k, v in model.state_dict().items()}
    single.load_state_dict({k: v for k, v in first.items() if not k.startswith("score_heads.geometric.")})
    with torch.no_grad():
        torch.testing.assert_close(heads["semantic"], single(x), atol=0, rtol=0)
    # Tiled: each head's mask equals the untiled one away from the windows' seams (here one window covers all).
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    whole, tiled = model.predict(image), model.predict(image, tile=64, overlap=0)
    assert all(np.array_equal(whole[k], tiled[k]) for k in model.heads)


def test_sum_of_both_losses():
    model = randomise(get_model("fcn16s_twohead", **TINY), seed=0).eval()
    x = torch.randn(2, 3, 24, 30)
    masks = torch.stack([torch.randint(0, 33, (2, 24, 30)), torch.randint(0, 3, (2, 24, 30))], 1)
    masks[0, 1, :4] = 255
    logits = model(x)
    expected = F.cross_entropy(logits[:, :33], masks[:, 0], reduction="sum") + F.cross_entropy(
        logits[:, 33:], masks[:, 1], ignore_index=255, reduction="sum"
    )
    torch.testing.assert_close(summed_loss(model, logits, masks), expected)


def test_pad_collate_stacks_one_mask_per_head():
    a = (torch.ones(3, 4, 5, dtype=torch.uint8), torch.zeros(2, 4, 5, dtype=torch.int64))
    b = (torch.ones(3, 6, 2, dtype=torch.uint8), torch.ones(2, 6, 2, dtype=torch.int64))
    images, masks = pad_collate([a, b])
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 2, 6, 5)
    assert (masks[0, :, 4:] == 255).all() and (masks[0, :, :4] == 0).all()
    assert (masks[1, :, :, 2:] == 255).all() and (masks[1, :, :, :2] == 1).all()
    with pytest.raises(ValueError, match="K x H x W"):
        pad_collate([a, (b[0], b[1][0])])  # one item with one label map, the other with two


# A tiny SIFT Flow of structured scenes a small net can fit: sky above a horizon, a building on the left and road on
# the right below it (geometric: sky / vertical / horizontal), a void band along the bottom; the horizon and the
# building's width differ per image, so the net must read the pixels.
SCENES = {"coast_natu1": (18, 30), "street_par2": (26, 20), "highway_bost3": (34, 40)}
SIZE = 64
SEM = {name: SIFTFLOW_CLASSES.index(name) + 1 for name in ("sky", "building", "road")}  # as stored: class + 1


def _scene(horizon: int, split: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(horizon)
    image = np.empty((SIZE, SIZE, 3), np.float64)
    sem = np.zeros((SIZE, SIZE), np.float64)
    geo = np.full((SIZE, SIZE), -1.0)
    image[:horizon], sem[:horizon], geo[:horizon] = (90, 150, 230), SEM["sky"], 1
    image[horizon:, :split], sem[horizon:, :split], geo[horizon:, :split] = (150, 120, 100), SEM["building"], 3
    image[horizon:, split:], sem[horizon:, split:], geo[horizon:, split:] = (60, 60, 60), SEM["road"], 2
    sem[-3:], geo[-3:] = 0, -1  # void
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), sem, geo


def make_scenes(root: Path) -> Path:
    for top in ("Images", "SemanticLabels", "GeoLabels"):
        (root / top / SIFTFLOW_FOLDER).mkdir(parents=True, exist_ok=True)
    for name, (horizon, split) in SCENES.items():
        image, sem, geo = _scene(horizon, split)
        Image.fromarray(image).save(root / "Images" / SIFTFLOW_FOLDER / f"{name}.jpg", quality=95)
        scipy.io.savemat(root / "SemanticLabels" / SIFTFLOW_FOLDER / f"{name}.mat", {"S": sem})
        scipy.io.savemat(root / "GeoLabels" / SIFTFLOW_FOLDER / f"{name}.mat", {"S": geo})
    (root / "train.txt").write_text("".join(f"{n}\n" for n in SCENES))
    (root / "test.txt").write_text("".join(f"{n}\n" for n in SCENES))
    return root


def test_two_headed_fcn_overfits_a_few_siftflow_images_on_both_heads(tmp_path):
    root = make_scenes(tmp_path / "siftflow")
    cfg = TrainConfig(
        dataset="siftflow", root=str(root), split="train", val_split="train", data_options={"target": "both"},
        model="fcn16s_twohead", width=1 / 8, fc_dim=32, batch_norm=True, preset="modern", optimizer="adamw",
        lr=3e-3, iters=60, warmup_iters=0, batch_size=3, crop_size=0, scale_min=1.0, scale_max=1.0, flip=False,
        val_every=60, num_workers=0, out=str(tmp_path / "run"), progress=False, deterministic=True,
    )  # fmt: skip
    state = train(cfg)
    last = state.history[-1]
    # Both heads fit the three training images: semantic (3 classes present) and geometric pixel accuracy.
    assert last["pixel_acc"] > 0.95 and last["geometric/pixel_acc"] > 0.95, last
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    header, final = rows[0].split(","), dict(zip(rows[0].split(","), rows[-1].split(","), strict=True))
    assert "geometric/pixel_acc" in header and float(final["geometric/pixel_acc"]) == last["geometric/pixel_acc"]
    model = fcnseg.load(tmp_path / "run" / "last.pt")
    assert model.head_classes["geometric"] == ["sky", "horizontal", "vertical"]
    ds = get_dataset("siftflow", root=root, split="train", target="both")
    image, _ = ds.load_pair(0)
    pred = model.predict(image)
    _, sem, geo = _scene(*SCENES["coast_natu1"])
    valid = sem > 0
    assert set(pred) == {"semantic", "geometric"}
    assert (pred["semantic"][valid] == sem[valid] - 1).mean() > 0.95
    assert (pred["geometric"][valid] == geo[valid] - 1).mean() > 0.95


def test_siftflow_eval_reports_both_heads_and_excludes_absent_classes(tmp_path):
    root = make_scenes(tmp_path / "siftflow")
    model = get_model("fcn16s_twohead", **TINY)
    model.classes = list(SIFTFLOW_CLASSES)
    model.head_classes = {"semantic": list(SIFTFLOW_CLASSES), "geometric": ["sky", "horizontal", "vertical"]}
    randomise(model, seed=3).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "two.pt")
    out = tmp_path / "eval"
    args = ["eval", str(ckpt), "--dataset", "siftflow", "--root", str(root), "--split", "test",
            "--data-option", "target=both", "--out", str(out), "--num-workers", "0"]  # fmt: skip
    assert main(args) == 0
    sem = json.loads((out / "semantic" / "metrics.json").read_text())
    geo = json.loads((out / "geometric" / "metrics.json").read_text())
    assert sem["excluded_from_means"] == ["cow", "desert", "moon"] and "excluded_from_means" not in geo
    assert set(geo["per_class"]) == {"sky", "horizontal", "vertical"}
    # By hand: the model's own predictions, one confusion matrix per head; the semantic means leave out the test
    # set's absent classes (their IU would be 0 wherever the model predicts them, NaN elsewhere).
    ds = get_dataset("siftflow", root=root, split="test", target="both")
    hand = {k: ConfusionMatrix(n) for k, n in model.heads.items()}
    for i in range(len(ds)):
        image, _ = ds.load_pair(i)
        _, s, g = _scene(*SCENES[ds.ids[i]])
        pred = model.predict(image)
        hand["semantic"].update(
            torch.from_numpy(pred["semantic"].astype(np.int64)),
            torch.from_numpy(np.where(s == 0, 255, s - 1).astype(np.int64)),
        )
        hand["geometric"].update(
            torch.from_numpy(pred["geometric"].astype(np.int64)),
            torch.from_numpy(np.where(g < 0, 255, g - 1).astype(np.int64)),
        )
    r_sem, r_geo = hand["semantic"].compute(), hand["geometric"].compute()
    keep = [i for i, c in enumerate(SIFTFLOW_CLASSES) if c not in ("cow", "desert", "moon")]
    iu = np.asarray(r_sem["per_class_iu"])
    assert np.nanmean(iu) != pytest.approx(np.nanmean(iu[keep]))  # the model predicts an absent class: it matters
    assert sem["mean_iu"] == pytest.approx(np.nanmean(np.asarray(r_sem["per_class_iu"])[keep]), abs=1e-12)
    assert sem["mean_acc"] == pytest.approx(np.nanmean(np.asarray(r_sem["per_class_acc"])[keep]), abs=1e-12)
    assert sem["pixel_acc"] == pytest.approx(r_sem["pixel_acc"], abs=1e-12)
    assert geo["pixel_acc"] == pytest.approx(r_geo["pixel_acc"], abs=1e-12)
    assert geo["mean_iu"] == pytest.approx(r_geo["mean_iu"], abs=1e-12)


def test_two_headed_model_needs_two_label_sets_and_the_reverse(tmp_path):
    root = make_scenes(tmp_path / "siftflow")
    one = get_dataset("siftflow", root=root, split="train", target="semantic")
    both = get_dataset("siftflow", root=root, split="train", target="both")
    cfg = TrainConfig(dataset="siftflow", model="fcn16s_twohead", **TINY)
    with pytest.raises(FcnsegError, match="is two-headed: expected a dataset with two label sets"):
        build_model(cfg, one)
    cfg = TrainConfig(dataset="siftflow", model="fcn16s", **TINY)
    with pytest.raises(FcnsegError, match="gives 2 label sets .*expected a two-headed model"):
        build_model(cfg, both)


def test_int8_keeps_every_stream_and_head_edge_in_float(tmp_path):
    # The layers quantisation leaves in float (first convolutions, score layers, upsamplers) are found in every
    # stream and every head, under the names the exported graph gives their weights: the state dict's names (one
    # export shows it; exporting late fusion too would double this test's time for the same fact).
    import onnx

    from fcnseg.export import export_onnx
    from fcnseg.runtime import float_layers

    for name, expected in [
        (
            "fcn16s_twohead",
            [
                "score_heads.semantic.score_",
                "score_heads.semantic.upsample_",
                "score_heads.geometric.score_",
                "backbone.features.0.",
            ],
        ),
        (
            "fcn16s_rgb_hha",
            [
                "streams.rgb.score_heads.out.score_",
                "streams.hha.score_heads.out.upsample_",
                "streams.hha.backbone.features.0.",
            ],
        ),
    ]:
        model = randomise(get_model(name, **TINY), seed=0).eval()
        keep = float_layers(model)
        assert set(expected) <= set(keep), (name, keep)
        weights = list(model.state_dict())
        if name == "fcn16s_twohead":
            export_onnx(model, tmp_path / f"{name}.onnx", check_sizes=[(32, 32)])
            weights = [i.name for i in onnx.load(str(tmp_path / f"{name}.onnx")).graph.initializer]
        for prefix in keep:
            assert any(w.startswith(prefix) for w in weights), (name, prefix)


def test_agreement_compares_each_head_on_its_own():
    # Two heads of 2 classes; the runs agree on the first head everywhere and on the second nowhere: 50 %. Over
    # the 4 joined channels the first head's larger scores would decide every pixel and give 100 %.
    from fcnseg.runtime import agreement

    model = get_model("fcn16s_twohead", num_classes=2, second_classes=2, **TINY)
    a = torch.tensor([9.0, 0.0, 1.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 3, 3)
    b = torch.tensor([9.0, 0.0, 0.0, 1.0]).view(1, 4, 1, 1).expand(1, 4, 3, 3)
    x = [torch.zeros(1, 3, 3, 3)]
    assert agreement(lambda _: a, lambda _: b, x, model) == 0.5
    assert agreement(lambda _: a, lambda _: b, x) == 1.0


def test_two_headed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    # Killed in step 3 of 4 (checkpoint at 2) and resumed: the same weights, bit for bit, as 4 steps in one go.
    import fcnseg.engine.train as train_mod

    root = make_scenes(tmp_path / "siftflow")

    def cfg(out: str, resume: bool = False) -> TrainConfig:
        return TrainConfig(
            dataset="siftflow", root=str(root), split="train", val_split="train", data_options={"target": "both"},
            model="fcn16s_twohead", preset="modern", iters=4, batch_size=2, crop_size=32, val_every=2,
            num_workers=0, out=str(tmp_path / out), progress=False, deterministic=True, resume=resume, **TINY,
        )  # fmt: skip

    train(cfg("once"))
    real_step, calls = train_mod.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill would stop it, without the checkpoint a Ctrl-C writes
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("twice"))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    state = train(cfg("twice", resume=True))
    assert state.iteration == 4 and "geometric/mean_iu" in state.history[-1]
    a, b = fcnseg.load(tmp_path / "once" / "last.pt"), fcnseg.load(tmp_path / "twice" / "last.pt")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize(
    ("modality", "model_name", "extra"), [("rgbd", "fcn32s", ["depth"]), ("rgb-hha", "fcn32s_rgb_hha", ["hha"])]
)
def test_predict_cli_takes_depth_or_hha_beside_the_color_images(tmp_path, capsys, modality, model_name, extra):
    # fcnseg predict IMAGES --extra DIR: each colour image's depth (16-bit millimetres) or HHA image, found by its
    # file name, joins it as the dataset would join them; the masks equal model.predict on the dataset's arrays.
    root = make_nyud(tmp_path / "nyud")
    model = randomise(fcnseg.load(_nyud_train(tmp_path, root, modality, model_name)), seed=7).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "random.pt")
    out = tmp_path / "masks"
    args = ["predict", str(ckpt), str(root / "data" / "images"), "--out", str(out), "--quiet"]
    assert main([*args, *(a for d in extra for a in ("--extra", str(root / "data" / d)))]) == 0
    ds = get_dataset("nyud", root=root, split="test", modality=modality)
    for i in range(len(ds)):
        image = ds.read_image(ds.image_path(i))
        saved = np.array(Image.open(out / f"img_{ds.ids[i]}.png"))
        assert np.array_equal(saved, model.predict(image)), ds.ids[i]
    # A missing depth / HHA file is reported for that image; the others are still written.
    (root / "data" / extra[0] / f"img_{ds.ids[0]}.png").unlink()
    out2 = tmp_path / "masks2"
    args[4] = str(out2)
    assert main([*args, *(a for d in extra for a in ("--extra", str(root / "data" / d)))]) == 2
    err = capsys.readouterr().err
    assert (
        f"img_{ds.ids[0]}" in err
        and "--extra" in err
        and len(list(out2.glob("*.png"))) == len(list(out.glob("*.png"))) - 1
    )
    # Without --extra the fusion net is refused up front.
    assert main(args) == 2 and "pass --extra" in capsys.readouterr().err


def test_predict_cli_writes_probabilities_and_overlays_for_every_head(tmp_path):
    # One path over named heads: STEM.png / STEM.npy / STEM_overlay.png for the first head and the same under
    # STEM_geometric for the second, each head's probabilities its own softmax (summing to 1 per pixel).
    from fcnseg.cli import main
    from fcnseg.imageio import read_mask_png

    model = randomise(get_model("fcn16s_twohead", num_classes=5, second_classes=3, **TINY), seed=0).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt", classes=[f"c{i}" for i in range(5)])
    image = np.random.default_rng(1).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["predict", str(ckpt), str(tmp_path / "a.png"), "--out", str(out), "--probs", "--overlay", "png", "--quiet"]
    assert main(args) == 0
    # The oracle: ImageNet normalisation by hand, the model's two score blocks (5 then 3 channels), a softmax each.
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    x = x / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        logits = model(x[None])[0]
    for suffix, scores in [("", logits[:5]), ("_geometric", logits[5:])]:
        probs = np.load(out / f"a{suffix}.npy")
        expected = scores.softmax(0).numpy()
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
        assert np.array_equal(read_mask_png(out / f"a{suffix}.png"), expected.argmax(0))
        assert np.asarray(Image.open(out / f"a{suffix}_overlay.png")).shape == (37, 45, 3)
