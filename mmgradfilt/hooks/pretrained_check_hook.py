import glob
import os
import os.path as osp
from typing import List, Optional, Tuple

import torch.nn as nn
from mmengine.config import Config
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


REPO_ROOT = osp.dirname(
    osp.dirname(osp.dirname(osp.abspath(__file__))))


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies under it,
    else absolute: what a command typed here can use."""
    path = osp.abspath(path)
    relative = osp.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def kept_checkpoints(cfg: Config) -> List[str]:
    """The checkpoint files (``iter_N.pth``/``epoch_N.pth``) that training
    ``cfg`` leaves behind, by its ``CheckpointHook``'s ``interval``,
    ``max_keep_ckpts`` and ``save_last`` and the training loop's length;
    empty where the config does not say (no checkpoint hook, a length the
    hook does not count in)."""
    hook = cfg.get('default_hooks', {}).get('checkpoint')
    train_cfg = cfg.get('train_cfg') or {}
    if not isinstance(hook, dict) or not hook.get('interval', -1) > 0:
        return []
    by_epoch = hook.get('by_epoch', True)
    length = train_cfg.get('max_epochs' if by_epoch else 'max_iters')
    if not isinstance(length, int) or length < 1:
        return []
    steps = list(range(hook['interval'], length + 1, hook['interval']))
    if hook.get('save_last', True) and length not in steps:
        steps.append(length)
    keep = hook.get('max_keep_ckpts', -1)
    if keep > 0:
        steps = steps[-keep:]
    template = hook.get('filename_tmpl') or (
        'epoch_{}.pth' if by_epoch else 'iter_{}.pth')
    return [template.format(step) for step in steps]


def _maker(path: str) -> Optional[str]:
    """What writes ``path``, when it is a checkpoint that training one of
    this repository's configs leaves in ``<folder>/<config name>/``: the
    commands, or the file that config writes there (a typo's likely
    target); None when no config is named so."""
    folder = osp.basename(osp.dirname(osp.abspath(path)))
    configs = glob.glob(
        osp.join(REPO_ROOT, 'configs', '**', folder + '.py'), recursive=True)
    if not folder or not configs:
        return None
    config = configs[0]
    try:
        cfg = Config.fromfile(config)
    except Exception:  # a config that does not load names nothing
        return None
    kept = kept_checkpoints(cfg)
    out_dir = kept and cfg.default_hooks.checkpoint.get('out_dir')
    written = osp.join(out_dir or 'work_dirs', folder)
    if osp.basename(path) not in kept:
        if not kept:
            return None
        return (f'no such file; {_shown(config)} writes '
                f'{osp.join(written, kept[-1])}, not this name')
    commands = [f'python {_shown(osp.join(REPO_ROOT, "tools", "train.py"))} '
                f'{_shown(config)}']
    if (osp.basename(osp.dirname(config)) == 'demo_seg'
            and osp.abspath(os.getcwd()) == REPO_ROOT):
        commands.insert(0, 'make demo')  # with the demo's data
    text = 'written by ' + ' or '.join(f'`{c}`' for c in commands)
    written = osp.join(written, osp.basename(path))
    if osp.abspath(written) != osp.abspath(path):
        text += f' as {written}, not at this path'
    return text


def missing_checkpoints_error(wanted: List[Tuple[str, str]],
                              hint: str) -> Optional[FileNotFoundError]:
    """An error naming the local files of ``(what, checkpoint)`` pairs that
    do not exist, or None; remote ones (``scheme://``) are left to MMEngine.

    A missing ``<folder>/<config name>/<file>`` that training a config of
    this repository's ``configs/`` leaves behind comes with the command that
    trains it (``make demo`` too for the segmentation demo's, from the
    repository's root); another file in such a folder (a typo) with the
    name that config does write.
    """
    missing = [(what, path) for what, path in wanted
               if '://' not in path and not osp.isfile(osp.expanduser(path))]
    if not missing:
        return None
    described = []
    for what, path in missing:
        maker = _maker(osp.expanduser(path))
        described.append(f'"{path}" (set by {what})' +
                         (f', {maker}' if maker else ''))
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

