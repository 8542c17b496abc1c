import logging
from typing import List, Sequence

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from ..report import count_parameters, format_table, trained_modules
from ..surgery import (check_filter_install, check_freeze_rules, eval_norms,
                       freeze_layers, get_module, install_gradient_filter)


@HOOKS.register_module()
class GradientFilterHook(Hook):
    """Install gradient filters and freeze layers before a run starts.

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
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 filter_install: Sequence[dict] = (),
                 freeze_layers: Sequence[str] = (),
                 norm_eval: bool = True) -> None:
        check_filter_install(filter_install)
        self.filter_install = list(filter_install)
        self.freeze_layers = check_freeze_rules(freeze_layers)
        self.norm_eval = norm_eval

    def apply(self, model: nn.Module) -> str:
        """Do the surgery on ``model``; return the report to log."""
        for rule in self.freeze_layers:  # refuse unknown paths before any change
            get_module(model, rule.lstrip('~'))
        records = install_gradient_filter(model, self.filter_install)
        rules = freeze_layers(model, self.freeze_layers, self.norm_eval)
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


def _trainable_ids(model: nn.Module) -> List[int]:
    return [id(p) for p in model.parameters() if p.requires_grad]


def _pair_str(pair: Sequence[int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f'{pair[0]}x{pair[1]}'
