"""A user's config in a folder of their own inherits ours by its path (the
form README shows) and gets our model, data and GradientFilterHook."""
import os.path as osp

import pytest
from mmengine.config import Config

pytest.importorskip('mmseg', reason='needs MMSegmentation')

PARENT = osp.abspath(
    osp.join(osp.dirname(__file__), '..', '..', 'configs', 'demo_seg',
             'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py'))


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
        'train_cfg = dict(max_iters=100)\n')
    cfg = Config.fromfile(str(path))
    parent = Config.fromfile(PARENT)
    assert cfg.custom_imports == parent.custom_imports
    assert cfg.custom_hooks == parent.custom_hooks
    assert cfg.custom_hooks[0].type == 'GradientFilterHook'
    assert cfg.model == parent.model
    assert dict(cfg.optim_wrapper.optimizer) == dict(
        type='AdamW', lr=1e-3, weight_decay=0.01)
    assert cfg.train_cfg.max_iters == 100
    assert cfg.train_dataloader == parent.train_dataloader
