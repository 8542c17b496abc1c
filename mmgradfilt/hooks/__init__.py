from .frozen_feature_cache_hook import FrozenFeatureCacheHook
from .gradient_filter_hook import GradientFilterHook, recipe_from_config
from .pretrained_check_hook import PretrainedCheckHook

__all__ = [
    'FrozenFeatureCacheHook', 'GradientFilterHook', 'PretrainedCheckHook',
    'recipe_from_config'
]
