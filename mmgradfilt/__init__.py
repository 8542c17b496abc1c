"""Gradient filtering for efficient on-device training in OpenMMLab 2.0."""
import importlib.util

# first, so that an old torch fails here with a clear message
from .version import __version__

# isort: split
from . import checkpoint  # noqa: F401  (registers the local loader)
from . import datasets  # noqa: F401  (registers those of installed toolboxes)
from .hooks import FrozenFeatureCacheHook, GradientFilterHook
from .layers import GradFilterConv2d
from .ops import grad_filter_conv2d
from .surgery import freeze_layers, install_gradient_filter

if importlib.util.find_spec('mmpretrain'):
    from . import models  # noqa: F401  (MCUNet in mmpretrain's MODELS)

__all__ = [
    'FrozenFeatureCacheHook', 'GradFilterConv2d', 'GradientFilterHook',
    'grad_filter_conv2d', 'install_gradient_filter', 'freeze_layers',
    '__version__'
]
