from typing import Any, List, Optional, Sequence

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.parallel import DistributedDataParallel

from ..surgery import GradientFilterRecipe


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
        self.recipe = self._checked(
            filter_install=filter_install, freeze_layers=freeze_layers,
            norm_eval=norm_eval, lean_memory=lean_memory,
            filter_norm=filter_norm)

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
        runner.logger.info(self.apply(model))
        if (isinstance(runner.model, DistributedDataParallel)
                and _trainable_ids(model) != trainable_before):
            runner.model = None  # release the old wrapper and its reducer hooks
            runner.model = runner.wrap_model(
                runner.cfg.get('model_wrapper_cfg'), model)
            runner.logger.info('Wrapped the model in DDP again after freezing')


def _trainable_ids(model: nn.Module) -> List[int]:
    return [id(p) for p in model.parameters() if p.requires_grad]


def recipe_from_config(cfg) -> GradientFilterRecipe:
    """The recipe of ``cfg``'s ``GradientFilterHook`` (in ``custom_hooks``).

    Args:
        cfg (Config): A loaded config.

    Returns:
        GradientFilterRecipe: Checked as the hook checks it.

    Raises:
        ValueError: Unless the config has exactly one such hook (the message
            names the config file and the count); ``TypeError`` or
            ``ValueError`` naming the config for a bad argument.
    """
    name = getattr(cfg, 'filename', None) or 'the config'
    hooks = [h for h in cfg.get('custom_hooks', None) or []
             if h.get('type') in ('GradientFilterHook', GradientFilterHook)]
    if len(hooks) != 1:
        raise ValueError(f'{name} must have exactly one GradientFilterHook '
                         f'in custom_hooks, found {len(hooks)}')
    args = {k: v for k, v in hooks[0].items() if k not in ('type', 'priority')}
    try:
        return GradientFilterHook(**args).recipe
    except (TypeError, ValueError) as err:
        raise type(err)(f'{name}: {err}') from None
