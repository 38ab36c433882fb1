"""Training: overfitting, staged initialisation, exact resume, divergence, the CLI contract."""

import contextlib
import copy
import csv
import math

import numpy as np
import pytest
import torch

import fcnseg
from fcnseg.checkpoint import read_checkpoint
from fcnseg.cli import main
from fcnseg.engine import checkpointing
from fcnseg.engine import run as run_mod
from fcnseg.engine import train as train_mod
from fcnseg.engine.config import TrainConfig
from fcnseg.engine.fitting import build_model, staged_init
from fcnseg.engine.train import TrainingDivergedError, train
from tests.engine.conftest import TINY_TRAIN
from tests.helpers import TINY, randomise


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_TRAIN, "out": str(tmp_path / name), **kw})


def _blocks_tree(root, n=3, size=64):
    """A folder dataset of ``n`` noisy images, each a few rectangles of 3 colour-coded classes on background."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colors = np.array([[40, 40, 40], [220, 30, 30], [30, 200, 40], [40, 60, 230]])
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for c in (1, 2, 3):
            y, x = rng.integers(0, size - 20, 2)
            h, w = rng.integers(8, 20, 2)
            mask[y : y + h, x : x + w] = c
        img = colors[mask] + rng.integers(-20, 20, (size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    (root / "train.txt").write_text("".join(f"im{i}\n" for i in range(n)))
    (root / "val.txt").write_text("".join(f"im{i}\n" for i in range(n)))


def test_overfits_a_few_images(tmp_path):
    # Three images, seen again and again: the loss must fall and the net must learn them (mean IU measured on the
    # same images).
    _blocks_tree(tmp_path / "data")
    cfg = _cfg(
        tmp_path,
        dataset="folder",
        root=str(tmp_path / "data"),
        data_options=None,
        model="fcn8s",
        width=1 / 8,
        fc_dim=32,
        batch_norm=True,
        dropout=0.0,
        iters=200,
        val_every=50,
        lr=0.05,
        flip=False,
        batch_size=3,
        log_every=5,
    )
    state = train(cfg)
    with open(tmp_path / "run" / "log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    assert losses[-1] < 0.3 * losses[0]
    assert state.history[-1]["mean_iu"] >= 0.8
    assert state.best_miou == max(h["mean_iu"] for h in state.history)
    for name in ("config.yaml", "last.pt", "best.pt", "log.csv"):
        assert (tmp_path / "run" / name).is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_staged_init_copies_shared_layers_and_zeroes_new_scores(tmp_path):
    train(_cfg(tmp_path, "s32", iters=2, val_every=2))
    coarse = read_checkpoint(tmp_path / "s32" / "last.pt")["state_dict"]
    fine = fcnseg.get_model("fcn16s", num_classes=7, **TINY)
    left = staged_init(fine, tmp_path / "s32" / "last.pt")
    own = fine.state_dict()
    for k, v in coarse.items():
        if k in own and own[k].shape == v.shape:
            assert torch.equal(own[k], v), k
    assert sum(k.startswith("backbone.") for k in coarse) == sum(k.startswith("backbone.") for k in own)
    head = "score_heads.out."  # the one head's layers
    assert torch.equal(own[head + "score_fr.weight"], coarse[head + "score_fr.weight"])
    assert coarse[head + "score_fr.weight"].abs().sum() > 0  # trained, so "equal" is not "both zero"
    assert {head + "score_skip.pool4.weight", head + "score_skip.pool4.bias"} <= set(left)
    assert (
        own[head + "score_skip.pool4.weight"].abs().sum() == 0 and own[head + "score_skip.pool4.bias"].abs().sum() == 0
    )
    # The 16s net starts exactly where the 32s one was: new skip scores are zero.
    fine.eval()
    coarse_model = fcnseg.load(tmp_path / "s32" / "last.pt")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a, b = coarse_model(x), fine(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.9  # 64/32 vs 4/2+32/16 bilinear: nearly the same map


class _Stop(Exception):
    pass


def test_resume_gives_the_same_weights_bit_for_bit(tmp_path, monkeypatch):
    common = dict(
        model="fcn16s", iters=6, val_every=2, dropout=0.5, flip=True, scale_min=0.75, scale_max=1.25, crop_size=40
    )
    straight = train(_cfg(tmp_path, "straight", **common))

    # Interrupt after 3 steps (checkpoint at 2): the 4th step raises as a kill would stop it.
    real_step, calls = train_mod.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Stop
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(_Stop):
        train(_cfg(tmp_path, "interrupted", **common))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert read_checkpoint(tmp_path / "interrupted" / "last.pt")["extra"]["train_state"]["iteration"] == 2
    resumed = train(_cfg(tmp_path, "interrupted", resume=True, **common))

    assert resumed.iteration == straight.iteration == 6
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(tmp_path / "interrupted" / "last.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    opt_a, opt_b = a["extra"]["train_state"]["optimizer"], b["extra"]["train_state"]["optimizer"]
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["momentum_buffer"], opt_b["state"][k]["momentum_buffer"])
    with open(tmp_path / "interrupted" / "log.csv") as f:
        iterations = [int(r["iteration"]) for r in csv.DictReader(f) if r["mean_iu"]]
    assert iterations == [2, 4, 6]  # the resumed log has no duplicated rows


def test_divergence_stops_with_a_clear_message(tmp_path):
    cfg = _cfg(tmp_path, iters=30, val_every=1, lr=1e12, warmup_iters=0)
    with pytest.raises(
        TrainingDivergedError, match=r"loss is (nan|inf) at iteration \d+: training stopped; .*last\.pt"
    ):
        train(cfg)
    kept = read_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    base = dict(iters=2, val_every=2, dropout=0.0, flip=False)
    train(_cfg(tmp_path, "big", batch_size=4, **base))
    train(_cfg(tmp_path, "accum", batch_size=2, accum_steps=2, **base))
    a = read_checkpoint(tmp_path / "big" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "accum" / "last.pt")["state_dict"]
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_paper_preset_uses_summed_loss_and_doubled_bias_rate(tmp_path):
    cfg = _cfg(tmp_path, preset="paper", batch_size=None, iters=1)
    cfg = cfg.resolved()
    model = fcnseg.get_model("fcn32s", num_classes=7, **TINY)
    groups = run_mod.param_groups(model, cfg)
    assert groups[0]["lr"] == 1e-10 and groups[1]["lr"] == 2e-10
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups[1]["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # upsampling frozen, left out

    # One step of the preset on one whole image with void pixels: the loss it reports is the per-pixel
    # cross-entropy summed over the valid pixels (not their mean), and the biases (all zero before the step)
    # moved by 2 x lr times the gradient of that sum (momentum starts from the first gradient).
    assert cfg.loss_reduction == "sum" and cfg.loss == "ce" and cfg.batch_size == 1 and cfg.amp is False
    model = _scored_model(num_classes=7)
    g = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 7, (1, 48, 64), generator=g)
    masks[0, :10] = 255
    masks[torch.rand(1, 48, 64, generator=g) < 0.2] = 255
    micro = [(torch.randn(1, 3, 48, 64, generator=g), masks)]
    valid = int((masks != 255).sum())
    expected, grads = _hand_loss(model, micro, "sum")
    params = [p for p in model.parameters() if p.requires_grad]
    biases = [(p, grad) for p, grad in zip(params, grads, strict=True) if p.dim() == 1]
    assert biases and not any(p.any() for p, _ in biases)
    optimizer = run_mod.build_optimizer(model, cfg)
    _, scaler = run_mod.amp_context(cfg, torch.device("cpu"))
    loss = train_mod.train_step(model, micro, optimizer, scaler, cfg, torch.device("cpu"), contextlib.nullcontext)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert valid > 1000  # so the sum is far from the mean
    for p, grad in biases:
        want = -2e-10 * grad
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert model.head.score_fr.bias.abs().max() > 1e-9  # the summed gradient is large: a mean's would be ~1e-12


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_is_fused_and_steps_as_written_out(tmp_path, optimizer):
    # Two steps with known gradients against the update written out in float64: Caffe's SGD (v <- momentum v +
    # (g + decay w), w <- w - lr v, biases at 2 x lr without decay in the paper preset) and AdamW's decoupled decay
    # (Loshchilov and Hutter). Catches a group losing its rate or decay, and a fused kernel stepping otherwise.
    cfg = _cfg(tmp_path, preset="paper" if optimizer == "sgd" else "modern", optimizer=optimizer, lr=0.05).resolved()
    model = fcnseg.get_model("fcn32s", num_classes=3, width=1 / 16, fc_dim=8)
    opt = run_mod.build_optimizer(model, cfg)
    assert all(group["fused"] for group in opt.param_groups)
    params = [p for group in opt.param_groups for p in group["params"]]
    rates = {id(p): (group["lr"], group["weight_decay"]) for group in opt.param_groups for p in group["params"]}
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
    want = [p.detach().double().clone() for p in params]
    state = [dict(v=torch.zeros_like(w), m=torch.zeros_like(w), s=torch.zeros_like(w)) for w in want]
    for t, step_grads in enumerate(grads, start=1):
        for p, grad in zip(params, step_grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        for i, (p, grad) in enumerate(zip(params, step_grads, strict=True)):
            lr, decay = rates[id(p)]
            w, grad, st = want[i], grad.double(), state[i]
            if optimizer == "sgd":
                st["v"] = (grad + decay * w) if t == 1 else cfg.momentum * st["v"] + grad + decay * w
                want[i] = w - lr * st["v"]
            else:
                b1, b2 = 0.9, 0.999
                st["m"], st["s"] = b1 * st["m"] + (1 - b1) * grad, b2 * st["s"] + (1 - b2) * grad**2
                update = (st["m"] / (1 - b1**t)) / ((st["s"] / (1 - b2**t)).sqrt() + 1e-8)
                want[i] = w * (1 - lr * decay) - lr * update
    assert {lr for lr, _ in rates.values()} == ({0.05, 0.1} if optimizer == "sgd" else {0.05})
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_then_poly():
    cfg = TrainConfig(iters=110, warmup_iters=10, poly_power=0.9).resolved()
    f = [run_mod.lr_factor(cfg, i) for i in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == 1.0 and f[60] == pytest.approx(0.5**0.9)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert math.isclose(run_mod.lr_factor(TrainConfig(preset="paper").resolved(), 500), 1.0)


def test_cli_train_contract(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--data-option",
            "size=48",
            "--data-option",
            "num_images=8",
            "--split",
            "train",
            "--model",
            "fcn8s",
            "--preset",
            "modern",
            "--iters",
            "2",
            "--val-every",
            "2",
            "--width",
            "0.0625",
            "--fc-dim",
            "16",
            "--batch-size",
            "2",
            "--val-images",
            "2",
            "--num-workers",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("config.yaml", "last.pt", "best.pt", "log.csv"):
        assert (out / name).is_file()
    assert "iteration 2: mean IU" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert main(["train", "--dataset", "nope", "--out", str(tmp_path / "x"), "--iters", "1"]) == 2


def test_rng_state_round_trip():
    state = checkpointing.rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    checkpointing.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resume_takes_the_new_learning_rate(tmp_path):
    # After a divergence the message says "lower --lr": the resumed run must use it, not the saved one.
    train(_cfg(tmp_path, iters=2, val_every=2, lr=0.01, warmup_iters=0, poly_power=0.0))
    cfg = _cfg(tmp_path, iters=3, val_every=3, lr=0.001, warmup_iters=0, poly_power=0.0, resume=True).resolved()
    model = build_model(cfg, run_mod.build_data(cfg)[0])
    optimizer = run_mod.build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    _, scaler = run_mod.amp_context(cfg, torch.device("cpu"))
    state = checkpointing.restore_run(tmp_path / "run", model, optimizer, scheduler, scaler, cfg)
    assert state.iteration == 2
    assert [g["lr"] for g in optimizer.param_groups] == [0.001, 0.001]
    assert scheduler.base_lrs == [0.001, 0.001]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--log-every", "0"], "--log-every must be >= 1"),
        (["--num-workers", "-1"], "--num-workers must be >= 0"),
        (["--device", "gpu"], "--device 'gpu'"),
        (["--data-option", "split=val"], "--data-option split: set it with --split"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, capsys, flags, message):
    code = main(["train", "--data-option", "size=32", "--data-option", "num_images=4", "--width", "0.0625",
                 "--fc-dim", "8", "--iters", "1", "--no-progress", "--out", str(tmp_path / "r"), *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_init_from_weights_with_another_input_keeps_it_through_resume(tmp_path, monkeypatch):
    # A model initialised from Caffe-input weights trains, saves and resumes with the Caffe input, never the default.
    from fcnseg.preprocessing import CAFFE

    src = fcnseg.get_model("fcn32s", num_classes=7, **TINY)
    fcnseg.save_checkpoint(src, tmp_path / "caffe_input.pt", preprocessing=CAFFE)
    seen = []
    real_attach = run_mod.attach_transforms

    def spy(cfg, model, train_ds, val_ds):
        real_attach(cfg, model, train_ds, val_ds)
        seen.append(train_ds.transforms.transforms[-1].preprocessing)

    monkeypatch.setattr(run_mod, "attach_transforms", spy)
    train(_cfg(tmp_path, iters=2, val_every=2, init_from=str(tmp_path / "caffe_input.pt")))
    assert read_checkpoint(tmp_path / "run" / "last.pt")["preprocessing"] == CAFFE.to_dict()
    train(_cfg(tmp_path, iters=3, val_every=2, resume=True))
    assert read_checkpoint(tmp_path / "run" / "last.pt")["preprocessing"] == CAFFE.to_dict()
    assert seen[0] == CAFFE and seen[-1] == CAFFE


# ------------------------------------------------------------------------ the loss through train_step, by hand


class _RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradients it steps with (train_step clears them afterwards)."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _scored_model(num_classes=3):
    """A tiny FCN-32s with random weights at a He scale (the score layer included, which starts at zero) and zero
    biases: logits of order 0.5 that vary over the image, so every pixel's cross-entropy counts."""
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn32s", num_classes=num_classes, width=1 / 16, fc_dim=8, dropout=0.0)
    return randomise(model, trainable_only=True, bias_std=None)


def _void_micro_batches():
    """Two micro-batches of two 48 x 64 images whose masks have void (255) pixels in very different amounts: a
    band and a column in the first; a wholly void image and a mostly void one in the second."""
    g = torch.Generator().manual_seed(1)
    micro = []
    for k in range(2):
        images = torch.randn(2, 3, 48, 64, generator=g)
        masks = torch.randint(0, 3, (2, 48, 64), generator=g)
        masks[torch.rand(2, 48, 64, generator=g) < 0.1] = 255  # scattered void
        if k == 0:
            masks[0, :8] = 255
            masks[1, :, :2] = 255
        else:
            masks[0] = 255
            masks[1, 20:] = 255
        micro.append((images, masks))
    return micro


def _hand_loss(model, micro, reduction):
    """The step's loss in float64 on a copy of ``model``: -log softmax at the true class, summed over the valid
    pixels of every micro-batch, divided by the step's valid-pixel count for ``mean``; and its gradient."""
    ref = copy.deepcopy(model).double()
    params = [p for p in ref.parameters() if p.requires_grad]
    total, valid = torch.zeros((), dtype=torch.float64), 0
    for images, masks in micro:
        logp = torch.log_softmax(ref(images.double()), dim=1)
        keep = masks != 255
        picked = logp.gather(1, torch.where(keep, masks, 0)[:, None])[:, 0]
        total = total - picked[keep].sum()
        valid += int(keep.sum())
    loss = total if reduction == "sum" else total / valid
    return loss.item(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("preset", ["modern", "paper"])
def test_train_step_loss_and_gradient_equal_a_hand_computation_with_void_pixels(preset):
    # The modern preset averages over the valid pixels of the whole step (all micro-batches together), never over
    # void ones and never per micro-batch; the paper preset sums. Both the reported loss and the gradient.
    cfg = TrainConfig(preset=preset, batch_size=2, accum_steps=2, amp=False).resolved()
    assert cfg.loss_reduction == {"modern": "mean", "paper": "sum"}[preset]
    model, micro = _scored_model(), _void_micro_batches()
    valid = [int((m != 255).sum()) for _, m in micro]
    assert valid[0] != valid[1] and sum(valid) < sum(m.numel() for _, m in micro)
    expected, grads = _hand_loss(model, micro, cfg.loss_reduction)

    # The hand value is not what the wrong reductions would give: the data tells them apart.
    summed, _ = _hand_loss(model, micro, "sum")
    per_micro = [_hand_loss(model, [mb], "sum")[0] / v for mb, v in zip(micro, valid, strict=True)]
    if cfg.loss_reduction == "mean":
        assert expected == pytest.approx(summed / sum(valid))
        assert summed / sum(m.numel() for _, m in micro) < 0.8 * expected  # void pixels counted in the mean
        for wrong in (sum(per_micro) / 2, sum(per_micro)):  # mean per micro-batch, then averaged or summed
            assert wrong != pytest.approx(expected, rel=1e-3)

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = _RecordingSGD(params, lr=1.0, momentum=0.0, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_mod.train_step(model, micro, optimizer, scaler, cfg, torch.device("cpu"), contextlib.nullcontext)

    assert loss == pytest.approx(expected, rel=1e-5)
    assert len(optimizer.grads) == len(grads)
    for got, want in zip(optimizer.grads, grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12)
    score_grad = grads[[id(p) for p in params].index(id(model.head.score_fr.weight))]
    assert score_grad.abs().max() > 1e-3 * (1 if cfg.loss_reduction == "mean" else sum(valid))  # not a vacuous check
    # lr 1, no momentum, no decay: the step moved every weight by exactly minus its gradient.
    for p, b, g in zip(params, before, optimizer.grads, strict=True):
        torch.testing.assert_close(p.detach(), b - g)
