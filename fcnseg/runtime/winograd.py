"""Winograd's minimal filtering for stride-1 convolutions, written as large matrix products.

F(m x m, r x r) computes an m x m block of a convolution's outputs with an r x r kernel from an n x n input tile,
n = m + r - 1, with n * n multiplications per input and output channel pair instead of m * m * r * r (Lavin and
Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): each tile d and filter g are transformed,
multiplied element by element and summed over the input channels, and the sum is transformed back:
Y = A^T [ sum_c (G g G^T) * (B^T d B) ] A. Summed over channels, the element-wise products are n * n ordinary
matrix products (C_out x C_in times C_in x tiles), so they run on the CPU's fastest GEMM, and both 2-D transforms are
one matrix each on the tile flattened row by row, vec(B^T d B) = (B^T kron B^T) vec(d).

The matrices are built here rather than typed in, by Toom-Cook interpolation at the points 0, +-1, +-2, +-1/2 and
infinity (the small, exactly representable points that keep fp32 rounding low): A^T and G hold the powers of the
points (G's rows divided by the Lagrange denominators), and B^T is the solution of the identity the algorithm must
satisfy, sum_j A^T[i, j] G[j, k] B^T[j, l] = [l = i + k]. With 6 x 6 tiles this gives the F(4 x 4, 3 x 3) matrices
of Lavin and Gray's section 4.2.

In fp32 the outputs stray from a direct convolution's by about 1e-5 of their range (more for larger tiles); the
measured kernels (:mod:`.kernels`) check every layer against oneDNN before they use it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)  # the finite points, in the order they are taken


@functools.cache
def toom_cook(m: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A^T, G, B^T)`` of F(m, r) in float64: m x n, n x r and n x n, n = m + r - 1 (at most 8)."""
    n = m + r - 1
    if not 2 <= n <= len(_POINTS) + 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} finite points; this table has {len(_POINTS)}")
    # Kept for the process: made as ordinary tensors even when the first call is under inference mode, since training
    # that follows saves them for backward, which an inference tensor cannot be.
    with torch.inference_mode(False):
        return _interpolate(m, r)


def _interpolate(m: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = m + r - 1
    points = torch.tensor(_POINTS[: n - 1], dtype=torch.float64)
    a_t, g = torch.zeros(m, n, dtype=torch.float64), torch.zeros(n, r, dtype=torch.float64)
    for j, a in enumerate(points):
        denominator = torch.prod(a - torch.cat([points[:j], points[j + 1 :]]))
        a_t[:, j] = a ** torch.arange(m)
        g[j] = a ** torch.arange(r) / denominator
    a_t[m - 1, n - 1] = g[n - 1, r - 1] = 1.0  # the point at infinity: the products' leading coefficients
    products = torch.einsum("ij,jk->ikj", a_t, g).reshape(m * r, n)
    target = torch.zeros(m * r, n, dtype=torch.float64)
    for i in range(m):
        target[i * r + torch.arange(r), i + torch.arange(r)] = 1.0
    b_t = torch.linalg.lstsq(products, target).solution  # exact: m * r equations, n unknowns per column, rank n
    return a_t, g, b_t


@functools.cache
def _tile_transforms(m: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output transforms on flattened tiles, fp32: (n*n x n*n, m*m x n*n)."""
    a_t, _, b_t = toom_cook(m, r)
    with torch.inference_mode(False):  # ordinary tensors, as toom_cook's
        return torch.kron(b_t, b_t).float(), torch.kron(a_t, a_t).float()


def transform_filters(weight: torch.Tensor, m: int) -> torch.Tensor:
    """G g G^T of every r x r filter of ``weight`` (C_out x C_in x r x r), as n*n matrices of C_out x C_in, in the
    weight's dtype; differentiable."""
    cout, cin, r, _ = weight.shape
    g = toom_cook(m, r)[1].to(weight.dtype)
    n = m + r - 1
    return torch.einsum("ai,kcij,bj->abkc", g, weight, g).reshape(n * n, cout, cin).contiguous()


# Images are laid side by side in the GEMMs' columns (one C_out x C_in by C_in x (images * tiles) product per tile
# element), up to about this many columns: small late maps (conv5, fc6: tens of tiles per image) then fill the
# GEMM's width, while the large early maps go one image at a time, so that their transformed tiles stay in cache.
# With the filters broadcast over the batch instead, a batch of 8 copied fc6's 537 MB of filters 8 times.
COLUMNS = 512


def winograd_conv2d(
    x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int], m: int
) -> torch.Tensor:
    """The stride-1 convolution of ``x`` (N x C_in x H x W, fp32) by the filters :func:`transform_filters` made for
    F(m x m, r x r), zero padding ``(ph, pw)``; the same result as :func:`torch.nn.functional.conv2d` up to
    rounding."""
    th, tw = _output_and_tiles(x, filters, padding, m)[2:]
    per_chunk = max(1, COLUMNS // (th * tw))
    if len(x) <= per_chunk:
        return _winograd_images(x, filters, bias, padding, m)
    return torch.cat([_winograd_images(c, filters, bias, padding, m) for c in x.split(per_chunk)])


def _output_and_tiles(
    x: torch.Tensor, filters: torch.Tensor, padding: tuple[int, int], m: int
) -> tuple[int, int, int, int]:
    """The output's height and width, and the m x m tiles down and across that cover it (the last ones reach past
    the map into zeros)."""
    r = round(filters.shape[0] ** 0.5) - m + 1
    oh, ow = x.shape[-2] + 2 * padding[0] - r + 1, x.shape[-1] + 2 * padding[1] - r + 1
    return oh, ow, -(-oh // m), -(-ow // m)


def _winograd_images(
    x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int], m: int
) -> torch.Tensor:
    n, cin, h, w = x.shape
    tile_area, cout = filters.shape[:2]
    size = round(tile_area**0.5)
    r = size - m + 1
    (ph, pw), (to_tiles, from_tiles) = padding, _tile_transforms(m, r)
    oh, ow, th, tw = _output_and_tiles(x, filters, padding, m)
    x = F.pad(x, (pw, m * tw + r - 1 - w - pw, ph, m * th + r - 1 - h - ph))
    tiles = x.unfold(2, size, m).unfold(3, size, m)  # N x C x th x tw x n x n, overlapping by r - 1: a view
    d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(tile_area, -1)  # the one gather: n*n x (C N th tw)
    v = torch.mm(to_tiles, d).view(tile_area, cin, n * th * tw)
    products = torch.bmm(filters, v)  # n*n x C_out x (N tiles): the channel sums as GEMMs
    y = torch.mm(from_tiles, products.view(tile_area, -1)).view(m, m, cout, n, th, tw).permute(3, 2, 4, 0, 5, 1)
    # Laying the m x m blocks out as the map and adding the bias is one pass.
    y = y + bias.view(1, cout, 1, 1, 1, 1) if bias is not None else y.contiguous()
    return y.reshape(n, cout, m * th, m * tw)[:, :, :oh, :ow]
