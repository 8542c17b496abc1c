"""Activations whose backward keeps a 1-bit mask instead of a full tensor.

ReLU, ReLU6 and LeakyReLU have a gradient that is, per element, either the
output gradient or a constant times it (0 for ReLU and ReLU6, the negative
slope for LeakyReLU). Which of the two applies is one bit, so backward needs
that bit alone: it is packed 8 elements per byte, 32x less than the float32
output that ``torch.nn.ReLU`` keeps.

The bits follow torch's own backward: a ReLU passes the gradient where
``x > 0``, a ReLU6 where ``0 < x < 6`` (zero at both ends), a LeakyReLU
scales it where ``x > 0`` does not hold. NaN inputs aside (torch's scalar
and vectorised kernels disagree on them), the gradients are torch's bit for
bit.
"""
from typing import Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    'LEAN_ACTIVATIONS', 'LeanLeakyReLU', 'LeanReLU', 'LeanReLU6',
    'MaskActivationFunction', 'lean_activation', 'pack_bits', 'unpack_bits'
]

# 0x8040201008040201 as an int64: copies of its operand at bit offsets 0, 9,
# ..., 63. Multiplying 8 bytes of 0/1 by it gathers their low bits into the
# top byte; multiplying a byte by it spreads its bits to bit 7 of the 8 bytes.
# No two set bits of either product meet, so nothing carries; the bits that
# leave the 64-bit word are the ones not wanted (torch's integer product
# wraps on every device).
_SPREAD = 0x8040201008040201 - (1 << 64)
_LOW_BITS = 0x0101010101010101


def pack_bits(mask: Tensor) -> Tensor:
    """``mask`` (bool, any shape) as a flat uint8 tensor of ``ceil(n / 8)``
    bytes, 8 elements per byte. :func:`unpack_bits` reverses it."""
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, -flat.numel() % 8))
    return ((flat.view(torch.int64) * _SPREAD) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` bits of :func:`pack_bits`'s bytes, flat, as uint8
    0 or 1."""
    words = ((packed.to(torch.int64) * _SPREAD) >> 7) & _LOW_BITS
    return words.view(torch.uint8)[:numel]


class MaskActivationFunction(torch.autograd.Function):
    """``act``'s forward; backward from the packed bits of ``act.pass_bits``.

    Where a bit is 1 the output gradient passes unchanged, where it is 0 it is
    multiplied by ``act.gradient_slope`` (0 gives exact zeros, as torch's
    ``threshold_backward`` does). In place when ``act.inplace``: the input is
    overwritten and marked dirty, as ``torch.relu_`` does; the mask is taken
    before, and nothing of the input is kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, act: '_MaskActivation') -> Tensor:
        packed = act.pass_bits(x)
        if act.inplace:
            ctx.mark_dirty(x)
        out = act.plain_forward(x)
        ctx.save_for_backward(packed)
        ctx.shape, ctx.slope = x.shape, act.gradient_slope
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (packed, ) = ctx.saved_tensors
        passes = unpack_bits(packed, grad.numel()).view(ctx.shape).to(grad.dtype)
        # torch's own kernels on a 0/1 stand-in for the input: the same
        # products (g or g * slope, exact zeros) as the activations' backward
        if ctx.slope:
            grad_in = torch.ops.aten.leaky_relu_backward(
                grad, passes, ctx.slope, False)
        else:
            grad_in = torch.ops.aten.threshold_backward(grad, passes, 0)
        return grad_in, None


class _MaskActivation(nn.Module):
    """Forward of the torch activation it is mixed into; its backward keeps
    ``pass_bits(x)`` only. Without a gradient to compute, the torch module's
    own forward."""

    gradient_slope = 0.0

    def pass_bits(self, x: Tensor) -> Tensor:
        """Packed bits, 1 where the output gradient passes unscaled."""
        raise NotImplementedError

    def plain_forward(self, x: Tensor) -> Tensor:
        """The torch activation's forward."""
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return MaskActivationFunction.apply(x, self)
        return self.plain_forward(x)


class LeanReLU(_MaskActivation, nn.ReLU):
    """``nn.ReLU`` that keeps 1 bit per element for backward.

    Args:
        inplace (bool): As ``nn.ReLU``. Defaults to False.
    """

    def pass_bits(self, x: Tensor) -> Tensor:
        return pack_bits(x > 0)


class LeanReLU6(_MaskActivation, nn.ReLU6):
    """``nn.ReLU6`` that keeps 1 bit per element for backward.

    Args:
        inplace (bool): As ``nn.ReLU6``. Defaults to False.
    """

    def pass_bits(self, x: Tensor) -> Tensor:
        return pack_bits(x > 0) & pack_bits(x < 6)


class LeanLeakyReLU(_MaskActivation, nn.LeakyReLU):
    """``nn.LeakyReLU`` that keeps 1 bit per element for backward.

    Args:
        negative_slope (float): As ``nn.LeakyReLU``. Defaults to 1e-2.
        inplace (bool): As ``nn.LeakyReLU``. Defaults to False.
    """

    @property
    def gradient_slope(self) -> float:
        return self.negative_slope

    def pass_bits(self, x: Tensor) -> Tensor:
        return pack_bits(x > 0)


# exact types: a subclass may have changed what its forward computes
LEAN_ACTIVATIONS: Dict[Type[nn.Module], Type[_MaskActivation]] = {
    nn.ReLU: LeanReLU,
    nn.ReLU6: LeanReLU6,
    nn.LeakyReLU: LeanLeakyReLU,
}


def lean_activation(module: nn.Module) -> Optional[nn.Module]:
    """The lean twin of a torch ReLU, ReLU6 or LeakyReLU (same arguments,
    same train/eval mode); None for any other module."""
    lean_type = LEAN_ACTIVATIONS.get(type(module))
    if lean_type is None:
        return None
    if lean_type is LeanLeakyReLU:
        lean = lean_type(module.negative_slope, module.inplace)
    else:
        lean = lean_type(module.inplace)
    return lean.train(module.training)
