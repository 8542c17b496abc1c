"""The weights an analysis runs on: a checkpoint, else the config's own
initialisation, with the shared checks for missing files."""
import logging
from typing import List, Optional, Tuple

import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import MMLogger, print_log
from mmengine.runner import load_checkpoint

from ..hooks.pretrained_check_hook import (CHECKPOINT_HINT,
                                           PretrainedCheckHook,
                                           missing_checkpoints_error,
                                           pretrained_checkpoints)


def checkpoint_hint(cfg: Config) -> str:
    """How to obtain a missing checkpoint: the hint of the config's
    ``PretrainedCheckHook`` (what its training run would say), else the
    default one."""
    for hook in [*cfg.get('default_hooks', {}).values(),
                 *cfg.get('custom_hooks', [])]:
        if isinstance(hook, dict) and hook.get('type') in (
                'PretrainedCheckHook', PretrainedCheckHook):
            return hook.get('hint', CHECKPOINT_HINT)
    return CHECKPOINT_HINT


def wanted_checkpoints(model: nn.Module,
                       checkpoint: Optional[str]) -> List[Tuple[str, str]]:
    """``(what, file)`` of what loading ``model``'s weights reads."""
    if checkpoint:
        return [('--checkpoint or load_from', checkpoint)]
    return pretrained_checkpoints(model)


def check_weights(model: nn.Module, checkpoint: Optional[str],
                  cfg: Config) -> None:
    """Raise ``FileNotFoundError`` naming every missing local file that
    :func:`load_weights` would read."""
    error = missing_checkpoints_error(wanted_checkpoints(model, checkpoint),
                                      checkpoint_hint(cfg))
    if error is not None:
        raise error


def load_weights(model: nn.Module, checkpoint: Optional[str]) -> str:
    """Load ``checkpoint`` into ``model``, else run its initialisation
    (pretrained parts included; a warning where there are none, since
    gradients of random weights say little); return what was used."""
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu',
                        logger='current')
        return checkpoint
    pretrained = bool(pretrained_checkpoints(model))
    if not pretrained:
        print_log('no checkpoint and no pretrained parts: gradient fidelity '
                  'of randomly initialised weights says little about '
                  'training', logger='current', level=logging.WARNING)
    # without a log file, MMEngine prints how it initialised each parameter
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return 'the config\'s initialisation' if pretrained else \
        'random initialisation'
