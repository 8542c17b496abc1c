"""Finding the normalization layers that filtered convs feed, and making
them :class:`~mmgradfilt.memory.FilteredBatchNorm2d` (the math and the module
live in :mod:`mmgradfilt.memory.norm`)."""
from typing import List, Optional, Tuple

import torch.nn as nn
from mmengine.model.utils import _BatchNormXd
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..layers import GradFilterConv2d
from ..memory.norm import FilteredBatchNorm2d
from ..report import pair_label
from .paths import swap_modules
from .record import SurgeryRecord

# norm_cfg=dict(type='FilteredBatchNorm2d', radius=...) in MMCV's builders
MODELS.register_module(module=FilteredBatchNorm2d)

# layers a filtered conv may feed; each appears in the install records
_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
# the BatchNorms a FilteredBatchNorm2d replaces: nn.BatchNorm2d and what
# MMEngine's revert_sync_batchnorm turns SyncBN into (non-distributed runs, the
# benchmark); that one skips the input check, but behind a Conv2d its input
# is 4-D
_SWAPPABLE = (nn.BatchNorm2d, _BatchNormXd)


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


def _feeding_children(module: nn.Module) -> List[Tuple[str, str]]:
    """``(first, second)`` child names where ``module``'s forward feeds the
    first child's output straight into the second.

    Three structures are known: MMCV's ``ConvModule`` (``conv`` then its norm
    when ``order`` puts them side by side), ``nn.Sequential`` with its own
    forward (neighbours), and OpenMMLab's ResNet blocks and stems (``conv{i}``
    then the norm named by ``norm{i}_name``).
    """
    children = dict(module.named_children())
    order = getattr(module, 'order', None)
    if 'conv' in children and isinstance(getattr(module, 'norm_name', None),
                                         str) and isinstance(order, tuple):
        if getattr(module, 'with_norm', False) and 'norm' in order and (
                order.index('norm') == order.index('conv') + 1):
            return [('conv', module.norm_name)]
        return []
    if isinstance(module, nn.Sequential) and (type(module).forward is
                                              nn.Sequential.forward):
        names = list(children)
        return list(zip(names, names[1:]))
    pairs = []
    for i in range(1, 4):
        norm = getattr(module, f'norm{i}_name', None)
        if f'conv{i}' in children and isinstance(norm, str):
            pairs.append((f'conv{i}', norm))
    return pairs


def frozen_in_eval(norm: nn.Module) -> bool:
    """Whether ``norm`` is a BatchNorm whose parameters are all frozen, in
    eval mode: it normalizes with fixed statistics and trains nothing."""
    params = list(norm.parameters(recurse=False))
    return (isinstance(norm, _BatchNorm) and not norm.training and bool(params)
            and not any(p.requires_grad for p in params))


def filtered_norm_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(conv path, norm path)`` of every normalization layer of ``model``
    whose input is the output of a :class:`GradFilterConv2d`, found in the
    structures :func:`_feeding_children` knows."""
    pairs = []
    for prefix, module in model.named_modules():
        for first, second in _feeding_children(module):
            conv, norm = getattr(module, first), getattr(module, second)
            if isinstance(conv, GradFilterConv2d) and isinstance(norm, _NORMS):
                pairs.append((_join(prefix, first), _join(prefix, second)))
    return pairs


def _refusal(norm: nn.Module, conv: Optional[str]) -> str:
    """Why ``norm`` (fed by the conv at path ``conv``) is not, or cannot be
    made, a :class:`FilteredBatchNorm2d`; '' if it is or can."""
    if conv is None:
        return 'not fed by a GradFilterConv2d'
    if isinstance(norm, FilteredBatchNorm2d):
        return ''
    if isinstance(norm, nn.SyncBatchNorm):
        # a distributed run all-reduces its batch statistics and the two
        # gradient sums of its backward; the filtered backward would have to
        # all-reduce dbeta and dgamma' the same way
        return ('its batch statistics and gradient sums are synced across '
                'processes, which the filtered backward does not do')
    if not isinstance(norm, _BatchNorm) or isinstance(norm, (
            nn.BatchNorm1d, nn.BatchNorm3d)):
        return 'not a 2-D BatchNorm'
    if type(norm) not in _SWAPPABLE:
        return 'a subclass with its own behaviour, which a swap would drop'
    if frozen_in_eval(norm):
        return ('frozen and in eval mode: its exact backward, '
                'dx = gamma * invstd * g, has nothing to filter')
    if any((norm._forward_pre_hooks, norm._forward_hooks,
            norm._backward_hooks, norm._backward_pre_hooks)):
        return 'has module hooks, which a swap would drop'
    return ''


def filtered_norm_records(model: nn.Module) -> List[SurgeryRecord]:
    """What :func:`install_filtered_norm` would do to ``model``, changing
    nothing: one ``'norm'`` record per normalization layer (BatchNorm,
    InstanceNorm, GroupNorm, LayerNorm), with the status it would get, the
    conv feeding it and its radius, or why it would be left as it is."""
    convs = {norm: conv for conv, norm in filtered_norm_pairs(model)}
    records = []
    for path, norm in model.named_modules():
        if not isinstance(norm, _NORMS):
            continue
        conv = convs.get(path)
        radius = model.get_submodule(conv).radius if conv else None
        name = type(norm).__name__
        reason = _refusal(norm, conv)
        if reason:
            status, detail = 'skipped', f'{name}: {reason}'
        else:
            status = 'installed'
            if isinstance(norm, FilteredBatchNorm2d):
                status = 'unchanged' if norm.radius == radius else 'updated'
            detail = (f'{name} -> patch statistics (radius '
                      f'{pair_label(radius)}, after {conv})')
        records.append(SurgeryRecord('norm', path, status, detail, radius,
                                     conv))
    return records


def install_filtered_norm(model: nn.Module) -> List[SurgeryRecord]:
    """Swap each ``BatchNorm2d`` (or MMEngine's ``_BatchNormXd``, reverted
    SyncBN) fed by a :class:`GradFilterConv2d` for a
    :class:`FilteredBatchNorm2d` of the conv's radius, in place.

    The new layers share the old ones' ``Parameter`` and buffer objects, so an
    optimizer built before stays valid. Layers already filtered take the
    conv's current radius.

    Args:
        model (nn.Module): The model, changed in place.

    Returns:
        list[SurgeryRecord]: :func:`filtered_norm_records` of ``model``
        before the change: what was done, or why a layer was left as it is.
    """
    records = filtered_norm_records(model)
    swaps = {}
    for record in records:
        norm = model.get_submodule(record.path)
        if record.status == 'updated':
            norm.radius = record.radius
        elif record.status == 'installed':
            swaps[id(norm)] = FilteredBatchNorm2d.from_bn(norm, record.radius)
    swap_modules(model, swaps)
    return records
