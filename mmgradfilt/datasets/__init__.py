"""Datasets that OpenMMLab lacks, registered where their toolbox is installed."""
import importlib.util

from .views import ViewDataset, ViewSampler, dataset_fingerprint, with_views

__all__ = ['ViewDataset', 'ViewSampler', 'dataset_fingerprint', 'with_views']

if importlib.util.find_spec('mmpretrain'):
    from .digits import Digits
    from .user_split import UserSplitDataset, make_user_split
    __all__ += ['Digits', 'UserSplitDataset', 'make_user_split']

if importlib.util.find_spec('mmseg'):
    from .digits_seg import DigitsSegDataset, make_digits_seg
    __all__ += ['DigitsSegDataset', 'make_digits_seg']
