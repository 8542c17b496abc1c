"""Gradient-filtered 2-D convolution (Yang et al., CVPR 2023).

The forward pass is ``F.conv2d``. The backward pass replaces the output gradient
by its mean over ``r x r`` patches and computes the input and weight gradients on
the patch grid, where the convolution becomes small:

* input blocks of ``(r*s) x (r*s)`` pixels lie under each output patch (stride
  ``s``); the layer saves only their means, ``1/(r*s)^2`` of the input;
* the kernel on the patch grid is the spatially summed kernel (a 1x1 conv) when
  the dilation is smaller than a block, and the kernel itself at dilation
  ``round(d / (r*s))`` otherwise (ASPP);
* with patch gradient sums ``G`` and block means ``X``: ``dW = sum G * X`` (the
  same for every tap of the summed kernel), ``dx`` of a pixel is its block's
  share of ``W~^T G``, and the bias gradient is exact.

For stride 1 and full patches these are the paper's equations; for stride ``s``
the block means carry the ``1/s^2`` that keeps the gradient's scale true.

Sizes that ``r`` does not divide: patches and blocks tile from the top-left
corner and the last ones are partial (means over their valid pixels). Where a
conv without "same" padding gives the two grids different sizes, the input grid
is cropped or zero-padded at its bottom/right to match; input pixels cut off that
way get no gradient.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import cpu_kernels, triton_kernels

IntPair = Tuple[int, int]


def patch_grid_size(size: int, block: int) -> int:
    """Number of blocks of ``block`` pixels tiling ``size`` pixels."""
    return -(-size // block)


def _window(x: Tensor, block: IntPair) -> IntPair:
    """Pooling window: the block, or the whole dim where it is smaller."""
    return tuple(min(b, n) for b, n in zip(block, x.shape[-2:]))


def grid_dtype(dtype: torch.dtype) -> torch.dtype:
    """Grid computations of 16-bit tensors run in float32.

    Patch sums are ``r^2`` times larger than single gradients, so fp16 (with
    loss scaling) would overflow them long before the conv's own gradients.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _block_sums(x: Tensor, block: IntPair, dtype: torch.dtype,
                scale: float) -> Optional[Tensor]:
    """``scale`` times the sums over ``block`` tiles when they tile ``x``
    exactly, else None.

    Rows first: the inner loop then runs over whole contiguous rows, which is
    several times faster on CPU than ``avg_pool2d``'s window loop; the short
    runs of ``block[1]`` columns are then summed (and scaled) as a
    matrix-vector product, which CPU BLAS does about 3x faster than a
    reduction over a size-4 dim.
    """
    n, c, h, w = x.shape
    if h % block[0] or w % block[1] or not x.is_contiguous():
        return None
    rows = x.view(n, c, h // block[0], block[0], w).sum(3, dtype=dtype)
    sums = rows.view(-1, block[1]) @ rows.new_full((block[1], ), scale)
    return sums.view(n, c, h // block[0], w // block[1])


def fused_kernels(x: Tensor):
    """The fused kernels (Triton on CUDA, C++ on CPU) that can take ``x``, or
    None for the pure-PyTorch reference below."""
    for kernels in (triton_kernels, cpu_kernels):
        if kernels.available(x):
            return kernels
    return None


def _reduce_blocks(x: Tensor, block: IntPair, mean: bool,
                   dtype: torch.dtype) -> Tensor:
    """Sums (or means) of ``x`` over ``block`` tiles, partial last tiles
    included (means over their pixels), accumulated in :func:`grid_dtype`
    and returned in ``dtype``."""
    fused = fused_kernels(x)
    if fused is not None:
        return fused.block_reduce(x, block, mean=mean, dtype=dtype)
    acc = grid_dtype(x.dtype)
    scale = 1 / (block[0] * block[1]) if mean else 1.0
    out = _block_sums(x, block, acc, scale)
    if out is None:
        out = F.avg_pool2d(x.to(acc), _window(x, block), block,
                           ceil_mode=True,
                           divisor_override=None if mean else 1)
    return out.to(dtype)


def pool_blocks(x: Tensor, block: IntPair) -> Tensor:
    """Mean of ``x`` over ``block`` tiles; partial last tiles average their pixels.

    Accumulates in :func:`grid_dtype`, returns ``x``'s dtype.
    """
    return _reduce_blocks(x, block, mean=True, dtype=x.dtype)


def sum_patches(x: Tensor, patch: IntPair) -> Tensor:
    """Sum of ``x`` over ``patch`` tiles (partial last tiles included), in
    :func:`grid_dtype`."""
    return _reduce_blocks(x, patch, mean=False, dtype=grid_dtype(x.dtype))


def _fit(x: Tensor, size: IntPair) -> Tensor:
    """Crop or zero-pad the last two dims of ``x`` at the bottom/right to ``size``."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (0, dw, 0, dh))


@functools.lru_cache(maxsize=256)
def _spread_matrix(block: IntPair, width: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """``(Wb, width)`` matrix that widens a grid row to a pixel row (cached).

    Column ``w`` holds ``1 / (block[0] * count)`` in the row of its block,
    ``count`` being the block's pixels along the row; a partial last block
    row is rescaled by the caller.
    """
    cells = torch.arange(width, device=device) // block[1]
    counts = (width - cells * block[1]).clamp(max=block[1])
    matrix = torch.zeros(patch_grid_size(width, block[1]), width, dtype=dtype,
                         device=device)
    matrix[cells, torch.arange(width, device=device)] = 1 / (
        block[0] * counts.to(dtype))
    return matrix


def broadcast_blocks(grid: Tensor, block: IntPair, size: IntPair,
                     dtype: torch.dtype) -> Tensor:
    """Every pixel of ``size`` gets its grid cell divided by the cell's pixels.

    ``grid`` may have fewer cells than the blocks tiling ``size`` (pixels of
    the missing blocks get zero) or more (the extra cells are ignored). Grid
    rows are widened to pixel rows by one matrix product (the division
    included), then each is copied ``block[0]`` times as a whole row: no copy
    runs over ``block[1]``-element pieces. The result has ``dtype``.
    """
    grid = _fit(grid, tuple(patch_grid_size(n, b) for n, b in zip(size, block)))
    n, c, hg, wg = grid.shape
    height, width = size
    wide = grid.reshape(-1, wg) @ _spread_matrix(block, width, grid.dtype,
                                                 grid.device)
    wide = wide.view(n, c, hg, 1, width)
    full = height // block[0]
    out = grid.new_empty(n, c, height, width, dtype=dtype)
    out[:, :, :full * block[0]].view(n, c, full, block[0], width).copy_(
        wide[:, :, :full].expand(n, c, full, block[0], width))
    if full < hg:
        rest = height - full * block[0]
        out[:, :, full * block[0]:].copy_(
            wide[:, :, full] * (block[0] / rest))
    return out


def _batch_summed_products(g: Tensor, x: Tensor) -> Tensor:
    """``sum_n g[n] @ x[n]^T`` for ``(n, groups, rows, k)`` operands.

    On CPU the products accumulate in place, one per sample: no (n, ...)
    stack of partial products to write and add up. On a GPU, where each
    launch costs more than that stack, it is one batched product and a sum.
    """
    if g.device.type == 'cpu':
        x = x.transpose(2, 3)
        out = torch.bmm(g[0], x[0])
        for i in range(1, g.shape[0]):
            out.baddbmm_(g[i], x[i])
        return out
    return torch.matmul(g, x.transpose(2, 3)).sum(0)


class GridConv:
    """The convolution that the filtered backward computes on the patch grid."""

    def __init__(self, kernel_size: IntPair, stride: IntPair, padding: IntPair,
                 dilation: IntPair, radius: IntPair) -> None:
        self.block = (radius[0] * stride[0], radius[1] * stride[1])
        # dilation of the kernel on the grid; 0 means all taps fall in one block
        self.dilation = tuple(round(d / b) for d, b in zip(dilation, self.block))
        self.padding = tuple(
            round(p * m / d) if m else 0
            for p, m, d in zip(padding, self.dilation, dilation))
        self.kernel_size = tuple(
            k if m else 1 for k, m in zip(kernel_size, self.dilation))

    def kernel(self, weight: Tensor) -> Tensor:
        """The kernel on the grid: taps within one block are summed."""
        dims = [d for d, m in zip((2, 3), self.dilation) if not m]
        if weight.shape[2:] == (1, 1) or not dims:
            return weight
        if len(dims) == 2 and cpu_kernels.available(weight):
            return cpu_kernels.sum_taps(weight)
        return weight.sum(dims, keepdim=True)

    def input_size(self, out_size: IntPair) -> IntPair:
        """Grid input size whose stride-1 conv gives ``out_size``."""
        return tuple(
            o - 1 + max(m, 1) * (k - 1) - 2 * p + 1 for o, m, k, p in zip(
                out_size, self.dilation, self.kernel_size, self.padding))

    def backward(self, g: Tensor, x_grid: Tensor, weight: Tensor, groups: int,
                 need_x: bool, need_w: bool) -> Tuple[Tensor, Tensor]:
        """Input and weight gradients of the grid conv (None where not needed).

        The weight gradient has the full kernel's shape (taps summed on the
        grid share one value).
        """
        pointwise = self.kernel_size == (1, 1)
        # a pointwise grid conv's weight gradient does not read the kernel
        kernel = self.kernel(weight) if need_x or not pointwise else None
        if pointwise and weight.shape[:2] == (groups, 1):
            # depthwise: one channel per group, elementwise products
            gx = g * kernel.view(1, -1, 1, 1) if need_x else None
            gw = (g * x_grid).sum((0, 2, 3)).view(-1, 1, 1, 1) if need_w else None
        elif pointwise:
            # a 1x1 conv on the grid is a (grouped) matrix product
            n, c_out, hp, wp = g.shape
            g = g.reshape(n, groups, c_out // groups, hp * wp)
            gx = gw = None
            if need_x:
                w = kernel.reshape(groups, c_out // groups, -1)
                gx = torch.matmul(w.transpose(1, 2), g).reshape(n, -1, hp, wp)
            if need_w:
                x = x_grid.reshape(n, groups, -1, hp * wp)
                gw = _batch_summed_products(g, x).reshape(c_out, -1, 1, 1)
        else:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g, x_grid, kernel, None, (1, 1), self.padding,
                tuple(max(m, 1) for m in self.dilation), False, (0, 0), groups,
                (need_x, need_w, False))
        if gw is not None and gw.shape != weight.shape:
            gw = (cpu_kernels.repeat_taps(gw, weight.shape)
                  if cpu_kernels.available(gw) else
                  gw.expand_as(weight).contiguous())
        return gx, gw


@functools.lru_cache(maxsize=1024)
def grid_conv(kernel_size: IntPair, stride: IntPair, padding: IntPair,
              dilation: IntPair, radius: IntPair) -> GridConv:
    """The (cached) grid conv of a layer."""
    return GridConv(kernel_size, stride, padding, dilation, radius)


class GradFilterConv2dFunction(torch.autograd.Function):
    """``F.conv2d`` forward, gradient-filtered backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                stride: IntPair, padding: IntPair, dilation: IntPair, groups: int,
                radius: IntPair) -> Tensor:
        grid = grid_conv(tuple(weight.shape[2:]), stride, padding, dilation,
                         radius)
        # pooling first leaves the input in cache for the conv, which reads it;
        # the conv comes last, so no Python runs on caches it has filled
        pooled = pool_blocks(x, grid.block) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(pooled, weight)
        ctx.grid = grid
        ctx.groups = groups
        ctx.radius = radius
        ctx.in_size = tuple(x.shape[-2:])
        ctx.x_dtype = x.dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pooled, weight = ctx.saved_tensors
        grid: GridConv = ctx.grid
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = sum_patches(grad_out, ctx.radius)  # float32 for 16-bit grads
        grad_x = grad_w = grad_b = None
        if need_b:
            grad_b = g.sum((0, 2, 3)).to(grad_out.dtype)
        if need_x or need_w:
            fit_size = grid.input_size(tuple(g.shape[-2:]))
            if pooled is None:
                x_grid = g.new_empty(g.shape[0], weight.shape[1] * ctx.groups,
                                     *fit_size)
            else:
                x_grid = _fit(pooled.to(g.dtype), fit_size)
            gx, grad_w = grid.backward(g, x_grid, weight.to(g.dtype),
                                       ctx.groups, need_x, need_w)
            if grad_w is not None:
                grad_w = grad_w.to(weight.dtype)
            if need_x:
                fused = fused_kernels(gx)
                spread = broadcast_blocks if fused is None else (
                    fused.broadcast_blocks)
                grad_x = spread(gx, grid.block, ctx.in_size, ctx.x_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def grad_filter_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                       stride: IntPair = (1, 1), padding: IntPair = (0, 0),
                       dilation: IntPair = (1, 1), groups: int = 1,
                       radius: IntPair = (4, 4)) -> Tensor:
    """2-D convolution whose backward pass filters the output gradient.

    Args:
        x (Tensor): Input of shape ``(N, C_in, H, W)``.
        weight (Tensor): Kernel of shape ``(C_out, C_in / groups, kH, kW)``.
        bias (Tensor, optional): Bias of shape ``(C_out,)``. Defaults to None.
        stride, padding, dilation (int | tuple[int, int]): As ``F.conv2d``;
            padding must be numeric (zero padding).
        groups (int): As ``F.conv2d``. Defaults to 1.
        radius (int | tuple[int, int]): Patch size ``r`` of the
            output-gradient filter. Defaults to (4, 4).

    Returns:
        Tensor: Exactly ``F.conv2d(x, weight, bias, stride, padding, dilation,
        groups)``; under autocast, in the autocast dtype as ``F.conv2d``.
    """
    stride, padding, dilation, radius = map(_pair,
                                            (stride, padding, dilation, radius))
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # cast as autocast casts conv2d, so the backward sees one dtype
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return grad_filter_conv2d(x, weight, bias, stride, padding,
                                      dilation, groups, radius)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return GradFilterConv2dFunction.apply(x, weight, bias, stride, padding,
                                          dilation, groups, radius)
