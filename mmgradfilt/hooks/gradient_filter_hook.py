import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from ..report import count_parameters, format_table, trained_modules
from ..surgery import (LeanRecord, check_filter_install, check_freeze_rules,
                       eval_norms, freeze_layers, get_module,
                       install_gradient_filter, make_lean)


@HOOKS.register_module()
class GradientFilterHook(Hook):
    """Install gradient filters, freeze layers and make the step lean before
    a run starts.

    The surgery happens in ``before_run``: after the optimizer is built (it
    keeps the same ``Parameter`` objects, so the optimizer stays valid) and
    before weights are initialised or a checkpoint is loaded or resumed (the
    state_dict keys do not change). In a distributed run the model is wrapped
    in DDP again when freezing changed which parameters train, so DDP needs no
    ``find_unused_parameters``.

    Args:
        filter_install (list[dict]): ``dict(path=..., radius=...)`` items for
            :func:`mmgradfilt.install_gradient_filter`. Defaults to ().
        freeze_layers (list[str]): Ordered rules for
            :func:`mmgradfilt.freeze_layers` (``'~path'`` unfreezes).
            Defaults to ().
        norm_eval (bool): Keep BatchNorm layers of frozen parts in eval mode.
            Defaults to True.
        lean_memory (bool): Then make the step keep less for backward with
            :func:`mmgradfilt.surgery.make_lean` (exact: 1-bit activation
            masks, the banded segmentation loss). Defaults to True.
        filter_norm (bool, optional): Also replace the BatchNorms right after
            filtered convs by patch-statistics ones
            (:class:`~mmgradfilt.memory.FilteredBatchNorm2d`, approximate:
            the BN's weight gradient, and in training mode the conv's
            gradients, come from patch means); needs ``lean_memory``.
            Defaults to None: the same as ``lean_memory``, so
            ``lean_memory=False`` gives the plain filtered step.
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 filter_install: Sequence[dict] = (),
                 freeze_layers: Sequence[str] = (),
                 norm_eval: bool = True,
                 lean_memory: bool = True,
                 filter_norm: Optional[bool] = None) -> None:
        check_filter_install(filter_install)
        for name, value in (('norm_eval', norm_eval),
                            ('lean_memory', lean_memory)):
            if not isinstance(value, bool):
                raise TypeError(f'{name} must be a bool, got {value!r}')
        if not isinstance(filter_norm, (bool, type(None))):
            raise TypeError(f'filter_norm must be a bool or None, got '
                            f'{filter_norm!r}')
        if filter_norm is None:
            filter_norm = lean_memory
        if filter_norm and not lean_memory:
            raise ValueError('filter_norm=True is part of the lean step: it '
                             'needs lean_memory=True')
        self.filter_install = list(filter_install)
        self.freeze_layers = check_freeze_rules(freeze_layers)
        self.norm_eval = norm_eval
        self.lean_memory = lean_memory
        self.filter_norm = filter_norm

    def apply(self, model: nn.Module) -> str:
        """Do the surgery on ``model``; return the report to log."""
        for rule in self.freeze_layers:  # refuse unknown paths before any change
            get_module(model, rule.lstrip('~'))
        records = install_gradient_filter(model, self.filter_install)
        rules = freeze_layers(model, self.freeze_layers, self.norm_eval)
        # after freezing: the filtered BatchNorms skip the frozen ones
        lean = make_lean(model, self.filter_norm) if self.lean_memory else []
        frozen = [r.path for r in records
                  if not model.get_submodule(r.path).weight.requires_grad]
        if frozen:
            print_log('Gradient filters on frozen convs (their weights get no '
                      f'gradient): {", ".join(frozen)}', logger='current',
                      level=logging.WARNING)
        trainable, total = count_parameters(model)
        lines = [f'Gradient filter on {len(records)} conv(s):',
                 format_table(
                     ['path', 'weight', 'stride', 'dilation', 'radius', 'status'],
                     [[r.path, 'x'.join(map(str, r.weight_shape)),
                       _pair_str(r.stride), _pair_str(r.dilation),
                       _pair_str(r.radius), r.status] for r in records])]
        if rules:
            lines.append('Freeze rules (parameter tensors set): ' + ', '.join(
                f'{r.rule} ({r.num_params})' for r in rules))
        lines.append('Trained modules: ' +
                     (', '.join(trained_modules(model)) or 'none'))
        norms = eval_norms(model)
        if norms:
            lines.append(f'Frozen BatchNorms in eval mode (running statistics '
                         f'fixed): {len(norms)}')
        lines.append(f'Trainable parameters: {trainable:,} / {total:,} '
                     f'({100 * trainable / max(total, 1):.2f}%)')
        if self.lean_memory:
            num_lean = sum(r.status != 'not lean' for r in lean)
            lines += [f'Lean memory: {num_lean} of {len(lean)} part(s) lean:',
                      format_table(['part', 'where', 'status', 'detail'],
                                   _grouped(lean))]
        return '\n'.join(lines)

    def before_run(self, runner) -> None:
        """Install the filters and freeze layers before the run starts."""
        wrapped = is_model_wrapper(runner.model)
        model = runner.model.module if wrapped else runner.model
        trainable_before = _trainable_ids(model)
        runner.logger.info(self.apply(model))
        if (isinstance(runner.model, DistributedDataParallel)
                and _trainable_ids(model) != trainable_before):
            runner.model = None  # release the old wrapper and its reducer hooks
            runner.model = runner.wrap_model(
                runner.cfg.get('model_wrapper_cfg'), model)
            runner.logger.info('Wrapped the model in DDP again after freezing')


def _grouped(records: Sequence[LeanRecord]) -> List[List[str]]:
    """One row per (part, status, detail), naming its modules (first and last
    when there are many: the model's ReLUs would fill a screen)."""
    groups: Dict[Tuple[str, str, str], List[str]] = {}
    for r in records:
        groups.setdefault((r.part, r.status, r.detail), []).append(r.path)
    rows = []
    for (part, status, detail), paths in groups.items():
        where = (', '.join(paths) if len(paths) <= 2 else
                 f'{len(paths)} modules: {paths[0]} ... {paths[-1]}')
        rows.append([part, where, status, detail])
    return rows


def _trainable_ids(model: nn.Module) -> List[int]:
    return [id(p) for p in model.parameters() if p.requires_grad]


def _pair_str(pair: Sequence[int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f'{pair[0]}x{pair[1]}'
