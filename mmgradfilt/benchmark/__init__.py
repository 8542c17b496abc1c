from .memory import SavedTensorMeter

__all__ = ['SavedTensorMeter']
