"""Gradient filtering for efficient on-device training in OpenMMLab 2.0."""
from . import checkpoint  # noqa: F401  (registers the local loader)
from .hooks import GradientFilterHook
from .layers import GradFilterConv2d
from .ops import grad_filter_conv2d
from .surgery import freeze_layers, install_gradient_filter
from .version import __version__

__all__ = [
    'GradFilterConv2d', 'GradientFilterHook', 'grad_filter_conv2d',
    'install_gradient_filter', 'freeze_layers', '__version__'
]
