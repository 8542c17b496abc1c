"""Making a model's training step keep less for backward: lean activations,
the banded segmentation loss and, with ``filter_norm``, filtered BatchNorms."""
import ast
import functools
import inspect
import textwrap
from typing import List, Optional, Tuple

import torch.nn as nn

from ..memory.activations import LEAN_ACTIVATIONS, lean_activation
from .norms import frozen_in_eval, install_filtered_norm
from .paths import swap_modules
from .record import SurgeryRecord
from .seg_loss import install_lean_loss, lean_loss_support


# activations of torch and MMCV that have no 1-bit backward: reported, kept
_OTHER_ACTIVATION_MODULES = (
    'torch.nn.modules.activation', 'mmcv.cnn.bricks.activation',
    'mmcv.cnn.bricks.hsigmoid', 'mmcv.cnn.bricks.hswish',
    'mmcv.cnn.bricks.swish')
_FUNCTIONAL_ACTIVATIONS = {'relu', 'relu_', 'relu6', 'leaky_relu',
                           'leaky_relu_', 'hardtanh', 'hardtanh_'}


def _has_hooks(module: nn.Module) -> bool:
    return any((module._forward_pre_hooks, module._forward_hooks,
                module._backward_pre_hooks, module._backward_hooks))


def _activation_record(path: str,
                       module: nn.Module) -> Tuple[Optional[SurgeryRecord], bool]:
    """The record of one module that may be an activation (None if it is
    not one), and whether to swap it for its lean twin."""
    name = type(module).__name__
    if isinstance(module, tuple(LEAN_ACTIVATIONS.values())):
        return SurgeryRecord('activation', path, 'unchanged',
                          f'{name}: 1-bit mask'), False
    if type(module) in LEAN_ACTIVATIONS:
        if _has_hooks(module):
            return SurgeryRecord('activation', path, 'skipped',
                              f'{name} has module hooks, which a swap would '
                              'drop'), False
        return SurgeryRecord('activation', path, 'installed',
                          f'{name} -> 1-bit mask'), True
    if (type(module).__module__ in _OTHER_ACTIVATION_MODULES
            and not isinstance(module, nn.MultiheadAttention)):
        return SurgeryRecord('activation', path, 'skipped',
                          f'{name} has no 1-bit backward'), False
    return None, False


@functools.lru_cache(maxsize=None)
def _functional_activations(cls: type) -> Tuple[str, ...]:
    """Activation calls (``F.relu(...)``, ``x.relu_()``) in the source of
    ``cls.forward``, which no module swap reaches."""
    forward = getattr(cls, 'forward', None)
    if forward is None or forward.__module__.startswith('torch.'):
        return ()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return ()  # no source to read (a C extension, an interactive class)
    # self.relu(x) calls a submodule, which the swap reaches
    calls = [ast.unparse(node.func) for node in ast.walk(tree)
             if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute)
             and node.func.attr in _FUNCTIONAL_ACTIVATIONS
             and not (isinstance(node.func.value, ast.Name)
                      and node.func.value.id == 'self')]
    return tuple(dict.fromkeys(calls))


def make_lean(model: nn.Module,
              filter_norm: bool = False) -> List[SurgeryRecord]:
    """Make what ``model``'s training step keeps for backward smaller.

    Exact (same forward, same gradients): ReLU, ReLU6 and LeakyReLU modules
    become their 1-bit-mask twins (:mod:`mmgradfilt.memory.activations`), and
    each MMSeg decode head whose loss :func:`lean_loss_support` accepts gets
    the banded loss that keeps head-size logits only. With ``filter_norm``,
    also each BatchNorm2d (or reverted SyncBN) right after a
    :class:`GradFilterConv2d`, trained or in eval mode with a trained affine,
    becomes a :class:`~mmgradfilt.memory.FilteredBatchNorm2d` (approximate:
    patch statistics). Every part is checked before any is changed; a part
    the lean path does not know is left as it is, and its record says why.
    Frozen BatchNorms in eval mode (a frozen part's, as :func:`freeze_layers`
    leaves them) have nothing to make lean and get no record. Parameters and
    state_dict keys do not change.

    Args:
        model (nn.Module): The model, changed in place.
        filter_norm (bool): Also filter the BatchNorms behind filtered convs.
            Defaults to False.

    Returns:
        list[SurgeryRecord]: Activations (modules, and calls in a forward
        that no swap reaches), decode-head losses and, with ``filter_norm``,
        normalization layers: which are lean (``'installed'`` now or
        ``'unchanged'``) and which are ``'skipped'``, and why.
    """
    if not isinstance(filter_norm, bool):
        raise TypeError(f'filter_norm must be a bool, got {filter_norm!r}')
    records, swaps, heads = [], {}, []
    for path, module in model.named_modules():
        record, swap = _activation_record(path, module)
        if record is not None:
            records.append(record)
        if swap:
            swaps[id(module)] = lean_activation(module)
        for call in _functional_activations(type(module)):
            records.append(SurgeryRecord(
                'activation', path, 'skipped',
                f'{call}() in {type(module).__name__}.forward: a functional '
                'call cannot be swapped'))
        if isinstance(getattr(module, 'loss_decode', None), nn.Module):
            reason = lean_loss_support(module)
            records.append(SurgeryRecord(
                'loss', path, 'skipped' if reason else 'installed',
                reason or 'banded cross-entropy: keeps head-size logits and '
                'compact labels'))
            if reason is None:
                heads.append(module)

    swap_modules(model, swaps)
    for head in heads:
        install_lean_loss(head)
    if filter_norm:
        records += [r for r in install_filtered_norm(model)
                    if not frozen_in_eval(model.get_submodule(r.path))]
    return records
