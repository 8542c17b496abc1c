"""GradientFilterHook's fidelity monitor: scalars through a real Runner on a
few digits images, training unchanged by it, the warning, bad arguments."""
import copy
import json
import logging
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.runner import Runner

from mmgradfilt import GradientFilterHook

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..', '..', '..'))
FILT = osp.join(ROOT, 'configs', 'demo_seg',
                'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py')
CONVS = ['decode_head.bottleneck.conv',
         *(f'decode_head.aspp_modules.{i}.conv' for i in range(4))]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    pytest.importorskip('mmseg', reason='needs MMSegmentation')
    from mmgradfilt.datasets import make_digits_seg
    root = str(tmp_path_factory.mktemp('digits_seg'))
    make_digits_seg(root, splits=dict(shift_train=('target', 4)))
    return root


def demo_cfg(data_root, work_dir, **hook_args):
    """The demo's filt5L fine-tuning, 6 iterations of 2 images from random
    weights, no validation or checkpoints."""
    cfg = Config.fromfile(FILT)
    cfg.train_dataloader.dataset.data_root = data_root
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=6,
                         val_interval=100)
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 2
    cfg.load_from = None
    cfg.custom_hooks[0].update(hook_args)
    cfg.work_dir = work_dir
    return cfg


def test_monitor_logs_scalars_and_leaves_training_unchanged(data_root,
                                                            tmp_path):
    states, runners = [], []
    for interval in (None, 2):
        cfg = demo_cfg(data_root, str(tmp_path / str(interval)),
                       fidelity_interval=interval, fidelity_warn=1.0)
        cfg.experiment_name = f'monitor_{interval}'
        # a visualizer of its own, writing to its own log folder
        cfg.visualizer.name = f'monitor_{interval}'
        runner = Runner.from_cfg(cfg)
        runner.train()
        states.append(copy.deepcopy(runner.model.state_dict()))
        runners.append(runner)
    # the same weights and BatchNorm statistics, bit for bit
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key

    runner = runners[1]
    # the exact twin holds no weights of its own
    hook = next(h for h in runner.hooks if isinstance(h, GradientFilterHook))
    head = runner.model.decode_head
    assert hook._exact.decode_head.bottleneck.conv.weight is \
        head.bottleneck.conv.weight
    assert hook._exact.decode_head.bottleneck.bn.running_mean is \
        head.bottleneck.bn.running_mean
    norms = [path[:-len('conv')] + 'bn' for path in CONVS]
    for path in CONVS + norms:
        history = runner.message_hub.get_scalar(f'train/grad_cosine/{path}')
        values = history.data[0]
        assert len(values) == 3, path  # iterations 2, 4 and 6
        assert all(-1 <= v < 1 for v in values), path
    assert not any(key.startswith('train/grad_cosine') for key in
                   runners[0].message_hub.log_scalars)
    # every visualizer backend gets them: the local one's scalars file
    scalars = [json.loads(line) for line in open(osp.join(
        runner.log_dir, 'vis_data', 'scalars.json'))]
    logged = [s for s in scalars if 'grad_cosine/' + CONVS[0] in s]
    assert [s['step'] for s in logged] == [2, 4, 6]
    log = open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert log.count('Gradient fidelity at iter') == 3
    assert 'Gradient fidelity at iter 2 (weight-gradient cosine' in log
    assert log.count('each measurement runs the exact model') == 1
    # fidelity_warn=1: every layer is below it; warned once, at the third
    for path in CONVS:
        assert log.count(f'{path}: weight-gradient cosine below 1 for 3 '
                         'measurements in a row') == 1, path
    assert f'python tools/grad_fidelity.py {FILT} --radius 1 2' in log


def fake_runner(tmp_path):
    logger = logging.getLogger('fidelity_monitor_test')
    records = []
    logger.handlers = [logging.Handler()]
    logger.handlers[0].emit = records.append
    logger.setLevel(logging.INFO)
    runner = SimpleNamespace(
        iter=0, logger=logger, cfg=SimpleNamespace(filename='my.py'),
        message_hub=MessageHub.get_instance(f'monitor-{tmp_path}'))
    return runner, records


def row(layer, cos, radius=(4, 4)):
    return dict(layer=layer, weight_cos=cos, radius=radius)


def test_warning_after_three_in_a_row_once(tmp_path):
    hook = GradientFilterHook(fidelity_interval=10, fidelity_warn=0.5)
    runner, records = fake_runner(tmp_path)

    def warnings():
        return [r.getMessage() for r in records
                if r.levelno == logging.WARNING]

    # a dip that recovers resets the count
    for cos in (0.4, 0.3, 0.9, 0.2, 0.1):
        hook.log_fidelity(runner, [row('a', cos), row('b', 0.8)], 1.0)
    assert warnings() == []
    hook.log_fidelity(runner, [row('a', 0.45), row('b', 0.8)], 1.0)
    assert warnings() == [
        'a: weight-gradient cosine below 0.5 for 3 measurements in a row '
        '(latest 0.450) at radius 4; compare half the radius on your data: '
        'python tools/grad_fidelity.py my.py --radius 2 4 (radius 1 filters '
        'nothing)']
    for _ in range(4):  # once only
        hook.log_fidelity(runner, [row('a', 0.1), row('b', 0.8)], 1.0)
    assert len(warnings()) == 1
    # the lowest layer, in one line per measurement
    assert 'lowest 0.100 at a, mean 0.450 over 2 filtered layer(s)' in \
        records[-1].getMessage()
    assert runner.message_hub.get_scalar('train/grad_cosine/b').current() \
        == 0.8


@pytest.mark.parametrize('value', [0, -5, 2.5, True, '50'])
def test_bad_fidelity_interval(value):
    with pytest.raises(ValueError) as err:
        GradientFilterHook(fidelity_interval=value)
    assert 'GradientFilterHook' in str(err.value)
    assert f'fidelity_interval must be a positive int or None, got ' \
        f'{value!r}' in str(err.value)


@pytest.mark.parametrize('value', [-1, 1.01, -3, 'high', None, False])
def test_bad_fidelity_warn(value):
    with pytest.raises(ValueError) as err:
        GradientFilterHook(fidelity_warn=value)
    assert 'GradientFilterHook' in str(err.value)
    assert f'got {value!r}' in str(err.value)


def test_monitor_off_by_default():
    hook = GradientFilterHook(fidelity_warn=1)
    assert hook.fidelity_interval is None and hook.fidelity_warn == 1.0
