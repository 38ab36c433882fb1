"""Per-layer convolution kernels chosen by measurement: oneDNN, Winograd transforms (fcnseg's own and NNPACK's),
im2col + GEMM.

A direct 3x3 convolution spends 9 multiply-adds per output and channel pair. Winograd's minimal filtering (Lavin and
Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016) spends fewer: 36 per 16 outputs on 6 x 6
tiles, 64 per 36 on 8 x 8 tiles, and for fc6's 7x7 kernel 64 per 4 instead of 196. fcnseg's own transforms
(:mod:`.winograd`) run the channel sums as large matrix products, on the CPU's fastest GEMM; NNPACK's F(6x6, 3x3)
has AVX2 kernels of its own. The transforms cost memory traffic, so they pay where channels are many and maps small
(VGG's conv3 to conv5, fc6), not on conv1's wide maps. The 1x1 layers may run faster as one large matrix product
(unfold, then GEMM) than as a convolution. Which is fastest depends on the CPU, the thread count and the
layer's shape, so each :class:`MeasuredConv2d` times the kernels that apply to it the first time it sees an input
size class and keeps the fastest. The choice is cached per CPU and layer shape in ``conv-kernels.json``
(:func:`cache_path`), so only a new CPU or a new size class pays for the measurement.

Winograd's transforms round differently from a direct convolution: outputs differ by up to about 1e-5 of their range,
well within fp32-class accuracy. A kernel whose output strays more than :data:`TOLERANCE` of the range from
oneDNN's when it is measured is never chosen.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import cache_root
from .cpu import cpu_key
from .timing import median_ms
from .winograd import transform_filters, winograd_conv2d

KERNELS: tuple[str, ...] = ("onednn", "nnpack", "nnpack-backward", "winograd6", "winograd8", "gemm")
# nnpack-backward: NNPACK's forward, and its input gradient by NNPACK too (training only; see _NnpackConvolution).
# fcnseg's Winograd kernels by tile side: F(4x4, 3x3) on 6 x 6 tiles; F(6x6, 3x3), F(4x4, 5x5) and F(2x2, 7x7) (fc6)
# on 8 x 8 tiles, fewer multiplications but larger transforms.
_WINOGRAD_TILE = {"winograd6": 6, "winograd8": 8}
TOLERANCE = 1e-4  # of the output's range: a kernel further from oneDNN's output than this is not used
_TIMED_RUNS = 3


def kernels_pay(features: frozenset[str]) -> bool:
    """Whether the measured kernels are worth measuring on a CPU with ``features``: the Winograd and GEMM kernels
    pay with AVX2 and FMA (the ``winograd`` path's rule, and training's with ``--conv-kernels auto``)."""
    return {"avx2", "fma"} <= features


def kernels_key() -> str:
    """This CPU (:func:`~fcnseg.runtime.cpu.cpu_key`) and the kernels there are to choose from: a new kernel in a
    later fcnseg is measured, not passed over for an older choice."""
    return f"{cpu_key()} | kernels {'+'.join(KERNELS)}"


def cache_path() -> Path:
    """``conv-kernels.json`` in :func:`cache_root`."""
    return cache_root() / "conv-kernels.json"


class KernelChoices:
    """The measured choices, ``{layer key: kernel}``, of this CPU and kernel set (:func:`kernels_key`), read from
    and saved to the cache file ``path`` (default: :func:`cache_path`). A cache that cannot be read or written only
    costs measurements."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else cache_path()
        self.cpu = kernels_key()
        self.choices: dict[str, str] = self._read().get(self.cpu, {})

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self, key: str) -> str | None:
        kernel = self.choices.get(key)
        return kernel if kernel in KERNELS else None

    def set(self, key: str, kernel: str) -> None:
        """Remember ``kernel`` for ``key`` and save it, merged with what other processes saved meanwhile."""
        from ..io import atomic_write

        self.choices[key] = kernel
        doc = self._read()
        doc[self.cpu] = {**doc.get(self.cpu, {}), **self.choices}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.path, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)


def nnpack_ready() -> bool:
    """Whether this torch build has NNPACK and it initialised (it must be, once, before any call)."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


# Inference on a batch runs the layers with maps of more than this many pixels one image at a time. A batch of 8
# VGG16 maps at 375 x 500 (conv1 to conv4, 48 x 64 and up) leaves the CPU's caches: NNPACK and Winograd then took
# 1.1-1.5x as long per image as on single images, while conv5, fc6 and fc7 ran faster per image in the batch.
ONE_BY_ONE_AREA = 2048


def _one_by_one(x: torch.Tensor) -> bool:
    return len(x) > 1 and x.shape[-2] * x.shape[-1] > ONE_BY_ONE_AREA and not torch.is_grad_enabled()


class MeasuredConv2d(nn.Conv2d):
    """A :class:`~torch.nn.Conv2d` that runs each input shape on the fastest kernel of :data:`KERNELS` that
    applies, measured on first sight of the shape (:class:`KernelChoices`). Made from a Conv2d by
    :meth:`adopt`, which keeps its parameters and attributes."""

    choices: KernelChoices
    candidates: list[str]
    last: str | None  # the kernel of the latest call (for reports)
    winograd_filters: dict  # transformed filters kept per Winograd tile side (see _winograd_filters)

    @classmethod
    def adopt(cls, conv: nn.Conv2d, choices: KernelChoices) -> MeasuredConv2d:
        """``conv`` itself, turned into a MeasuredConv2d."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("MeasuredConv2d takes convolutions with numeric zero padding")
        conv.__class__ = cls
        conv.choices, conv.last, conv.winograd_filters = choices, None, {}
        conv.candidates = [k for k in KERNELS if conv._applies(k)]
        return conv

    def _applies(self, kernel: str) -> bool:
        plain = self.groups == 1
        unit = plain and self.stride == (1, 1) and self.dilation == (1, 1)
        if kernel.startswith("nnpack"):  # NNPACK: fp32, stride 1, no dilation or groups
            return unit and nnpack_ready()
        if kernel in _WINOGRAD_TILE:  # square, odd kernels the tile is larger than
            r = self.kernel_size[0]
            return unit and self.kernel_size[1] == r and r % 2 == 1 and 3 <= r < _WINOGRAD_TILE[kernel]
        return plain or kernel == "onednn"

    def key(self, x: torch.Tensor) -> str:
        """The layer's geometry and the input's batch and size class: the area rounded to a half power of two, so
        that a folder of photos of many sizes costs a few measurements, not one per size."""
        cout, cin, kh, kw = self.weight.shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        n, _, h, w = x.shape
        area = 2 ** (round(2 * math.log2(max(h * w, 1))) / 2)
        grad = "+grad" if torch.is_grad_enabled() else ""
        amp = f"+autocast {torch.get_autocast_dtype('cpu')}" if torch.is_autocast_enabled("cpu") else ""
        batch = f"{n} one by one" if _one_by_one(x) else n
        return (
            f"{cin}->{cout} k{kh}x{kw} s{sh}x{sw} p{ph}x{pw} d{dh}x{dw} in {batch}x~{area:.0f}px {x.dtype}{grad}{amp}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if x.device.type != "cpu" or (x.dtype != torch.float32 and not amp):
            return self.run("onednn", x)
        key = self.key(x)
        kernel = self.choices.get(key)
        if kernel not in self._candidates(amp):
            kernel = self.measure(x, key)
        self.last = kernel
        return self.run(kernel, x)

    def _candidates(self, amp: bool) -> list[str]:
        # Under CPU autocast oneDNN runs the layer in bf16; of the others only the GEMM, in fp32, can beat it: on
        # FCN-VGG16's fc6 (a 7x7 kernel over a 10 x 10 map) oneDNN's bf16 backward is several times the fp32 GEMM's.
        return [k for k in self.candidates if k in ("onednn", "gemm")] if amp else self.candidates

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if _one_by_one(x):
            return torch.cat([self._run(kernel, image) for image in x.split(1)])
        return self._run(kernel, x)

    def _run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if kernel == "onednn":  # in the input's layout: NHWC activations are oneDNN's fastest
            return _onednn(self, x)
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return _RUN[kernel](self, x.float().contiguous())
        return _RUN[kernel](self, x.contiguous())

    def _trial(self, kernel: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A call of ``kernel`` on ``x`` as the model makes it: with autograd on (training), forward and backward,
        whose costs differ between kernels more than the forward's (the GEMM's backward is two matrix products,
        oneDNN's its own kernels)."""
        if not torch.is_grad_enabled():
            return lambda k=kernel: self.run(k, x)
        leaf = x.detach().requires_grad_(x.requires_grad)
        wrt = [t for t in (leaf, self.weight, self.bias) if t is not None and t.requires_grad]

        def forward_backward(k: str = kernel) -> torch.Tensor:
            out = self.run(k, leaf)
            if wrt:  # gradients returned, not accumulated: the parameters' .grad stay as they are
                torch.autograd.grad(out, wrt, torch.ones_like(out))
            return out.detach()

        return forward_backward

    def measure(self, x: torch.Tensor, key: str) -> str:
        """Time every candidate on ``x`` (median of a few runs after one that checks it; forward and backward when
        training) and remember the fastest whose output is within :data:`TOLERANCE` of the range of an fp32 oneDNN
        convolution's. With autograd on, the Winograd kernels are not candidates; under autocast, the candidates
        are oneDNN's low-precision convolution and the fp32 GEMM."""
        amp = torch.is_autocast_enabled("cpu")
        # Winograd's backward runs through its transforms' autograd: a training step on it took twice oneDNN's.
        # nnpack-backward differs from nnpack in its backward only: measured in training alone.
        skipped = set(_WINOGRAD_TILE) if torch.is_grad_enabled() else {"nnpack-backward"}
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            reference = _onednn(self, x.float())
            scale = float(reference.max() - reference.min()) or 1.0
        times: dict[str, float] = {}
        for kernel in (k for k in self._candidates(amp) if k not in skipped):
            trial = self._trial(kernel, x)
            if kernel == "onednn":  # the reference's forward has just run; a backward or bf16 one has not
                if amp or torch.is_grad_enabled():
                    trial()
            else:
                if kernel in _WINOGRAD_TILE:  # transform the filters first: once per weight, not per call
                    with torch.no_grad():
                        _winograd_filters(self, _WINOGRAD_TILE[kernel])
                start = time.perf_counter()
                out = trial()
                first = 1000 * (time.perf_counter() - start)
                if float((out.float() - reference).abs().max()) > TOLERANCE * scale:
                    continue
                # A first run over 3x the best median so far cannot win: it is not timed further.
                if times and first > 3 * min(times.values()):
                    continue
            times[kernel] = median_ms(trial, runs=_TIMED_RUNS)
        best = min(times, key=times.__getitem__)
        self.choices.set(key, best)
        # Keep the chosen Winograd kernel's transformed filters only: fc6's for 8 x 8 tiles alone take 537 MB.
        kept = _WINOGRAD_TILE.get(best)
        self.winograd_filters = {tile: held for tile, held in self.winograd_filters.items() if tile == kept}
        return best


def _onednn(conv: MeasuredConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(
        x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
    )


def _nnpack(conv: MeasuredConv2d, x: torch.Tensor, own_backward: bool = False) -> torch.Tensor:
    (ph, pw), (kh, kw) = conv.padding, conv.weight.shape[2:]
    if ph >= kh or pw >= kw:  # NNPACK pads by less than the kernel only (the release's pad 100 on conv1_1)
        x, ph, pw = F.pad(x, (pw, pw, ph, ph)), 0, 0
    if own_backward:
        return _NnpackConvolution.apply(x, conv.weight, conv.bias, (ph, pw))
    return torch._nnpack_spatial_convolution(x, conv.weight, conv.bias, [ph, pw])


class _NnpackConvolution(torch.autograd.Function):
    """NNPACK's convolution (stride 1, padding below the kernel) with a backward of its own. The input's gradient is
    itself a convolution, of the output's gradient with the filters flipped and their in and out channels swapped,
    padded by the kernel less one less the padding: NNPACK runs that too. The weight's and bias's gradients come
    from PyTorch's convolution backward (oneDNN), asked for those alone. PyTorch's own backward of NNPACK's
    convolution takes all three from oneDNN: with the CPU held to AVX2, oneDNN's input gradient took 1.2-2x
    NNPACK's on VGG16's 3x3 layers at 320 x 320 (2 threads, Sapphire Rapids); with AVX-512 it was as fast or faster.
    Training measures both backwards (the ``nnpack`` and ``nnpack-backward`` kernels) per layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return torch._nnpack_spatial_convolution(x, weight, bias, list(padding))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[2:]
        grad, grad_x, grad_weight, grad_bias = grad.contiguous(), None, None, None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            grad_x = torch._nnpack_spatial_convolution(grad, flipped, None, [kh - 1 - ph, kw - 1 - pw])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            mask = [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes=bias_sizes, stride=[1, 1], padding=[ph, pw], dilation=[1, 1],
                transposed=False, output_padding=[0, 0], groups=1, output_mask=mask,
            )  # fmt: skip
        return grad_x, grad_weight, grad_bias, None


def _gemm(conv: MeasuredConv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution as one matrix product: (C_out x C_in*kh*kw) times the unfolded input's columns."""
    n, _, h, w = x.shape
    cout, _, kh, kw = conv.weight.shape
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        columns = x.reshape(n, -1, h * w)  # a 1x1 convolution needs no unfolding
    else:
        columns = F.unfold(x, (kh, kw), conv.dilation, conv.padding, conv.stride)
    out = _ColumnsProduct.apply(conv.weight.reshape(cout, -1), columns)
    if conv.bias is not None:
        out = out + conv.bias[:, None]
    return out.reshape(n, cout, oh, ow)


class _ColumnsProduct(torch.autograd.Function):
    """``weight`` (C_out x K) times ``columns`` (N x K x L). Autograd's own backward takes the columns' gradient as
    the transposed weight times the output's gradient; this one as (the gradient's transpose times the weight)'s
    transpose, the same values from a product of untransposed operands. On FCN-VGG16's fc6 at 10 x 10 (25088 x 4096
    by 4096 x 100) autograd's product ran 1.5x slower, and the layer's forward and backward took 290 ms against
    240 ms (2 threads, Sapphire Rapids)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, columns)
        return torch.matmul(weight, columns)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        weight, columns = ctx.saved_tensors
        grad_weight = grad_columns = None
        if ctx.needs_input_grad[0]:  # summed over the batch in one product: (C_out x NL) times (NL x K)
            n, cout, length = grad.shape
            rows = grad.transpose(0, 1).reshape(cout, n * length)
            grad_weight = rows @ columns.transpose(1, 2).reshape(n * length, -1)
        if ctx.needs_input_grad[1]:
            grad_columns = torch.matmul(grad.transpose(1, 2), weight).transpose(1, 2)
        return grad_weight, grad_columns


def _winograd_filters(conv: MeasuredConv2d, tile: int) -> torch.Tensor:
    """The layer's filters transformed for ``tile`` x ``tile`` tiles, F(m x m, r x r) with m = tile - r + 1:
    computed with autograd when training (so the gradient reaches the weight), else kept until the weight is replaced
    or changed in place. A weight made under inference mode has no version counter; it cannot be changed in place
    outside inference mode, so there the tensor itself identifies it."""
    w, m = conv.weight, tile - conv.kernel_size[0] + 1
    if torch.is_grad_enabled() and w.requires_grad:
        return transform_filters(w, m)
    version = None if w.is_inference() else w._version
    held = conv.winograd_filters.get(tile)  # (a weak reference to the weight, its version, the filters)
    if held is None or held[0]() is not w or held[1] != version:
        with torch.inference_mode(False), torch.no_grad():
            held = conv.winograd_filters[tile] = (weakref.ref(w), version, transform_filters(w.detach(), m))
    return held[2]


def _winograd(conv: MeasuredConv2d, x: torch.Tensor, tile: int) -> torch.Tensor:
    return winograd_conv2d(x, _winograd_filters(conv, tile), conv.bias, conv.padding, tile - conv.kernel_size[0] + 1)


_RUN: dict[str, Callable[[MeasuredConv2d, torch.Tensor], torch.Tensor]] = {
    "onednn": _onednn,
    "nnpack": _nnpack,
    "nnpack-backward": functools.partial(_nnpack, own_backward=True),
    "winograd6": functools.partial(_winograd, tile=6),
    "winograd8": functools.partial(_winograd, tile=8),
    "gemm": _gemm,
}


class PairMaxPool2d(nn.MaxPool2d):
    """2 x 2, stride-2 max pooling (VGG's) as two element-wise maxima of strided views: in NCHW layout 4-6x
    faster than ATen's pooling, which computes indices it then drops. Gives the same values as MaxPool2d, in
    ceil mode too (an odd last row or column is its own window); with autograd on it is MaxPool2d itself."""

    @classmethod
    def adopt(cls, pool: nn.MaxPool2d) -> nn.MaxPool2d:
        """``pool`` turned into a PairMaxPool2d where its geometry allows it, else ``pool`` as it is."""
        size, stride, padding, dilation = (
            _pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        )
        if (size, stride, padding, dilation) == ((2, 2), (2, 2), (0, 0), (1, 1)) and not pool.return_indices:
            pool.__class__ = cls
        return pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        h, w = x.shape[-2:]
        even_h, even_w = h - h % 2, w - w % 2
        rows = torch.maximum(x[..., 0:even_h:2, :], x[..., 1:even_h:2, :])
        if h % 2 and self.ceil_mode:
            rows = torch.cat([rows, x[..., even_h:, :]], -2)
        out = torch.maximum(rows[..., 0:even_w:2], rows[..., 1:even_w:2])
        if w % 2 and self.ceil_mode:
            out = torch.cat([out, rows[..., even_w:]], -1)
        return out


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def use_measured_kernels(model: nn.Module, choices: KernelChoices | None = None) -> nn.Module:
    """``model`` itself with its Conv2d layers turned into :class:`MeasuredConv2d` and its 2 x 2 max pooling into
    :class:`PairMaxPool2d`, parameters and their names unchanged (an optimiser built on them keeps working). The
    transposed-convolution upsamplers stay as they are; NNPACK takes NCHW, so keep the model in that layout."""
    choices = choices or KernelChoices()
    for child in list(model.modules()):
        if type(child) is nn.Conv2d and child.padding_mode == "zeros" and not isinstance(child.padding, str):
            MeasuredConv2d.adopt(child, choices)
        elif type(child) is nn.MaxPool2d:
            PairMaxPool2d.adopt(child)
    return model


def with_measured_kernels(model: nn.Module, choices: KernelChoices | None = None) -> nn.Module:
    """A copy of ``model`` in NCHW layout on measured kernels (:func:`use_measured_kernels`); ``model`` itself is
    left untouched."""
    return use_measured_kernels(copy.deepcopy(model).to(memory_format=torch.contiguous_format), choices)
