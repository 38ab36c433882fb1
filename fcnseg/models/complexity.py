"""What a model costs: trainable parameters and GFLOP per image, the latter counted on the meta device."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .upsampling import BilinearUpsample

__all__ = ["count_gflop", "meta_gflop", "trainable_parameters"]


def count_gflop(model: nn.Module, x: torch.Tensor) -> float:
    """GFLOP of one forward pass on ``x``, per image."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(x)
    return counter.get_total_flops() / 1e9 / x.shape[0]


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters that training updates (frozen upsamplers left out)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def meta_gflop(model: nn.Module, height: int, width: int | None = None) -> float:
    """GFLOP of one ``height`` x ``width`` image (default: square), counted on the meta device (shapes only: no
    memory, no arithmetic); ``model`` may live on the meta device.

    A frozen upsampler runs per class (``BilinearUpsample``), but whether its weight is diagonal cannot be read off
    a meta tensor: it is counted as the full C x C transposed convolution, and the C - 1 parts in C that the
    per-class run skips are taken off again."""
    extra: list[float] = []

    def dense_part(up: nn.Module, inputs: tuple[torch.Tensor, ...], _: object) -> None:
        _, c, h, w = inputs[0].shape  # FlopCounterMode counts 2 x N x H x W x k x k x C_in x C_out
        k = up.kernel_size[0] * up.kernel_size[1]
        extra.append(2 * h * w * k * c * (c - 1) / 1e9)  # per image

    upsamplers = [m for m in model.modules() if isinstance(m, BilinearUpsample)]
    frozen = [m.weight.requires_grad for m in upsamplers]
    hooks = [m.register_forward_hook(dense_part) for m in upsamplers]
    for m in upsamplers:
        m.weight.requires_grad_(True)  # the full transposed convolution, which meta tensors can run
    x = torch.empty(1, model.in_channels, height, width or height, device="meta")
    try:
        total = count_gflop(model, x)
    finally:
        for m, grad, hook in zip(upsamplers, frozen, hooks, strict=True):
            m.weight.requires_grad_(grad)
            hook.remove()
    return total - sum(extra)
