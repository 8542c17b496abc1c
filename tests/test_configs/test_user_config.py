"""A user's config in a folder of their own inherits ours by its path (the
form README shows) and gets our model, data and GradientFilterHook."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import PARAM_SCHEDULERS

pytest.importorskip('mmseg', reason='needs MMSegmentation')

PARENT = osp.abspath(
    osp.join(osp.dirname(__file__), '..', '..', 'configs', 'demo_seg',
             'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py'))


def last_lr(schedulers, iters):
    """The learning rate of the ``iters``-th iteration under ``schedulers``
    (MMEngine's, stepped after every iteration as the runner does) from a
    base rate of 1."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    built = [PARAM_SCHEDULERS.build(dict(s, optimizer=optimizer))
             for s in schedulers]
    for _ in range(iters - 1):
        optimizer.step()
        for scheduler in built:
            scheduler.step()
    return optimizer.param_groups[0]['lr']


@pytest.mark.parametrize('absolute', [True, False], ids=['absolute', 'relative'])
def test_user_config_elsewhere_inherits_ours(tmp_path, absolute):
    folder = tmp_path / 'my_configs'
    folder.mkdir()
    base = PARENT if absolute else osp.relpath(PARENT, folder)
    path = folder / 'digits_filt5L_adamw.py'
    path.write_text(
        f'_base_ = [{base!r}]\n'
        "optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', "
        'lr=1e-3, weight_decay=0.01))\n'
        'train_cfg = dict(max_iters=100, val_interval=100)\n'
        'param_scheduler = [\n'
        "    dict(type='LinearLR', start_factor=0.1, begin=0, end=20, "
        'by_epoch=False),\n'
        "    dict(type='CosineAnnealingLR', eta_min=1e-4, begin=20, end=100, "
        'by_epoch=False)\n'
        ']\n')
    cfg = Config.fromfile(str(path))
    parent = Config.fromfile(PARENT)
    assert cfg.custom_imports == parent.custom_imports
    assert cfg.custom_hooks == parent.custom_hooks
    assert cfg.custom_hooks[0].type == 'GradientFilterHook'
    assert cfg.model == parent.model
    assert dict(cfg.optim_wrapper.optimizer) == dict(
        type='AdamW', lr=1e-3, weight_decay=0.01)
    assert cfg.train_cfg.max_iters == 100
    # the parent's schedule runs to its own 300 iterations; README's delta
    # replaces the whole list, so the decay ends where the shorter run does
    assert parent.param_scheduler[-1].end == parent.train_cfg.max_iters == 300
    # the learning rate of the last iteration: the parent's schedule left as
    # it is ends a 100-iteration run near its peak, the scaled one at the end
    # of its decay
    assert last_lr(parent.param_scheduler, 100) > 0.5
    assert last_lr(cfg.param_scheduler, 100) < 1e-3
    assert cfg.train_dataloader == parent.train_dataloader
