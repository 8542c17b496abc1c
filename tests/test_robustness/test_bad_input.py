"""Bad input: one clear error or warning each, before any training step."""
import copy
import os.path as osp
import re
import uuid

import pytest
import torch
from mmengine.runner import Runner

from mmgradfilt import GradFilterConv2d

pytest.importorskip('mmseg', reason='needs MMSegmentation')

ASPP = dict(path='decode_head.aspp_modules', radius=2)
OLD_FILES = {'iter_2.pth': b'an earlier run', 'last_checkpoint': b'iter_2.pth'}


@pytest.fixture
def work_dir(tmp_path):
    """A work_dir holding files of an earlier run."""
    for name, content in OLD_FILES.items():
        (tmp_path / name).write_bytes(content)
    return tmp_path


def _build(seg_cfg, work_dir, max_iters=1, **hook):
    cfg = copy.deepcopy(seg_cfg)
    cfg.work_dir = str(work_dir)
    # a new name each time: MMLogger keeps one instance (and log file) per name
    cfg.experiment_name = f'bad_input_{uuid.uuid4().hex}'
    cfg.train_cfg.max_iters = max_iters
    cfg.custom_hooks = [dict(type='GradientFilterHook', **hook)]
    return Runner.from_cfg(cfg)


def _assert_nothing_lost(work_dir):
    for name, content in OLD_FILES.items():
        assert (work_dir / name).read_bytes() == content, name
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth']


def _log(runner):
    return open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()


@pytest.mark.parametrize('radius', [0, -1, 2.5, '2', (2, 0), True])
def test_bad_radius_fails_when_the_runner_is_built(seg_cfg, work_dir, radius):
    path = 'decode_head.aspp_modules'
    entry = dict(path=path, radius=radius)
    # the message names the entry (index, path, value) and the rule it broke
    message = (f'filter_install[1] = {entry!r}: radius must be a positive int '
               f'or a pair of them, got {radius!r}')
    with pytest.raises(ValueError, match=re.escape(message)):
        _build(seg_cfg, work_dir, filter_install=[ASPP, entry])
    _assert_nothing_lost(work_dir)


@pytest.mark.parametrize('hook,error,message', [
    (dict(filter_install=[ASPP, dict(path='decode_head.aspp_module.1',
                                     radius=2)]),
     ValueError, '"decode_head.aspp_module.1" is not a submodule of '
     'EncoderDecoder.* Nearest valid paths: decode_head.aspp_modules.1'),
    (dict(filter_install=[ASPP, dict(path='decode_head.conv_seg.bias',
                                     radius=2)]),
     ValueError, '"decode_head.conv_seg" has no "bias"'),
    (dict(filter_install=[ASPP, dict(path='decode_head.image_pool.0',
                                     radius=2)]),
     TypeError, '"decode_head.image_pool.0" \\(AdaptiveAvgPool2d\\) contains '
     'no nn.Conv2d: only convolutions can be filtered'),
    (dict(filter_install=[ASPP], freeze_layers=['backbone', '~backbone.lyer4']),
     ValueError, '"backbone" has no "lyer4" \\(its children: .*layer4'),
], ids=['unknown-path', 'parameter-path', 'non-conv', 'unknown-freeze-path'])
def test_bad_path_fails_before_the_first_step(seg_cfg, work_dir, hook, error,
                                              message):
    runner = _build(seg_cfg, work_dir, **hook)
    weights = copy.deepcopy(runner.model.state_dict())
    with pytest.raises(error, match=message):
        runner.train()
    assert runner.iter == 0
    # nothing half-done: the valid item before the bad one changed nothing
    assert not any(isinstance(m, GradFilterConv2d)
                   for m in runner.model.modules())
    assert all(p.requires_grad for p in runner.model.parameters())
    for key, value in runner.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    _assert_nothing_lost(work_dir)


def test_filter_on_frozen_layer_warns_before_the_first_step(seg_cfg, tmp_path):
    runner = _build(seg_cfg, tmp_path, freeze_layers=['backbone'],
                    filter_install=[ASPP, dict(path='backbone.layer4.1',
                                               radius=2)])
    runner.train()
    log = _log(runner)
    warning = ('Gradient filters on frozen convs (their weights get no '
               'gradient): backbone.layer4.1.conv1, backbone.layer4.1.conv2')
    assert log.count(warning) == 1
    assert log.index(warning) < log.index('Iter(train) [1/1]')


def test_map_smaller_than_patch_warns_once_per_layer(seg_cfg, tmp_path):
    # 32x32 images give 4x4 maps in the ASPP head; radius 8 patches are larger
    runner = _build(seg_cfg, tmp_path, max_iters=2,
                    filter_install=[dict(path='decode_head', radius=8)])
    runner.train()
    log = _log(runner)
    warnings = [line for line in log.splitlines()
                if 'smaller than the 8x8 gradient patch' in line]
    # once for each of the 7 convs of the head (image pool, ASPP, bottleneck,
    # conv_seg), not once per iteration
    assert len(warnings) == 7, warnings
    assert ('GradFilterConv2d(128, 16, kernel_size=(3, 3), stride=(1, 1), '
            'padding=(4, 4), dilation=(4, 4), bias=False, radius=(8, 8)): its '
            '4x4 output is smaller than the 8x8 gradient patch, so the filter '
            'averages the gradient over the whole map; use a radius of at most '
            '4') in log
    assert log.rindex('gradient patch') < log.index('Iter(train) [1/2]')
