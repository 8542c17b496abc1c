import glob
import os.path as osp
from typing import List, Optional, Tuple

import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop
from mmengine.utils import is_list_of


CHECKPOINT_HINT = ('See checkpoints/README.md for how to produce it (calib '
                   'configs) or convert an official one.')


def pretrained_checkpoints(model: nn.Module) -> List[Tuple[str, str]]:
    """``('init_cfg of <module>', checkpoint)`` of every ``Pretrained``
    init_cfg of ``model``."""
    found = []
    for name, module in model.named_modules():
        init_cfg = getattr(module, 'init_cfg', None)
        cfgs = init_cfg if is_list_of(init_cfg, dict) else [init_cfg]
        for cfg in cfgs:
            if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
                found.append((f'init_cfg of {name or type(model).__name__}',
                              cfg['checkpoint']))
    return found


def missing_checkpoints_error(wanted: List[Tuple[str, str]],
                              hint: str) -> Optional[FileNotFoundError]:
    """An error naming the local files of ``(what, checkpoint)`` pairs that
    do not exist, or None; remote ones (``scheme://``) are left to MMEngine.

    A missing ``<folder>/<config name>/<file>``, as a config of this
    repository's ``configs/`` writes it, comes with the command that trains
    that config (``make demo`` for the segmentation demo's).
    """
    missing = [(what, path) for what, path in wanted
               if '://' not in path and not osp.isfile(osp.expanduser(path))]
    if not missing:
        return None
    configs = osp.join(
        osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
        'configs')
    described = []
    for what, path in missing:
        text = f'"{path}" (set by {what})'
        folder = osp.basename(osp.dirname(path))
        makers = (glob.glob(osp.join(configs, '**', folder + '.py'),
                            recursive=True) if folder else [])
        if makers:
            commands = [f'python tools/train.py {osp.relpath(makers[0])}']
            if osp.basename(osp.dirname(makers[0])) == 'demo_seg':
                commands.insert(0, 'make demo')  # with the demo's data
            text += ', written by ' + ' or '.join(f'`{c}`' for c in commands)
        described.append(text)
    return FileNotFoundError('Missing checkpoint(s): ' + '; '.join(described) +
                             f'. {hint}')


@HOOKS.register_module()
class PretrainedCheckHook(Hook):
    """Fail at the start of a run when a local checkpoint it loads is missing.

    Checks ``load_from`` and, when training, every
    ``init_cfg=dict(type='Pretrained', ...)`` of the model in ``before_run``,
    before weights are initialised or loaded, so a missing file stops the run
    before its first iteration with one error naming every missing file and
    how to obtain it. Remote
    checkpoints (``scheme://``) are left to MMEngine.

    Args:
        hint (str): How to obtain a missing checkpoint, appended to the
            error. Defaults to a pointer to ``checkpoints/README.md``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, hint: str = CHECKPOINT_HINT) -> None:
        if not isinstance(hint, str):
            raise TypeError(f'hint must be a str, got {hint!r}')
        self.hint = hint

    def before_run(self, runner) -> None:
        """Check the checkpoints of ``load_from`` and of ``init_cfg``."""
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        wanted: List[Tuple[str, str]] = []
        if runner._load_from:
            wanted.append(('load_from', runner._load_from))
        if isinstance(runner._train_loop, BaseLoop):  # weights are initialised
            wanted += pretrained_checkpoints(model)
        error = missing_checkpoints_error(wanted, self.hint)
        if error is not None:
            raise error

