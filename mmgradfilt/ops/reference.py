"""The pure-PyTorch backend: every step of :class:`.backend.Backend` for any
tensor, on any device and dtype.

The fused backends (:mod:`.cpu_kernels`, :mod:`.triton_kernels`) give the same
results where they take a tensor; the tests hold them to this one.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import IntPair


def available(x: Tensor) -> bool:
    """Always True: the reference takes every tensor."""
    return True


def patch_grid_size(size: int, block: int) -> int:
    """Number of blocks of ``block`` pixels tiling ``size`` pixels."""
    return -(-size // block)


def grid_dtype(dtype: torch.dtype) -> torch.dtype:
    """Grid computations of 16-bit tensors run in float32.

    Patch sums are ``r^2`` times larger than single gradients, so fp16 (with
    loss scaling) would overflow them long before the conv's own gradients.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fit(x: Tensor, size: IntPair) -> Tensor:
    """Crop or zero-pad the last two dims of ``x`` at the bottom/right to ``size``."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (0, dw, 0, dh))


def _window(x: Tensor, block: IntPair) -> IntPair:
    """Pooling window: the block, or the whole dim where it is smaller."""
    return tuple(min(b, n) for b, n in zip(block, x.shape[-2:]))


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


def block_reduce(x: Tensor, block: IntPair, mean: bool,
                 dtype: torch.dtype) -> Tensor:
    """Sums (or means) of ``x`` over ``block`` tiles, partial last tiles
    included (means over their pixels), accumulated in :func:`grid_dtype`
    and returned in ``dtype``."""
    acc = grid_dtype(x.dtype)
    scale = 1 / (block[0] * block[1]) if mean else 1.0
    out = _block_sums(x, block, acc, scale)
    if out is None:
        out = F.avg_pool2d(x.to(acc), _window(x, block), block,
                           ceil_mode=True,
                           divisor_override=None if mean else 1)
    return out.to(dtype)


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
    grid = fit(grid, tuple(patch_grid_size(n, b) for n, b in zip(size, block)))
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


def sum_taps(weight: Tensor, dims: Sequence[int]) -> Tensor:
    """``weight`` summed over its spatial ``dims`` (a subset of ``(2, 3)``),
    keeping them as size 1."""
    return weight.sum(tuple(dims), keepdim=True)


def repeat_taps(grad: Tensor, shape: torch.Size) -> Tensor:
    """``grad``, whose spatial dims are 1 or ``shape``'s, copied to every tap
    of ``shape`` (a contiguous broadcast)."""
    return grad.expand(shape).contiguous()
