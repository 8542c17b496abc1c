"""The interface that the filtered conv's backends share, and the choice.

The op (:mod:`.grad_filter_conv`) does its memory-bound steps through a
backend: a module with the functions of :class:`Backend`. Three implement it:
:mod:`.triton_kernels` (CUDA), :mod:`.cpu_kernels` (C++ on CPU) and
:mod:`.reference` (pure PyTorch, every tensor). A new backend is a module with
these functions, listed in :data:`FUSED`, and tested against the reference.
"""
from typing import Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor

from . import cpu_kernels, reference, triton_kernels
from .types import IntPair


@runtime_checkable
class Backend(Protocol):
    """What a backend provides; each step gives the reference's result."""

    def available(self, x: Tensor) -> bool:
        """Whether this backend takes ``x`` (device, dtype, layout)."""

    def block_reduce(self, x: Tensor, block: IntPair, mean: bool,
                     dtype: torch.dtype) -> Tensor:
        """Sums (or means) of ``x`` over ``block`` tiles, partial last tiles
        included (means over their pixels), accumulated in float32 at least,
        returned in ``dtype``."""

    def broadcast_blocks(self, grid: Tensor, block: IntPair, size: IntPair,
                         dtype: torch.dtype) -> Tensor:
        """A ``size`` map whose pixels get their grid cell divided by the
        cell's pixel count; pixels of blocks beyond ``grid`` get zero, cells
        beyond ``size`` are unused. The result has ``dtype``."""

    def sum_taps(self, weight: Tensor, dims: Sequence[int]) -> Tensor:
        """``weight`` summed over its spatial ``dims`` (keepdim)."""

    def repeat_taps(self, grad: Tensor, shape: torch.Size) -> Tensor:
        """``grad`` broadcast over the taps of ``shape``, contiguous."""


# fused backends, in order of preference; the reference takes the rest
FUSED: Tuple[Backend, ...] = (triton_kernels, cpu_kernels)


def select(x: Tensor) -> Backend:
    """The backend for ``x``: the first fused one that takes it, else the
    reference."""
    for backend in FUSED:
        if backend.available(x):
            return backend
    return reference
