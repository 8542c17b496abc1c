from .gradient_filter_hook import GradientFilterHook

__all__ = ['GradientFilterHook']
