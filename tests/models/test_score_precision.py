"""The class-score layers train in fp32 under CPU autocast: oneDNN's AMX bf16 weight gradient of a 1 x 1
convolution from 4096 channels to a few classes corrupts the heap, so a few-class net trained with --amp on such a
CPU would abort. Inference under autocast keeps bf16."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fcnseg.models.fcn import ScoreConv
from fcnseg.runtime import bf16_is_native
from tests.helpers import HANG_TIMEOUT


def _conv() -> ScoreConv:
    torch.manual_seed(0)
    conv = ScoreConv(64, 3, 1)
    torch.nn.init.normal_(conv.weight)
    return conv


def test_training_under_cpu_autocast_is_the_fp32_convolution():
    conv, x = _conv(), torch.randn(2, 64, 5, 5)
    with torch.autocast("cpu", torch.bfloat16):
        out = conv(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    expected = F.conv2d(x.to(torch.bfloat16).float(), conv.weight, conv.bias)  # the bf16 input, fp32 arithmetic
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_inference_under_cpu_autocast_stays_bf16():
    conv, x = _conv(), torch.randn(2, 64, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32  # no autocast: the plain layer


_STEP = """
import torch, torch.nn.functional as F
import fcnseg.models
from fcnseg.models.registry import get_model
torch.manual_seed(0)
net = get_model("fcn32s", num_classes=3, width=0.0625, fc_dim=4096)
for p in net.parameters():
    torch.nn.init.normal_(p, std=0.01)
x, y = torch.randn(2, 3, 96, 96), torch.randint(0, 3, (2, 96, 96))
for _ in range(3):
    with torch.autocast("cpu", torch.bfloat16):
        out = net(x)
    F.cross_entropy(out.float(), y).backward()
print("trained", float(net.score_heads.out.score_fr.weight.grad.abs().sum()) > 0)
"""


@pytest.mark.skipif(not bf16_is_native(), reason="this CPU's oneDNN does not compute bf16 natively")
def test_a_three_class_net_trains_in_bf16_without_aborting():
    # In a child process: the heap corruption aborts the interpreter, which must not take the suite with it.
    proc = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.split() == ["trained", "True"]
