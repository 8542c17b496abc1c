from .grad_filter_conv2d import GradFilterConv2d, check_radius

__all__ = ['GradFilterConv2d', 'check_radius']
