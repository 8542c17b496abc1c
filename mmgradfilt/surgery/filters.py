"""Installing gradient filters on the convs under dotted paths."""
from typing import Dict, List, Sequence, Tuple, Union

import torch.nn as nn

from ..layers import GradFilterConv2d
from ..ops.types import IntPair, RadiusType, check_radius
from ..report import pair_label
from .paths import get_module, swap_modules
from .record import SurgeryRecord


def _is_plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` whose forward is the standard one (or MMCV's wrapper)."""
    cls = type(module)
    return cls is nn.Conv2d or (cls.__name__ == 'Conv2d'
                                and cls.__module__.startswith('mmcv.'))


def _convs_under(model: nn.Module, path: str) -> List[Tuple[str, nn.Conv2d]]:
    """``(full path, conv)`` for every ``nn.Conv2d`` at or below ``path``."""
    root = get_module(model, path)
    prefix = f'{path}.' if path else ''
    convs = [(prefix + name if name else path, m)
             for name, m in root.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError(f'"{path}" ({type(root).__name__}) contains no '
                        'nn.Conv2d: only convolutions can be filtered')
    for name, conv in convs:
        if not (isinstance(conv, GradFilterConv2d) or _is_plain_conv(conv)):
            raise TypeError(f'"{name}" is a {type(conv).__name__}, a conv with '
                            'its own forward; only nn.Conv2d can be filtered')
    return convs


def check_filter_install(
        filter_install: Sequence[Union[dict, Tuple[str, RadiusType]]]
) -> List[Tuple[str, IntPair]]:
    """Validate ``dict(path=..., radius=...)`` items (or ``(path, radius)``
    tuples); return ``(path, (rh, rw))`` pairs."""
    if isinstance(filter_install, dict):
        raise TypeError('filter_install must be a list of dicts, got a dict')
    pairs = []
    for index, item in enumerate(filter_install):
        where = f'filter_install[{index}] = {item!r}'
        if isinstance(item, tuple) and len(item) == 2:
            item = dict(path=item[0], radius=item[1])
        if not isinstance(item, dict) or set(item) != {'path', 'radius'}:
            raise ValueError(f'{where}: each item must be '
                             'dict(path=..., radius=...)')
        if not isinstance(item['path'], str):
            raise TypeError(f'{where}: the path must be a str')
        try:
            radius = check_radius(item['radius'])
        except ValueError as err:
            raise ValueError(f'{where}: {err}') from None
        pairs.append((item['path'], radius))
    return pairs


def install_gradient_filter(
        model: nn.Module,
        filter_install: Sequence[Union[dict, Tuple[str, RadiusType]]]
) -> List[SurgeryRecord]:
    """Replace the convs under each path with :class:`GradFilterConv2d`.

    Args:
        model (nn.Module): The model, changed in place.
        filter_install (list[dict]): ``dict(path='decode_head.aspp_modules.2',
            radius=6)`` items, applied in order (a later item sets the radius
            of convs an earlier one reached). A path may name a conv or any
            module holding convs. ``(path, radius)`` tuples work too.

    Returns:
        list[SurgeryRecord]: One ``'conv'`` record per conv, in order of
        installation: its radius, and its weight shape (with stride and
        dilation where not 1) as the detail.
    """
    planned: Dict[int, Tuple[str, nn.Conv2d, IntPair]] = {}
    for path, radius in check_filter_install(filter_install):
        if path == '' and isinstance(model, nn.Conv2d):
            raise TypeError('cannot replace the model itself; wrap the conv')
        for name, conv in _convs_under(model, path):
            planned[id(conv)] = (name, conv, radius)

    records, replacements = [], {}
    for name, conv, radius in planned.values():
        if isinstance(conv, GradFilterConv2d):
            status = 'unchanged' if conv.radius == radius else 'updated'
            conv.radius = radius
        else:
            status = 'installed'
            replacements[id(conv)] = GradFilterConv2d.from_conv(conv, radius)
        records.append(SurgeryRecord('conv', name, status, _shape(conv),
                                     radius))
    swap_modules(model, replacements)
    return records


def _shape(conv: nn.Conv2d) -> str:
    """``128x512x3x3, dilation 12``: the weight shape, then the stride and
    the dilation where they are not 1."""
    text = 'x'.join(map(str, conv.weight.shape))
    for name in ('stride', 'dilation'):
        value = tuple(getattr(conv, name))
        if value != (1, 1):
            text += f', {name} {pair_label(value)}'
    return text
