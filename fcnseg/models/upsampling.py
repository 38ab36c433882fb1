"""Learnable-or-fixed upsampling by transposed convolution, initialised to bilinear interpolation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        self._depthwise: torch.Tensor | None = None
        self._depthwise_key: tuple | None = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            k = self.kernel_size[0]
            kernel = bilinear_kernel(k).to(self.weight.dtype)
            for c in range(self.in_channels):
                self.weight[c, c] = kernel

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        # A frozen kernel that sits on the channel diagonal (always, unless learned weights were loaded) is applied
        # per channel: C times less work than the full C x C transposed convolution, same numbers.
        # Tracing, export and compilation see the plain transposed convolution: the check below looks at the
        # weight's values, which a traced graph cannot depend on.
        tracing = (
            torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export()
        )
        fast = not (self.weight.requires_grad or output_size is not None or tracing)
        w = self._diagonal_kernel() if fast else None
        if w is None:
            return super().forward(x, output_size)
        return F.conv_transpose2d(x, w.to(x.dtype), None, self.stride, self.padding, groups=self.in_channels)

    def _diagonal_kernel(self) -> torch.Tensor | None:
        """The C x 1 x k x k per-channel kernel if the weight is diagonal, else None; recomputed only after the
        weight changed (load_state_dict, .to(), in-place edits all change its version, storage or dtype)."""
        w = self.weight
        # A weight made under inference mode (a copy of the model taken while predicting) has no version counter;
        # it cannot be changed in place outside inference mode, so its storage identifies it.
        key = (None if w.is_inference() else w._version, w.data_ptr(), w.dtype, w.device)
        if key != self._depthwise_key:
            # Made as an ordinary tensor even when the first call runs under inference mode (prediction): training
            # that follows saves the kernel for backward, which an inference tensor cannot be.
            with torch.inference_mode(False), torch.no_grad():
                diag = torch.diagonal(w.detach(), 0, 0, 1)  # k x k x C
                off_diagonal = w.detach().abs().sum() - diag.abs().sum()
                self._depthwise = diag.permute(2, 0, 1).unsqueeze(1).contiguous() if off_diagonal == 0 else None
            self._depthwise_key = key
        return self._depthwise

    @property
    def learnable(self) -> bool:
        return self.weight.requires_grad

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learnable={self.learnable}"
