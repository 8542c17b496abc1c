"""MMPretrain models that OpenMMLab lacks (imports mmpretrain)."""
from .backbones import MCUNet

__all__ = ['MCUNet']
