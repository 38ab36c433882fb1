"""Learnable-or-fixed upsampling by transposed convolution, initialised to bilinear interpolation."""

from __future__ import annotations

import torch
from torch import nn


def bilinear_kernel(size: int) -> torch.Tensor:
    """The 2-D bilinear interpolation kernel of side ``size`` (float64), as in the FCN release.

    factor = (k + 1) // 2; centre = factor - 1 for odd k, factor - 0.5 for even k;
    w(i, j) = (1 - |i - centre| / factor) * (1 - |j - centre| / factor).
    """
    if size < 1:
        raise ValueError(f"kernel size must be >= 1, got {size}")
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    r = torch.arange(size, dtype=torch.float64)
    w1 = 1 - (r - centre).abs() / factor
    return w1[:, None] * w1[None, :]


class BilinearUpsample(nn.ConvTranspose2d):
    """``channels`` -> ``channels`` transposed convolution, no bias, initialised to bilinear upsampling.

    The kernel sits on the channel diagonal (class c feeds class c only). The release freezes these layers
    ("no significant difference" from learning them), so the weight is fixed unless ``learnable=True``; the full
    C x C weight is kept so that learned upsamplers (torchfcn, Caffe) load unchanged.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int,
        padding: int = 0,
        learnable: bool = False,
    ) -> None:
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.reset_parameters()
        self.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            k = self.kernel_size[0]
            kernel = bilinear_kernel(k).to(self.weight.dtype)
            for c in range(self.in_channels):
                self.weight[c, c] = kernel

    @property
    def learnable(self) -> bool:
        return self.weight.requires_grad

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learnable={self.learnable}"
