from .gradient_filter_hook import GradientFilterHook
from .pretrained_check_hook import PretrainedCheckHook

__all__ = ['GradientFilterHook', 'PretrainedCheckHook']
