from .mcunet import MCUNet

__all__ = ['MCUNet']
