"""Model surgery: install gradient filters, freeze layers by dotted path and
make a model's training step lean."""
import ast
import difflib
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import GradFilterConv2d, check_radius
from .memory.activations import LEAN_ACTIVATIONS, lean_activation
from .memory.norm import install_filtered_norm
from .memory.seg_loss import install_lean_loss, lean_loss_support
from .report import pair_label


@dataclass
class FilterRecord:
    """One conv touched by :func:`install_gradient_filter`."""
    path: str
    weight_shape: Tuple[int, ...]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    radius: Tuple[int, int]
    status: str  # 'installed', 'updated' (new radius) or 'unchanged'


@dataclass
class LeanRecord:
    """One part of a model seen by :func:`make_lean`."""
    part: str  # 'activation', 'loss' or 'norm'
    path: str
    status: str  # 'lean', 'unchanged' (lean already) or 'not lean'
    detail: str  # what it keeps for backward now, or why it is left as it is


@dataclass
class FreezeRecord:
    """The effect of one rule of :func:`freeze_layers`."""
    rule: str
    num_params: int


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; an unknown path names the nearest ones."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    parts = path.split('.')
    depth = next(i for i in range(len(parts), -1, -1)
                 if _has_submodule(model, '.'.join(parts[:i])))
    parent = '.'.join(parts[:depth])
    children = [n for n, _ in model.get_submodule(parent).named_children()]
    names = [name for name, _ in model.named_modules() if name]
    near = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
    raise ValueError(
        f'"{path}" is not a submodule of {type(model).__name__}: '
        f'"{parent or type(model).__name__}" has no "{parts[depth]}" (its '
        f'children: {", ".join(children) or "none"}).' +
        (f' Nearest valid paths: {", ".join(near)}.' if near else ''))


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


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


def _replace_modules(model: nn.Module, new: Dict[int, nn.Module]) -> None:
    """Swap every reference to a module whose id is in ``new``."""
    for module in model.modules():
        for name, child in list(module._modules.items()):
            if child is not None and id(child) in new:
                setattr(module, name, new[id(child)])


def check_filter_install(
        filter_install: Sequence[dict]) -> List[Tuple[str, Tuple[int, int]]]:
    """Validate ``dict(path=..., radius=...)`` items; return (path, radius) pairs."""
    if isinstance(filter_install, dict):
        raise TypeError('filter_install must be a list of dicts, got a dict')
    pairs = []
    for index, item in enumerate(filter_install):
        where = f'filter_install[{index}] = {item!r}'
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


def check_freeze_rules(rules: Sequence[str]) -> List[str]:
    """Validate freeze rules: a list of dotted paths, ``~`` to unfreeze."""
    if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
        raise TypeError(f'freeze rules must be a list of str, got {rules!r}')
    return list(rules)


def install_gradient_filter(model: nn.Module,
                            filter_install: Sequence[dict]) -> List[FilterRecord]:
    """Replace the convs under each path with :class:`GradFilterConv2d`.

    Args:
        model (nn.Module): The model, changed in place.
        filter_install (list[dict]): ``dict(path='decode_head.aspp_modules.2',
            radius=6)`` items, applied in order (a later item sets the radius
            of convs an earlier one reached). A path may name a conv or any
            module holding convs.

    Returns:
        list[FilterRecord]: One record per conv, in order of installation.
    """
    planned: Dict[int, Tuple[str, nn.Conv2d, Tuple[int, int]]] = {}
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
        records.append(
            FilterRecord(name, tuple(conv.weight.shape), tuple(conv.stride),
                         tuple(conv.dilation), radius, status))
    _replace_modules(model, replacements)
    return records


def _keep_eval(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook that puts a frozen norm layer back in eval mode."""
    module.training = False


def _set_norm_eval(module: _BatchNorm, frozen: bool) -> None:
    """Keep a frozen BatchNorm in eval mode (no running-stat updates)."""
    hooks = module._forward_pre_hooks
    for key in [k for k, fn in hooks.items() if fn is _keep_eval]:
        del hooks[key]
    if frozen:
        module.training = False
        module.register_forward_pre_hook(_keep_eval)


def freeze_layers(model: nn.Module,
                  rules: Sequence[str],
                  norm_eval: bool = True) -> List[FreezeRecord]:
    """Apply ordered freeze rules: ``'backbone'`` freezes, ``'~x'`` unfreezes.

    Args:
        model (nn.Module): The model, changed in place.
        rules (list[str]): Dotted module paths, in order; a leading ``~``
            makes the path trainable again.
        norm_eval (bool): Keep BatchNorm layers whose parameters are all
            frozen in eval mode, so their running statistics stay fixed.
            Defaults to True.

    Returns:
        list[FreezeRecord]: How many parameter tensors each rule set.
    """
    records = []
    for rule in check_freeze_rules(rules):
        trainable = rule.startswith('~')
        params = list(get_module(model, rule.lstrip('~')).parameters())
        for param in params:
            param.requires_grad_(trainable)
        records.append(FreezeRecord(rule, len(params)))
    if norm_eval:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                params = list(module.parameters(recurse=False))
                _set_norm_eval(module, bool(params) and not any(
                    p.requires_grad for p in params))
    return records


def eval_norms(model: nn.Module) -> List[str]:
    """Paths of the BatchNorms :func:`freeze_layers` keeps in eval mode."""
    return [name for name, module in model.named_modules()
            if isinstance(module, _BatchNorm)
            and _keep_eval in module._forward_pre_hooks.values()]


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
                       module: nn.Module) -> Tuple[Optional[LeanRecord], bool]:
    """The record of one module that may be an activation (None if it is
    not one), and whether to swap it for its lean twin."""
    name = type(module).__name__
    if isinstance(module, tuple(LEAN_ACTIVATIONS.values())):
        return LeanRecord('activation', path, 'unchanged',
                          f'{name}: 1-bit mask'), False
    if type(module) in LEAN_ACTIVATIONS:
        if _has_hooks(module):
            return LeanRecord('activation', path, 'not lean',
                              f'{name} has module hooks, which a swap would '
                              'drop'), False
        return LeanRecord('activation', path, 'lean',
                          f'{name} -> 1-bit mask'), True
    if (type(module).__module__ in _OTHER_ACTIVATION_MODULES
            and not isinstance(module, nn.MultiheadAttention)):
        return LeanRecord('activation', path, 'not lean',
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


def make_lean(model: nn.Module, filter_norm: bool = False) -> List[LeanRecord]:
    """Make what ``model``'s training step keeps for backward smaller.

    Exact (same forward, same gradients): ReLU, ReLU6 and LeakyReLU modules
    become their 1-bit-mask twins (:mod:`mmgradfilt.memory.activations`), and
    each MMSeg decode head whose loss :func:`lean_loss_support` accepts gets
    the banded loss that keeps head-size logits only. With ``filter_norm``,
    also each BatchNorm2d (or reverted SyncBN) right after a
    :class:`GradFilterConv2d`, trained or in eval mode with a trained affine,
    becomes a :class:`~mmgradfilt.memory.FilteredBatchNorm2d` (approximate:
    patch statistics). Every part is checked before any is changed; a part the lean
    path does not know is left as it is, and its record says why. Parameters
    and state_dict keys do not change.

    Args:
        model (nn.Module): The model, changed in place.
        filter_norm (bool): Also filter the BatchNorms behind filtered convs.
            Defaults to False.

    Returns:
        list[LeanRecord]: Activations (modules, and calls in a forward that
        no swap reaches), decode-head losses and, with ``filter_norm``,
        normalization layers: which are lean and which are not, and why.
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
            records.append(LeanRecord(
                'activation', path, 'not lean',
                f'{call}() in {type(module).__name__}.forward: a functional '
                'call cannot be swapped'))
        if isinstance(getattr(module, 'loss_decode', None), nn.Module):
            reason = lean_loss_support(module)
            records.append(LeanRecord(
                'loss', path, 'not lean' if reason else 'lean',
                reason or 'banded cross-entropy: keeps head-size logits and '
                'compact labels'))
            if reason is None:
                heads.append(module)

    _replace_modules(model, swaps)
    for head in heads:
        install_lean_loss(head)
    if filter_norm:
        for norm in install_filtered_norm(model):
            if norm.status == 'skipped':
                records.append(LeanRecord('norm', norm.path, 'not lean',
                                          f'{norm.type}: {norm.reason}'))
            else:
                records.append(LeanRecord(
                    'norm', norm.path,
                    'unchanged' if norm.status == 'unchanged' else 'lean',
                    f'{norm.type} -> patch statistics (radius '
                    f'{pair_label(norm.radius)}, after {norm.conv})'))
    return records
