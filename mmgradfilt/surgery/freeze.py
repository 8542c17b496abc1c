"""Freezing and unfreezing parts of a model by ordered rules, and what
trains then."""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .paths import get_module


@dataclass
class FreezeRecord:
    """The effect of one rule of :func:`freeze_layers`."""
    rule: str
    num_params: int


def check_freeze_rules(rules: Sequence[str]) -> List[str]:
    """Validate freeze rules: a list of dotted paths, ``~`` to unfreeze."""
    if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
        raise TypeError(f'freeze rules must be a list of str, got {rules!r}')
    return list(rules)


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


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` number of parameter elements."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in params))


def trained_modules(model: nn.Module) -> List[str]:
    """The shallowest modules whose parameters all train, in model order.

    A module counts only where it holds parameters and every one of them has
    ``requires_grad``; its children are then not listed again.
    """
    listed: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + '.') for p in listed):
            continue
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            listed.append(name)
            if name == '':
                break
    return [name or type(model).__name__ for name in listed]
