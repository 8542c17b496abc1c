"""Analytic FLOPs of a conv layer's backward pass, vanilla and filtered."""
from typing import Sequence

import torch.nn as nn

from ..ops.grad_filter_conv import GridConv, patch_grid_size


def conv_backward_flops(conv: nn.Conv2d, out_shape: Sequence[int],
                        radius: Sequence[int] = None, need_input: bool = True,
                        need_weight: bool = True) -> int:
    """Multiply-adds x2 of the input and weight gradients of ``conv``.

    Args:
        conv (nn.Conv2d): The layer.
        out_shape (Sequence[int]): Its output shape ``(N, C_out, Ho, Wo)``.
        radius (Sequence[int], optional): Patch size of the gradient filter;
            None for PyTorch's exact backward. Defaults to None.
        need_input, need_weight (bool): Which gradients are computed.

    Returns:
        int: FLOPs, counting the patch sums of the output gradient for the
        filtered backward.
    """
    n, c_out, ho, wo = out_shape
    taps = conv.in_channels // conv.groups * conv.kernel_size[0] * \
        conv.kernel_size[1]
    if radius is None:
        per_product = 2 * n * c_out * ho * wo * taps
        extra = 0
    else:
        grid = GridConv(conv.kernel_size, conv.stride, (0, 0), conv.dilation,
                        tuple(radius))
        taps = conv.in_channels // conv.groups * grid.kernel_size[0] * \
            grid.kernel_size[1]
        cells = patch_grid_size(ho, radius[0]) * patch_grid_size(wo, radius[1])
        per_product = 2 * n * c_out * cells * taps
        extra = n * c_out * ho * wo  # summing the output gradient per patch
    return per_product * (int(need_input) + int(need_weight)) + extra
