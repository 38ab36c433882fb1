"""bf16 autocast training on CPUs that compute bf16 natively: when ``amp`` gives it, that the step is the hand
autocast step (forward in bf16, loss and weights in fp32), that a CPU without native bf16 trains in fp32 bit for bit
as with amp off, and that a bf16 run resumes exactly.

The suite pins ``FCNSEG_CPU_FEATURES`` to a CPU without bf16 (tests/conftest.py); these tests set it to the feature
set they are about. Those that really compute in bf16 need a CPU whose oneDNN does (AVX-512 BF16 or AMX) and are
skipped elsewhere.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

import fcnseg
from fcnseg.checkpoint import read_checkpoint
from fcnseg.engine import run as run_mod
from fcnseg.engine import train as train_mod
from fcnseg.engine.config import TrainConfig
from fcnseg.engine.train import train
from fcnseg.models.fcn import ScoreConv
from fcnseg.runtime import bf16_is_native
from tests.engine.conftest import TINY_TRAIN
from tests.helpers import randomise

CPU = torch.device("cpu")
BF16_CPU = "avx2 fma avx512f avx512_bf16 amx_bf16"  # the flags that matter of a Sapphire Rapids
NO_BF16_CPU = "avx2 fma avx512f"  # AVX-512 without its bf16 extension (Skylake-SP)
needs_native_bf16 = pytest.mark.skipif(not bf16_is_native(), reason="this CPU's oneDNN does not compute bf16 natively")


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_TRAIN, "out": str(tmp_path / name), **kw})


def _saved_precision(run) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["precision"]


# ------------------------------------------------------------------------------------------- what amp gives on CPU


@pytest.mark.parametrize(
    ("amp", "features", "onednn_bf16", "conv_kernels", "expected", "why"),
    [
        (True, BF16_CPU, True, "auto", "bf16", "natively: amx_bf16, avx512_bf16"),
        (True, "avx512_bf16", True, "onednn", "bf16", "natively: avx512_bf16"),
        (True, NO_BF16_CPU, True, "auto", "fp32", "no native bf16"),  # the flags decide, as FCNSEG_CPU_FEATURES says
        (True, BF16_CPU, False, "auto", "fp32", "oneDNN does not"),  # and so does oneDNN
        (True, BF16_CPU, True, "measured", "bf16", "natively: amx_bf16"),  # bf16 and fp32 GEMM, measured
        (False, BF16_CPU, True, "auto", "fp32", "amp off"),
    ],
)
def test_amp_on_the_cpu_is_bf16_only_where_it_is_native(
    monkeypatch, amp, features, onednn_bf16, conv_kernels, expected, why
):
    # Wrong code caught: bf16 from the flags alone or from oneDNN alone; emulated bf16 on a CPU without it; the
    # override ignored; a loss scaler for bf16.
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", features)
    monkeypatch.setattr(run_mod, "bf16_is_native", lambda: onednn_bf16)
    cfg = TrainConfig(amp=amp, conv_kernels=conv_kernels, deterministic=False).resolved()
    precision = run_mod.training_precision(cfg, CPU)
    assert precision.name == expected and why in precision.reason, precision
    autocast, scaler = run_mod.amp_context(cfg, CPU)
    assert not scaler.is_enabled()  # bf16 keeps fp32's exponent: nothing to scale
    with autocast():
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
        assert expected != "bf16" or torch.get_autocast_dtype("cpu") == torch.bfloat16
    # bf16 and fp32 alike take the measured kernels where --runtime auto's rule (AVX2 + FMA) or the flag says so.
    assert run_mod.measured_kernels_wanted(cfg, CPU) == ("avx2" in features or conv_kernels == "measured")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("amp", [True, False])
def test_a_bf16_run_computes_in_nhwc_and_an_fp32_one_in_nchw(tmp_path, monkeypatch, amp):
    # Wrong code caught: NHWC activations lost for bf16 (oneDNN's bf16 step is 1.15-1.4x slower on NCHW ones), or
    # given to fp32 (slower in NHWC); parameters in channels_last, which the fused optimiser steps through copies.
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", BF16_CPU)
    monkeypatch.setattr(run_mod, "bf16_is_native", lambda: True)
    seen = []

    def first_step(model, *args, **kwargs):
        seen.append(model)
        raise _Stop

    monkeypatch.setattr(train_mod, "train_step", first_step)
    with pytest.raises(_Stop):
        train(_cfg(tmp_path, amp=amp))
    convs = [m for m in seen[0].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous() for c in convs)  # 1x1 kernels are both layouts at once
    layouts = []
    hook = convs[1].register_forward_pre_hook(lambda m, a: layouts.append(a[0].is_contiguous()))
    with torch.no_grad():
        seen[0].eval()(torch.randn(1, 3, 40, 48))  # an NCHW batch, as the loader gives
    hook.remove()
    assert layouts == [not amp]


# ------------------------------------------------------------------------------------------------------ the step


class _RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it steps with (train_step clears them afterwards)."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _model_and_batch():
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn32s", num_classes=3, width=1 / 16, fc_dim=8, dropout=0.0)
    model = randomise(model, trainable_only=True, bias_std=None)  # the score layer too: every layer gets a gradient
    g = torch.Generator().manual_seed(1)
    images, masks = torch.randn(2, 3, 48, 64, generator=g), torch.randint(0, 3, (2, 48, 64), generator=g)
    masks[:, :6] = 255
    return model.train(), [(images, masks)]


def _step(model, micro, cfg, autocast):
    """train_step's loss, the gradients it stepped with, and the dtypes of every convolution's output (the
    class-score layers', which train in fp32 under CPU autocast, under the key "score")."""
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.add(("score", o.dtype) if isinstance(m, ScoreConv)
                                                                else o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _RecordingSGD(params, lr=0.1, momentum=0.9)
    _, scaler = run_mod.amp_context(cfg, CPU)
    loss = train_mod.train_step(model, micro, optimizer, scaler, cfg, CPU, autocast)
    for h in hooks:
        h.remove()
    return loss, optimizer.grads, dtypes, optimizer


@needs_native_bf16
def test_a_bf16_step_is_the_hand_autocast_step_with_fp32_weights(monkeypatch):
    # Wrong code caught: no autocast on the CPU (conv outputs fp32, loss equal to fp32's); autocast in fp16; the
    # model cast to bf16 (weights or momentum not fp32); the loss computed in bf16 (not the hand value); a gradient
    # scale left on the gradients; bf16 gradients that are far from fp32's (a wrong cast in the backward).
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", BF16_CPU)
    cfg = TrainConfig(batch_size=2).resolved()  # the modern preset: amp on, loss averaged over valid pixels
    model, micro = _model_and_batch()
    fp32_model, hand = copy.deepcopy(model), copy.deepcopy(model)
    autocast, _ = run_mod.amp_context(cfg, CPU)

    loss, grads, dtypes, optimizer = _step(model, micro, cfg, autocast)
    # Every convolution of the forward ran in bf16 but the class-score layers (fp32: see ScoreConv).
    assert dtypes == {torch.bfloat16, ("score", torch.float32)}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in optimizer.state.values())

    # The hand step: torch.autocast around the forward, fp32 cross-entropy averaged over the valid pixels.
    (images, masks) = micro[0]
    valid = float((masks != 255).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hand(images)
    want = F.cross_entropy(logits.float(), masks, ignore_index=255, reduction="sum")
    (want * (1.0 / valid)).backward()
    assert loss == (want / valid).item()
    hand_grads = [p.grad for p in hand.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(grads, hand_grads, strict=True))

    # Near fp32, not equal to it. The score layer, one bf16 forward away from the loss, is within a few bf16
    # roundings (8 significant bits: 0.4% each); the gradients further back cross up to 15 bf16 convolutions and the
    # ReLU and max-pooling decisions that bf16 rounding flips on near-ties (about 25% in norm on this random tiny
    # net, all of it in the hand autocast step too), so they are held to pointing the way fp32's do.
    loss32, grads32, dtypes32, _ = _step(fp32_model, micro, cfg, contextlib.nullcontext)
    assert dtypes32 == {torch.float32, ("score", torch.float32)}
    assert loss != loss32 and abs(loss - loss32) < 1e-2 * loss32
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, got, ref in zip(names, grads, grads32, strict=True):
        error = float((got - ref).norm() / ref.norm())
        assert error <= (0.03 if "score_fr" in name else 0.5), (name, error)
        assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9, name
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(grads, grads32, strict=True)) > 1e-3


# ------------------------------------------------------------------------------------------------------- the runs


def test_amp_on_a_cpu_without_native_bf16_trains_bit_for_bit_as_amp_off(tmp_path, monkeypatch, capsys):
    # Wrong code caught: emulated bf16 on a CPU without it, or amp changing anything else there (a loss scaler, the
    # kernels); the run not saying, on its line and in its config.yaml, which precision it trained in and why.
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", NO_BF16_CPU)
    train(_cfg(tmp_path, "off", iters=2, val_every=2, amp=False))
    train(_cfg(tmp_path, "on", iters=2, val_every=2, amp=True, progress=True))
    err = capsys.readouterr().err
    assert "fcnseg: training in fp32 (amp on, but this CPU has no native bf16 (AVX-512 BF16 or AMX)" in err
    a, b = (read_checkpoint(tmp_path / name / "last.pt") for name in ("off", "on"))
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    assert _saved_precision(tmp_path / "on") == _saved_precision(tmp_path / "off") == "fp32"
    assert b["extra"]["train_state"]["precision"] == "fp32"


@needs_native_bf16
def test_a_resumed_bf16_run_ends_bit_for_bit_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    # Wrong code caught: a resumed run that forgets bf16 (or takes other kernels) and drifts from the uninterrupted
    # one; bf16 weights or momentum in a checkpoint; the precision not recorded with the run.
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", BF16_CPU)
    common = dict(model="fcn16s", iters=3, val_every=2, flip=True, crop_size=40, optimizer="sgd")
    train(_cfg(tmp_path, "straight", **common))
    real_step, calls = train_mod.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint at 2
            raise _Stop
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", dying_step)
    with pytest.raises(_Stop):
        train(_cfg(tmp_path, "interrupted", **common))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    train(_cfg(tmp_path, "interrupted", resume=True, **common))

    a, b = (read_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "interrupted"))
    assert a["extra"]["train_state"]["iteration"] == b["extra"]["train_state"]["iteration"] == 3
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
        assert v.dtype == torch.float32 or not v.is_floating_point(), k
    opt_a, opt_b = a["extra"]["train_state"]["optimizer"]["state"], b["extra"]["train_state"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)
    assert a["extra"]["train_state"]["precision"] == b["extra"]["train_state"]["precision"] == "bf16"
    assert _saved_precision(tmp_path / "interrupted") == "bf16"


@needs_native_bf16
def test_resuming_in_another_precision_says_so(tmp_path, monkeypatch, capsys):
    # Wrong code caught: a precision change on resume (another machine, --no-amp) passing silently; the saved
    # precision not following the run.
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", BF16_CPU)
    train(_cfg(tmp_path, iters=1, val_every=1))
    capsys.readouterr()
    train(_cfg(tmp_path, iters=2, val_every=1, amp=False, resume=True))
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert f"fcnseg: warning: {run} was trained in bf16 up to iteration 1; it continues in fp32 (amp off)" in err
    assert read_checkpoint(run / "last.pt")["extra"]["train_state"]["precision"] == "fp32"
    assert _saved_precision(run) == "fp32"
