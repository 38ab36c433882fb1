"""What a model costs: trainable parameters, and GFLOP and peak activation memory per image, the last two counted on
the meta device."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .upsampling import BilinearUpsample

__all__ = ["count_gflop", "meta_gflop", "meta_peak_bytes", "trainable_parameters"]


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


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors computed so far that are still referenced, after every operation, and keeps
    the largest count. A tensor is followed by its storage (views share it; an in-place result is its input's)
    through a weak reference, so it stops counting when the forward pass drops it, as PyTorch frees it."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.start = self.peak = start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                storage = t.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: held for key, held in self.live.items() if not held[0].expired()}
        self.peak = max(self.peak, self.start + sum(n for _, n in self.live.values()))
        return out


def meta_peak_bytes(model: nn.Module, height: int, width: int | None = None) -> int:
    """The most bytes of tensors that one eager forward pass of a ``height`` x ``width`` image holds at once: the
    input and the activations alive together at the pass's fullest moment (in VGG's nets, conv1_1's and conv1_2's
    outputs at full resolution), not the weights. Counted on the meta device, so nothing is allocated whatever the
    size: the weights are swapped for meta tensors (``functional_call``), except the frozen upsamplers', which read
    their own values."""
    frozen = {f"{name}.{key}" if name else key for name, m in model.named_modules() if isinstance(m, BilinearUpsample)
              for key, _ in m.named_parameters(recurse=False)}  # fmt: skip
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = {key: torch.empty_like(t, device="meta") for key, t in tensors if key not in frozen}
    x = torch.empty(1, model.in_channels, height, width or height, device="meta")
    counter = _LiveBytes(start=x.numel() * x.element_size())
    with torch.inference_mode(), counter:
        functional_call(model.eval(), meta, (x,))
    return counter.peak
