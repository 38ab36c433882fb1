"""Learnable-or-fixed upsampling by transposed convolution, initialised to bilinear interpolation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    w1 = _tent(torch.arange(size, dtype=torch.float64), size)
    return w1[:, None] * w1[None, :]


def _tent(tap: torch.Tensor, size: int) -> torch.Tensor:
    """The 1-D bilinear weight of a kernel of side ``size`` at each position ``tap``; 0 outside the kernel."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    return (1 - (tap - centre).abs() / factor).clamp(min=0)


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
        self.as_matrices = False  # set while exporting (:func:`matrix_upsampling`)

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
                diagonal = _channel_diagonal(w.detach())
                self._depthwise = None if diagonal is None else diagonal.contiguous()
            self._depthwise_key = key
        return self._depthwise

    def cropped(self, x: torch.Tensor, start: int, h: int, w: int) -> torch.Tensor:
        """The ``h`` x ``w`` window at (``start``, ``start``) of this layer's output; with :attr:`as_matrices`, as
        two matrix products (:meth:`axis_matrix`) that compute only that window."""
        if not self.as_matrices:
            return self(x)[:, :, start : start + h, start : start + w]
        rows = self.axis_matrix(x.shape[2], h, start).to(x)
        cols = self.axis_matrix(x.shape[3], w, start).to(x)
        return rows @ (x @ cols.T)

    def axis_matrix(self, n: int, size: int, start: int) -> torch.Tensor:
        """The ``size`` x ``n`` matrix of this layer along one axis, its output cut to ``size`` pixels from
        ``start``: entry (r, i) is the 1-D bilinear weight that input cell i gives output pixel ``start + r``, 0
        beyond the kernel's reach. The 2-D kernel is the product of two such 1-D ones, so a frozen layer's
        output is ``rows @ x @ cols.T`` per class (:meth:`is_fixed_bilinear`)."""
        k, f, p = self.kernel_size[0], self.stride[0], self.padding[0]
        # Output pixel q takes input cell i through kernel tap q + padding - i * stride (the transposed convolution).
        tap = torch.arange(size).unsqueeze(1) + (start + p) - f * torch.arange(n).unsqueeze(0)
        return _tent(tap, k)

    def is_fixed_bilinear(self) -> bool:
        """Whether the weight is the frozen bilinear kernel on the channel diagonal (the release's upsampling) and
        the layer runs its stride and padding the same along both axes, to 1e-6 (Caffe's filler computes the
        kernel in float)."""
        if self.weight.requires_grad or self.stride[0] != self.stride[1] or self.padding[0] != self.padding[1]:
            return False
        diagonal = _channel_diagonal(self.weight.detach())
        kernel = bilinear_kernel(self.kernel_size[0]).to(self.weight)
        return diagonal is not None and bool(torch.allclose(diagonal, kernel.expand_as(diagonal), rtol=0, atol=1e-6))

    @property
    def learnable(self) -> bool:
        return self.weight.requires_grad

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learnable={self.learnable}"


def _channel_diagonal(w: torch.Tensor) -> torch.Tensor | None:
    """The C x 1 x k x k kernels on the channel diagonal of a C x C x k x k weight, None where any kernel off the
    diagonal has a nonzero entry (summed per pair of channels, in absolute value: exactly 0 only when all are)."""
    pairs = w.abs().flatten(2).sum(2)
    if pairs.fill_diagonal_(0).any():
        return None
    return torch.diagonal(w, 0, 0, 1).permute(2, 0, 1).unsqueeze(1)


@contextlib.contextmanager
def matrix_upsampling(model: nn.Module) -> Iterator[None]:
    """Within, the frozen bilinear layers of ``model`` upsample their cropped outputs as matrix products
    (:meth:`BilinearUpsample.cropped`), for export: the exported graph then holds no transposed convolution over
    every class pair, and writes only the pixels kept. In OpenVINO on a 2-core Sapphire Rapids CPU, the full-size
    FCN-8s's last upsampling and crop at 375 x 500 took 5 ms an image on one core against 20 (the transposed
    convolution, a change of layout and the crop), a fifth of its int8 forward pass."""
    layers = [m for m in model.modules() if isinstance(m, BilinearUpsample)]
    try:
        for m in layers:
            m.as_matrices = m.is_fixed_bilinear()
        yield
    finally:
        for m in layers:
            m.as_matrices = False
