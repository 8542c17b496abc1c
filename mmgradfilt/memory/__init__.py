"""Lean pieces of a training step around the filtered convs: pure torch
autograd Functions and the modules that wrap them (no runner, no config; the
surgery in :mod:`mmgradfilt.surgery` finds where they go and puts them
there)."""
from .activations import (LEAN_ACTIVATIONS, LeanLeakyReLU, LeanReLU,
                          LeanReLU6, MaskActivationFunction, lean_activation,
                          pack_bits, unpack_bits)
from .norm import (FilteredBatchNorm2d, FilteredBatchNormFunction,
                   filtered_batch_norm)
from .seg_loss import CETerm, lean_seg_loss

__all__ = [
    'LEAN_ACTIVATIONS', 'LeanLeakyReLU', 'LeanReLU', 'LeanReLU6',
    'MaskActivationFunction', 'lean_activation', 'pack_bits', 'unpack_bits',
    'FilteredBatchNorm2d', 'FilteredBatchNormFunction', 'filtered_batch_norm',
    'CETerm', 'lean_seg_loss'
]
