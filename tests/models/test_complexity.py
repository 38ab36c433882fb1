"""Peak activation memory of a forward pass, counted on the meta device (fcnseg.models.complexity.meta_peak_bytes),
against closed forms: which tensors are alive together at the pass's fullest moment, counted by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fcnseg
from fcnseg.models import list_models
from fcnseg.models.complexity import meta_peak_bytes
from fcnseg.predict import MemoryCheck

F32 = 4  # bytes


class _Chain(nn.Sequential):
    in_channels = 3


class _Residual(nn.Module):
    """y = x + conv(x): the sum is computed while both its terms are alive."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_a_chain_holds_its_input_and_one_layer_s_input_and_output():
    # conv1's output is alive while conv2 writes its own (the in-place ReLU adds nothing); the input is the caller's.
    net = _Chain(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3, padding=1))
    assert meta_peak_bytes(net, 10, 20) == F32 * (3 + 8 + 4) * 10 * 20


def test_a_residual_sum_holds_both_terms_and_the_sum():
    # Counting one layer's input and output alone (2 x 3 channels) would miss the term the sum waits for.
    assert meta_peak_bytes(_Residual(), 16, 16) == F32 * (3 + 3 + 3) * 16 * 16


def test_a_freed_tensor_stops_counting():
    # conv1 -> conv2 -> conv3: when conv3 writes, conv1's output is gone (the input stays: the caller holds it).
    net = _Chain(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1), nn.Conv2d(2, 2, 1))
    assert meta_peak_bytes(net, 8, 8) == F32 * (3 + 16 + 2) * 8 * 8


def test_vgg_fcn_peaks_at_full_resolution_at_any_size_without_allocating():
    """FCN-8s (VGG16 at half width): the input, its padded copy, conv1_1's and conv1_2's outputs (32 channels
    each), at a size a real pass could not allocate here (40,000 x 40,000: 205 GB)."""
    model = fcnseg.get_model("fcn8s", num_classes=5, width=0.5, fc_dim=16)
    for side in (256, 40_000):
        rows, cols = model.padded_size(side, side)
        assert meta_peak_bytes(model, side) == F32 * (3 + 3 + 32 + 32) * rows * cols


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_is_counted(name):
    """Each model runs on the meta device, and its peak is at least the input and what the largest layer writes,
    and at most all its layers' outputs together; per padded pixel it stays under the bound below which
    ``predict``'s memory check does not count (fcnseg.predict.MemoryCheck.CEILING)."""
    model = fcnseg.get_model(name, **_small(name))
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in model.modules()
             if not list(m.children())]  # fmt: skip
    with torch.no_grad():
        model.eval()(torch.zeros(1, model.in_channels, 64, 64))
    for hook in hooks:
        hook.remove()
    sizes = [o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor)]
    peak = meta_peak_bytes(model, 64)
    assert F32 * model.in_channels * 64 * 64 + max(sizes) <= peak
    assert peak <= F32 * model.in_channels * 64 * 64 * 2 + sum(sizes)
    rows, cols = model.padded_size(256, 256)
    assert meta_peak_bytes(model, rows, cols) / (rows * cols) < MemoryCheck.CEILING / 4  # with room to spare


def _small(name: str) -> dict:
    if "twohead" in name:
        return {"heads": {"semantic": 4, "geometric": 3}}
    return {"num_classes": 4}
