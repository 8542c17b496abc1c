"""Triton fast paths for the filtered conv's memory-bound steps on CUDA.

Two kernels, each one pass over the full-size tensor: block sums/means
(pooling the input in forward, the output gradient in backward) and the
broadcast of the grid input-gradient back to pixels (with the division by
each block's pixel count). Each program handles ``BLOCK`` consecutive
elements of the flattened output, so small feature maps keep every lane busy;
sizes are compile-time constants (one compilation per layer shape), which
turns the index arithmetic into multiplications and shifts.
Blocks may be rectangular (radius or stride pairs): the two sides are
separate constants. The grid matrix products stay in cuBLAS/cuDNN, and so do
the sums over a kernel's taps (:func:`sum_taps`, :func:`repeat_taps`, the
reference's: a kernel is small). :func:`available` says whether a tensor can
take these paths; everything else uses :mod:`.reference`. Together they are a
:class:`.backend.Backend`.
"""
import os
from typing import Tuple

import torch
from torch import Tensor

from .reference import repeat_taps, sum_taps

__all__ = [
    'ENABLED', 'available', 'block_reduce', 'broadcast_blocks', 'repeat_taps',
    'sum_taps'
]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

ENABLED = triton is not None and os.environ.get('MMGRADFILT_TRITON', '1') != '0'
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


def available(x: Tensor) -> bool:
    """Whether ``x`` can use the Triton kernels (fp64 stays on the reference)."""
    return (ENABLED and x.is_cuda and x.dtype in _DTYPES and x.dim() == 4
            and x.is_contiguous())


if triton is not None:

    @triton.jit
    def _block_reduce_kernel(x_ptr, out_ptr, total, H: tl.constexpr,
                             W: tl.constexpr, HB: tl.constexpr,
                             WB: tl.constexpr, B0: tl.constexpr,
                             B1: tl.constexpr, B1P: tl.constexpr,
                             MEAN: tl.constexpr, CELLS: tl.constexpr,
                             INDEX: tl.constexpr):
        # a (CELLS, B1P) tile: row j is one output cell, column k one pixel
        # column of its block, so each row load reads contiguous memory
        idx = tl.program_id(0).to(INDEX) * CELLS + tl.arange(0, CELLS)
        valid = idx < total
        wb = idx % WB
        hb = (idx // WB) % HB
        plane = idx // (WB * HB)
        w = wb[:, None] * B1 + tl.arange(0, B1P)[None, :]
        mask = valid[:, None] & (w < W) & (tl.arange(0, B1P)[None, :] < B1)
        base = x_ptr + (plane * H * W)[:, None] + w
        acc = tl.zeros([CELLS, B1P], dtype=tl.float32)
        for dy in tl.static_range(B0):
            h = hb * B0 + dy
            acc += tl.load(base + (h * W)[:, None], mask=mask & (h < H)[:, None],
                           other=0.0).to(tl.float32)
        sums = tl.sum(acc, axis=1)
        if MEAN:
            count_h = tl.minimum(H - hb * B0, B0)
            count_w = tl.minimum(W - wb * B1, B1)
            sums = sums / (count_h * count_w).to(tl.float32)
        tl.store(out_ptr + idx, sums.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _broadcast_kernel(grid_ptr, out_ptr, total, H: tl.constexpr,
                          W: tl.constexpr, HG: tl.constexpr, WG: tl.constexpr,
                          B0: tl.constexpr, B1: tl.constexpr,
                          BLOCK: tl.constexpr, INDEX: tl.constexpr):
        idx = tl.program_id(0).to(INDEX) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < total
        w = idx % W
        h = (idx // W) % H
        plane = idx // (W * H)
        hb = h // B0
        wb = w // B1
        has_cell = valid & (wb < WG) & (hb < HG)
        value = tl.load(grid_ptr + (plane * HG + hb) * WG + wb, mask=has_cell,
                        other=0.0).to(tl.float32)
        count_h = tl.minimum(H - hb * B0, B0)
        count_w = tl.minimum(W - wb * B1, B1)
        value = value / (count_h * count_w).to(tl.float32)
        tl.store(out_ptr + idx, value.to(out_ptr.dtype.element_ty), mask=valid)


def _index_type(*tensors: Tensor):
    """32-bit index arithmetic where every offset fits, else 64-bit."""
    small = all(t.numel() < 2**31 - _BLOCK for t in tensors)
    return tl.int32 if small else tl.int64


def block_reduce(x: Tensor, block: Tuple[int, int], mean: bool,
                 dtype: torch.dtype) -> Tensor:
    """Sums (or means) of ``x`` over ``block`` tiles, partial tiles included,
    accumulated in float32 and returned in ``dtype``."""
    n, c, h, w = x.shape
    hb, wb = -(-h // block[0]), -(-w // block[1])
    out = x.new_empty(n, c, hb, wb, dtype=dtype)
    total = out.numel()
    b1p = triton.next_power_of_2(block[1])
    cells = max(_BLOCK // b1p, 16)
    _block_reduce_kernel[(triton.cdiv(total, cells), )](
        x, out, total, h, w, hb, wb, block[0], block[1], b1p, mean, cells,
        _index_type(x, out))
    return out


def broadcast_blocks(grid: Tensor, block: Tuple[int, int],
                     size: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Every pixel gets its grid cell divided by the cell's pixel count.

    ``grid`` may have fewer cells than the blocks tiling ``size`` (pixels of
    the missing blocks get zero) or more (the extra cells are ignored). The
    result has ``dtype``.
    """
    n, c, hg, wg = grid.shape
    out = grid.new_empty(n, c, *size, dtype=dtype)
    total = out.numel()
    _broadcast_kernel[(triton.cdiv(total, _BLOCK), )](
        grid.contiguous(), out, total, size[0], size[1], hg, wg, block[0],
        block[1], _BLOCK, _index_type(out))
    return out
