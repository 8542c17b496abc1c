import logging
from typing import Tuple, Union

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch import Tensor

from ..ops import grad_filter_conv2d
from ..ops.types import RadiusType, check_radius

@MODELS.register_module()
class GradFilterConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose backward pass applies gradient filtering.

    The forward output equals ``nn.Conv2d``'s bit for bit. When gradients are
    needed, the output gradient is averaged over ``radius x radius`` patches
    and the input and weight gradients are computed on the patch grid (see
    :mod:`mmgradfilt.ops.grad_filter_conv`); only the pooled input is kept for
    backward. Parameters and state_dict keys are those of ``nn.Conv2d``.
    Under autocast the op runs in the autocast dtype, as ``nn.Conv2d`` does. A
    warning names the layer the first time its output is smaller than the
    patch (the filter then averages the gradient over the whole map).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias, padding_mode, device, dtype: As ``nn.Conv2d``;
            ``padding_mode`` must be ``'zeros'``.
        radius (int | tuple[int, int]): Patch size of the gradient filter.
            Defaults to 4.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[str, int, Tuple[int, int]] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1,
                 groups: int = 1,
                 bias: bool = True,
                 padding_mode: str = 'zeros',
                 device=None,
                 dtype=None,
                 radius: RadiusType = 4) -> None:
        if padding_mode != 'zeros':
            raise ValueError(f'GradFilterConv2d supports padding_mode="zeros" '
                             f'only, got {padding_mode!r}')
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias, padding_mode, device,
                         dtype)
        self.radius = check_radius(radius)
        # numeric padding, the form the op takes
        self.padding_pair = self._numeric_padding()
        self._warned_small = False

    def _numeric_padding(self) -> Tuple[int, int]:
        """Padding as two ints; 'same' must be symmetric."""
        if self.padding == 'valid':
            return (0, 0)
        if self.padding == 'same':
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError('GradFilterConv2d needs symmetric padding; '
                                 f'padding="same" with kernel {self.kernel_size} '
                                 f'and dilation {self.dilation} is not')
            return tuple(t // 2 for t in total)
        return tuple(self.padding)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d,
                  radius: RadiusType) -> 'GradFilterConv2d':
        """A filtered conv that shares ``conv``'s ``Parameter`` objects."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                  conv.stride, conv.padding, conv.dilation, conv.groups,
                  conv.bias is not None, conv.padding_mode, device='meta',
                  radius=radius)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, radius={self.radius}'

    def forward(self, x: Tensor) -> Tensor:
        out = grad_filter_conv2d(x, self.weight, self.bias, self.stride,
                                 self.padding_pair, self.dilation,
                                 self.groups, self.radius)
        if out.requires_grad and not self._warned_small:
            self._check_patch(tuple(out.shape[-2:]))
        return out

    def _check_patch(self, size: Tuple[int, int]) -> None:
        """Warn once if the output is smaller than the gradient patch."""
        if all(n >= r for n, r in zip(size, self.radius)):
            return
        self._warned_small = True
        print_log(f'{self!r}: its {size[0]}x{size[1]} output is smaller than '
                  f'the {self.radius[0]}x{self.radius[1]} gradient patch, so '
                  'the filter averages the gradient over the whole map; use a '
                  f'radius of at most {min(size)}', logger='current',
                  level=logging.WARNING)
