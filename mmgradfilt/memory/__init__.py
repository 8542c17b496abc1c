"""Lean pieces of a training step around the filtered convs."""
from .activations import (LEAN_ACTIVATIONS, LeanLeakyReLU, LeanReLU,
                          LeanReLU6, MaskActivationFunction, lean_activation,
                          pack_bits, unpack_bits)
from .norm import (FilteredBatchNorm2d, FilteredBatchNormFunction, NormRecord,
                   filtered_batch_norm, filtered_norm_pairs,
                   install_filtered_norm)
from .seg_loss import (CETerm, install_lean_loss, lean_loss_support,
                       lean_seg_loss, remove_lean_loss)

__all__ = [
    'LEAN_ACTIVATIONS', 'LeanLeakyReLU', 'LeanReLU', 'LeanReLU6',
    'MaskActivationFunction', 'lean_activation', 'pack_bits', 'unpack_bits',
    'FilteredBatchNorm2d', 'FilteredBatchNormFunction', 'NormRecord',
    'filtered_batch_norm', 'filtered_norm_pairs', 'install_filtered_norm',
    'CETerm', 'install_lean_loss', 'lean_loss_support', 'lean_seg_loss',
    'remove_lean_loss'
]
