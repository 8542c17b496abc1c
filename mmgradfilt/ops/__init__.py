from .grad_filter_conv import GradFilterConv2dFunction, grad_filter_conv2d

__all__ = ['GradFilterConv2dFunction', 'grad_filter_conv2d']
