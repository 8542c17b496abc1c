"""Gradient-filtered 2-D convolution (Yang et al., CVPR 2023).

The forward pass is ``F.conv2d``. The backward pass replaces the output gradient
by its mean over ``r x r`` patches and computes the input and weight gradients on
the patch grid, where the convolution becomes small:

* input blocks of ``(r*s) x (r*s)`` pixels lie under each output patch (stride
  ``s``); the layer saves only their means, ``1/(r*s)^2`` of the input;
* the kernel on the patch grid is, per axis, summed over its taps when the
  dilation is smaller than a block (both axes: a 1x1 conv), and the kernel
  itself at dilation ``round(d / (r*s))`` otherwise (ASPP);
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

Convs that read the same input with the same block shape (the ASPP branches)
share one pooled tensor, saved once (:mod:`.shared_pool`).

The memory-bound steps (block sums, the broadcast back to pixels, the tap sums)
go through :func:`.backend.select`: fused kernels where they take the tensor,
the pure-PyTorch :mod:`.reference` elsewhere.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from .backend import select
from .reference import fit, grid_dtype, patch_grid_size
from .shared_pool import shared_pool
from .types import IntPair

__all__ = [
    'GradFilterConv2dFunction', 'GridConv', 'grad_filter_conv2d', 'grid_conv',
    'grid_dtype', 'patch_grid_size', 'pool_blocks', 'sum_patches'
]


def pool_blocks(x: Tensor, block: IntPair) -> Tensor:
    """Mean of ``x`` over ``block`` tiles; partial last tiles average their pixels.

    Accumulates in :func:`grid_dtype`, returns ``x``'s dtype.
    """
    return select(x).block_reduce(x, block, mean=True, dtype=x.dtype)


def sum_patches(x: Tensor, patch: IntPair) -> Tensor:
    """Sum of ``x`` over ``patch`` tiles (partial last tiles included), in
    :func:`grid_dtype`."""
    return select(x).block_reduce(x, patch, mean=False,
                                  dtype=grid_dtype(x.dtype))


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
        return select(weight).sum_taps(weight, dims)

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
            gw = select(gw).repeat_taps(gw, weight.shape)
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
        # convs reading the same x with the same block keep one pooled tensor
        pooled = (shared_pool(x, grid.block, pool_blocks)
                  if ctx.needs_input_grad[1] else None)
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
                x_grid = fit(pooled.to(g.dtype), fit_size)
            gx, grad_w = grid.backward(g, x_grid, weight.to(g.dtype),
                                       ctx.groups, need_x, need_w)
            if grad_w is not None:
                grad_w = grad_w.to(weight.dtype)
            if need_x:
                grad_x = select(gx).broadcast_blocks(gx, grid.block,
                                                     ctx.in_size, ctx.x_dtype)
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
        groups)``; under autocast, in the autocast dtype as ``F.conv2d``. An
        empty input or kernel takes ``F.conv2d``'s backward (zero gradients).
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
    # an empty batch (or kernel) has no patches: its gradients, filtered or
    # exact, are empty or zero, which F.conv2d's autograd gives
    if not needs_grad or x.numel() == 0 or weight.numel() == 0:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return GradFilterConv2dFunction.apply(x, weight, bias, stride, padding,
                                          dilation, groups, radius)
