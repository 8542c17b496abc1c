"""The surgery of a fine-tuning run as one value: which convs are filtered,
which layers freeze, how lean the step is; checked once, applied to any model.

:class:`~mmgradfilt.hooks.GradientFilterHook` builds a
:class:`GradientFilterRecipe` from its arguments and applies it in
``before_run``; tools apply the same value to copies of a model, changed with
:meth:`GradientFilterRecipe.replace` (which checks again), as MMEngine's
``EMAHook`` wraps ``ExponentialMovingAverage``.
"""
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.logging import print_log

from ..ops.types import IntPair
from ..report import format_table, pair_label
from .filters import check_filter_install, install_gradient_filter
from .freeze import (FreezeRecord, check_freeze_rules, count_parameters,
                     eval_norms, freeze_layers, trained_modules)
from .lean import make_lean
from .paths import get_module
from .record import SurgeryRecord


@dataclass(frozen=True)
class GradientFilterRecipe:
    """What to do to a model before fine-tuning it: checked when built.

    The arguments are those of :class:`~mmgradfilt.hooks.GradientFilterHook`
    (its config keys). Fields hold them normalized: ``filter_install`` as
    ``(path, (rh, rw))`` tuples, ``freeze_layers`` as a tuple, ``filter_norm``
    as a bool.

    Args:
        filter_install (Sequence[dict]): ``dict(path=..., radius=...)`` items
            (or ``(path, radius)`` tuples) for
            :func:`~mmgradfilt.surgery.install_gradient_filter`, applied in
            order. Defaults to ().
        freeze_layers (Sequence[str]): Ordered rules for
            :func:`~mmgradfilt.surgery.freeze_layers` (``'~path'``
            unfreezes). Defaults to ().
        norm_eval (bool): Keep BatchNorm layers of frozen parts in eval mode.
            Defaults to True.
        lean_memory (bool): Then make the step keep less for backward with
            :func:`~mmgradfilt.surgery.make_lean` (exact: 1-bit activation
            masks, the banded segmentation loss). Defaults to True.
        filter_norm (bool, optional): Also replace the BatchNorms right after
            filtered convs by patch-statistics ones
            (:class:`~mmgradfilt.memory.FilteredBatchNorm2d`, approximate);
            needs ``lean_memory``. Defaults to None: the same as
            ``lean_memory``, also after a :meth:`replace` that changes
            ``lean_memory`` only.
    """
    filter_install: Tuple[Tuple[str, IntPair], ...] = ()
    freeze_layers: Tuple[str, ...] = ()
    norm_eval: bool = True
    lean_memory: bool = True
    filter_norm: Optional[bool] = None
    # filter_norm was left to follow lean_memory
    _norm_follows_lean: bool = field(default=False, init=False, repr=False,
                                     compare=False)

    def __post_init__(self) -> None:
        install = tuple(check_filter_install(self.filter_install))
        rules = tuple(check_freeze_rules(self.freeze_layers))
        for name in ('norm_eval', 'lean_memory'):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f'{name} must be a bool, got {value!r}')
        filter_norm = self.filter_norm
        if not isinstance(filter_norm, (bool, type(None))):
            raise TypeError(f'filter_norm must be a bool or None, got '
                            f'{filter_norm!r}')
        follows = filter_norm is None
        if follows:
            filter_norm = self.lean_memory
        if filter_norm and not self.lean_memory:
            raise ValueError('filter_norm=True is part of the lean step: it '
                             'needs lean_memory=True')
        for name, value in (('filter_install', install),
                            ('freeze_layers', rules),
                            ('filter_norm', filter_norm),
                            ('_norm_follows_lean', follows)):
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> 'GradientFilterRecipe':
        """A copy with ``changes`` (argument names), checked again.

        A ``filter_norm`` left to its default keeps following
        ``lean_memory``.
        """
        if self._norm_follows_lean and 'filter_norm' not in changes:
            changes['filter_norm'] = None
        return dataclasses.replace(self, **changes)

    def to_config(self) -> Dict:
        """The arguments that build this recipe (or the hook), as a config
        would write them."""
        return dict(
            filter_install=[
                dict(path=path, radius=radius[0] if radius[0] == radius[1]
                     else list(radius)) for path, radius in self.filter_install
            ],
            freeze_layers=list(self.freeze_layers),
            norm_eval=self.norm_eval,
            lean_memory=self.lean_memory,
            filter_norm=None if self._norm_follows_lean else self.filter_norm)

    def apply(self, model: nn.Module) -> 'SurgeryReport':
        """Filter, freeze and make lean ``model`` in place.

        Parameters stay the same objects and state_dict keys do not change,
        so an optimizer built before stays valid and checkpoints load either
        way. Unknown paths are refused before anything changes.

        Returns:
            SurgeryReport: What was changed; :meth:`SurgeryReport.text` is
            the hook's log.
        """
        for rule in self.freeze_layers:  # refuse unknown paths before any change
            get_module(model, rule.lstrip('~'))
        filters = install_gradient_filter(model, self.filter_install)
        freeze = freeze_layers(model, self.freeze_layers, self.norm_eval)
        # after freezing: the filtered BatchNorms skip the frozen ones
        lean = make_lean(model, self.filter_norm) if self.lean_memory else None
        frozen = [r.path for r in filters
                  if not model.get_submodule(r.path).weight.requires_grad]
        if frozen:
            print_log('Gradient filters on frozen convs (their weights get no '
                      f'gradient): {", ".join(frozen)}', logger='current',
                      level=logging.WARNING)
        trainable, total = count_parameters(model)
        return SurgeryReport(filters, freeze, lean, trained_modules(model),
                             eval_norms(model), trainable, total)


@dataclass
class SurgeryReport:
    """What :meth:`GradientFilterRecipe.apply` did to a model."""
    filters: List[SurgeryRecord]
    freeze: List[FreezeRecord]
    lean: Optional[List[SurgeryRecord]]  # None without lean_memory
    trained_modules: List[str]
    eval_norms: List[str]  # frozen BatchNorms kept in eval mode
    trainable_params: int
    total_params: int

    def text(self) -> str:
        """The report as the hook logs it."""
        lines = [f'Gradient filter on {len(self.filters)} conv(s):',
                 format_table(['path', 'radius', 'status', 'weight'],
                              [[r.path, pair_label(r.radius), r.status,
                                r.detail] for r in self.filters])]
        if self.freeze:
            lines.append('Freeze rules (parameter tensors set): ' + ', '.join(
                f'{r.rule} ({r.num_params})' for r in self.freeze))
        lines.append('Trained modules: ' +
                     (', '.join(self.trained_modules) or 'none'))
        if self.eval_norms:
            lines.append(f'Frozen BatchNorms in eval mode (running statistics '
                         f'fixed): {len(self.eval_norms)}')
        total = max(self.total_params, 1)
        lines.append(f'Trainable parameters: {self.trainable_params:,} / '
                     f'{self.total_params:,} '
                     f'({100 * self.trainable_params / total:.2f}%)')
        if self.lean is not None:
            num_lean = sum(r.status != 'skipped' for r in self.lean)
            lines += [f'Lean memory: {num_lean} of {len(self.lean)} part(s) '
                      'lean:',
                      format_table(['part', 'where', 'status', 'detail'],
                                   _grouped(self.lean))]
        return '\n'.join(lines)


def _grouped(records: Sequence[SurgeryRecord]) -> List[List[str]]:
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
