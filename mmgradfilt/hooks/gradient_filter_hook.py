import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from ..analysis.fidelity import (exact_model, gradient_fidelity,
                                 share_weights)
from ..report import pair_label
from ..surgery import GradientFilterRecipe

# measurements in a row below fidelity_warn before a layer is warned about
WARN_AFTER = 3


def _recipe_field(name: str) -> property:
    """An attribute of the hook that reads (and, checked, changes) its
    recipe's field ``name``; lists where the config has lists."""

    def get(self) -> Any:
        if name == 'filter_install':
            return self.recipe.to_config()[name]
        value = getattr(self.recipe, name)
        return list(value) if isinstance(value, tuple) else value

    def set(self, value: Any) -> None:
        self.recipe = self._checked(**{name: value})

    return property(get, set, doc=f'The recipe\'s ``{name}``; setting it '
                    'changes :attr:`recipe`, checked again.')


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

    The arguments make a :class:`~mmgradfilt.surgery.GradientFilterRecipe`
    (:attr:`recipe`, checked here: a bad value is an error naming this hook);
    :meth:`apply` runs it on a model without a runner, and
    :func:`recipe_from_config` reads a config's recipe.

    With ``fidelity_interval``, the hook also watches the approximation
    while the model trains: every that many iterations, in
    ``before_train_iter`` (on the batch about to be trained, at the weights
    it is trained from: in ``after_train_iter`` the weights have moved), it
    measures :func:`~mmgradfilt.analysis.fidelity.gradient_fidelity`: the
    cosine of each filtered conv's and filtered BatchNorm's weight gradient
    in the model as configured against the same model with every
    approximation off (its exact twin, copied before the surgery and sharing
    its weights). It logs them as scalars ``grad_cosine/<module path>``
    through the message hub (so every visualizer backend draws the curves;
    the text log repeats the latest measurement until the next) and one line
    naming the lowest layer. A measurement costs two more forward and
    backward passes on the batch (the exact model and the model as
    configured; no optimizer step, parameters' precision without the step's
    autocast); it changes no weight, ``.grad``, BatchNorm statistic or
    random state, so training ends with the same weights as without it.
    A layer whose cosine stays below ``fidelity_warn`` for 3 measurements in
    a row is warned about once, with the radius to check next: half its
    radius, rounded down (1: no filtering). Tools that only call
    :meth:`apply` (``tools/benchmark.py``) never measure.

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
        fidelity_interval (int, optional): Measure the gradient fidelity
            every this many training iterations. Defaults to None: never.
        fidelity_warn (float): The cosine, in (-1, 1], below which a layer
            is warned about (after 3 measurements in a row). Defaults to 0.5.
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 filter_install: Sequence[dict] = (),
                 freeze_layers: Sequence[str] = (),
                 norm_eval: bool = True,
                 lean_memory: bool = True,
                 filter_norm: Optional[bool] = None,
                 fidelity_interval: Optional[int] = None,
                 fidelity_warn: float = 0.5) -> None:
        self.recipe = self._checked(
            filter_install=filter_install, freeze_layers=freeze_layers,
            norm_eval=norm_eval, lean_memory=lean_memory,
            filter_norm=filter_norm)
        name = type(self).__name__
        if fidelity_interval is not None and (
                isinstance(fidelity_interval, bool)
                or not isinstance(fidelity_interval, int)
                or fidelity_interval < 1):
            raise ValueError(f'{name}: fidelity_interval must be a positive '
                             f'int or None, got {fidelity_interval!r}')
        if (isinstance(fidelity_warn, bool)
                or not isinstance(fidelity_warn, (int, float))
                or not -1 < fidelity_warn <= 1):
            raise ValueError(f'{name}: fidelity_warn must be a number in '
                             f'(-1, 1], got {fidelity_warn!r}')
        self.fidelity_interval = fidelity_interval
        self.fidelity_warn = float(fidelity_warn)
        self._exact: Optional[nn.Module] = None  # the model's exact twin
        self._below: Dict[str, int] = {}  # measurements in a row below warn
        self._warned: set = set()

    def _checked(self, **args) -> GradientFilterRecipe:
        """The recipe of ``args`` (a change of :attr:`recipe` when it
        exists); a bad value is an error naming this hook."""
        try:
            if hasattr(self, 'recipe'):
                return self.recipe.replace(**args)
            return GradientFilterRecipe(**args)
        except (TypeError, ValueError) as err:
            raise type(err)(f'{type(self).__name__}: {err}') from None

    filter_install = _recipe_field('filter_install')
    freeze_layers = _recipe_field('freeze_layers')
    norm_eval = _recipe_field('norm_eval')
    lean_memory = _recipe_field('lean_memory')
    filter_norm = _recipe_field('filter_norm')

    def apply(self, model: nn.Module) -> str:
        """Do the surgery on ``model``; return the report to log."""
        return self.recipe.apply(model).text()

    def before_run(self, runner) -> None:
        """Install the filters and freeze layers before the run starts."""
        wrapped = is_model_wrapper(runner.model)
        model = runner.model.module if wrapped else runner.model
        trainable_before = _trainable_ids(model)
        if self.fidelity_interval is not None:
            self._exact = exact_model(model, self.recipe)
        runner.logger.info(self.apply(model))
        if self._exact is not None:  # one set of weights from here on
            share_weights(self._exact, model)
        if (isinstance(runner.model, DistributedDataParallel)
                and _trainable_ids(model) != trainable_before):
            runner.model = None  # release the old wrapper and its reducer hooks
            runner.model = runner.wrap_model(
                runner.cfg.get('model_wrapper_cfg'), model)
            runner.logger.info('Wrapped the model in DDP again after freezing')

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        """Every ``fidelity_interval`` iterations, measure the gradient
        fidelity on the batch about to be trained and log it."""
        if (self._exact is None or data_batch is None or
                not self.every_n_train_iters(runner, self.fidelity_interval)):
            return
        model = (runner.model.module if is_model_wrapper(runner.model) else
                 runner.model)
        self._exact.train(model.training)
        start = time.perf_counter()
        rows = [r for r in gradient_fidelity(model, self._exact, data_batch)
                if r['weight_cos'] is not None]
        self.log_fidelity(runner, rows, time.perf_counter() - start)

    def log_fidelity(self, runner, rows: Sequence[Dict],
                     seconds: float) -> None:
        """Log one measurement (rows of
        :func:`~mmgradfilt.analysis.fidelity.gradient_fidelity`) that took
        ``seconds``, and warn about layers that stay below
        ``fidelity_warn``."""
        if not rows:
            runner.logger.warning('Gradient fidelity: no filtered layer got '
                                  'a weight gradient from the loss')
            return
        for row in rows:
            runner.message_hub.update_scalar(
                f'train/grad_cosine/{row["layer"]}', row['weight_cos'])
        low = min(rows, key=lambda r: r['weight_cos'])
        line = (f'Gradient fidelity at iter {runner.iter + 1} (weight-'
                'gradient cosine, model as configured vs exact): lowest '
                f'{low["weight_cos"]:.3f} at {low["layer"]}, mean '
                f'{statistics.fmean(r["weight_cos"] for r in rows):.3f} over '
                f'{len(rows)} filtered layer(s)')
        if not self._below:
            line += (f'; each measurement runs the exact model and the model '
                     'as configured on the batch (forward and backward, no '
                     f'optimizer step): {seconds:.2f} s this time')
        runner.logger.info(line)
        config = getattr(runner.cfg, 'filename', None) or 'CONFIG'
        for row in rows:
            path = row['layer']
            below = row['weight_cos'] < self.fidelity_warn
            self._below[path] = self._below.get(path, 0) + 1 if below else 0
            if self._below[path] >= WARN_AFTER and path not in self._warned:
                self._warned.add(path)
                radius = pair_label(row['radius'])
                half = pair_label(tuple(max(1, r // 2) for r in row['radius']))
                runner.logger.warning(
                    f'{path}: weight-gradient cosine below '
                    f'{self.fidelity_warn:g} for {WARN_AFTER} measurements in '
                    f'a row (latest {row["weight_cos"]:.3f}) at radius '
                    f'{radius}; compare half the radius on your data: python '
                    f'tools/grad_fidelity.py {config} --radius {half} '
                    f'{radius} (radius 1 filters nothing)')


def _trainable_ids(model: nn.Module) -> List[int]:
    return [id(p) for p in model.parameters() if p.requires_grad]


def recipe_from_config(cfg, required: bool = True) -> GradientFilterRecipe:
    """The recipe of ``cfg``'s ``GradientFilterHook`` (in ``custom_hooks``).

    Args:
        cfg (Config): A loaded config.
        required (bool): A config without the hook is an error; else it gets
            the hook's defaults (``GradientFilterRecipe()``). Defaults to
            True.

    Returns:
        GradientFilterRecipe: Checked as the hook checks it.

    Raises:
        ValueError: Unless the config has exactly one such hook (or, when not
            ``required``, none); the message names the config file and the
            count. ``TypeError`` or ``ValueError`` naming the config for a
            bad argument.
    """
    name = getattr(cfg, 'filename', None) or 'the config'
    hooks = [h for h in cfg.get('custom_hooks', None) or []
             if h.get('type') in ('GradientFilterHook', GradientFilterHook)]
    if not hooks and not required:
        return GradientFilterRecipe()
    if len(hooks) != 1:
        raise ValueError(f'{name} must have exactly one GradientFilterHook '
                         f'in custom_hooks, found {len(hooks)}')
    args = {k: v for k, v in hooks[0].items() if k not in ('type', 'priority')}
    try:
        return GradientFilterHook(**args).recipe
    except (TypeError, ValueError) as err:
        raise type(err)(f'{name}: {err}') from None
