import copy
import os
import os.path as osp
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.registry import DATASETS, MODELS
from mmengine.testing import RunnerTestCase
from torch.utils.data import Dataset

from mmgradfilt import GradFilterConv2d, GradientFilterHook
from mmgradfilt.memory import LeanReLU


class ToyConvModel(BaseModel):
    """Three conv layers with BatchNorm, regressing a 2-channel map."""

    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.head(self.body(self.stem(torch.stack(inputs))))
        if mode == 'loss':
            return dict(loss=F.mse_loss(out, torch.stack(data_samples)))
        return out


class ToyImageDataset(Dataset):
    """16 fixed 16x16 images and targets."""
    METAINFO = dict()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=gen)
    targets = torch.rand(16, 2, 16, 16, generator=gen)

    @property
    def metainfo(self):
        return self.METAINFO

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return dict(inputs=self.images[index],
                    data_samples=self.targets[index])


HOOK = dict(
    type='GradientFilterHook',
    filter_install=[dict(path='body', radius=4),
                    dict(path='head', radius=2)],
    freeze_layers=['stem'])


class TestGradientFilterHook(RunnerTestCase):

    def setUp(self):
        super().setUp()
        MODELS.register_module(module=ToyConvModel, force=True)
        DATASETS.register_module(module=ToyImageDataset, force=True)
        cfg = self.iter_based_cfg
        cfg.model = dict(type='ToyConvModel')
        cfg.train_dataloader.dataset = dict(type='ToyImageDataset')
        cfg.train_dataloader.sampler = dict(
            type='InfiniteSampler', shuffle=False)
        cfg.train_cfg = dict(by_epoch=False, max_iters=4, val_interval=100)
        cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
        cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
        cfg.optim_wrapper = dict(
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
        cfg.default_hooks.checkpoint = dict(
            type='CheckpointHook', interval=2, by_epoch=False)
        cfg.custom_hooks = [HOOK]
        cfg.randomness = dict(seed=0)

    def tearDown(self):
        MODELS.module_dict.pop('ToyConvModel', None)
        DATASETS.module_dict.pop('ToyImageDataset', None)
        super().tearDown()

    def test_trains_filtered_and_frozen(self):
        runner = self.build_runner(copy.deepcopy(self.iter_based_cfg))
        model = runner.model
        stem_before = copy.deepcopy(model.stem.state_dict())
        body_weight = model.body[0].weight
        body_before = body_weight.detach().clone()
        runner.train()

        assert isinstance(model.body[0], GradFilterConv2d)
        assert model.body[0].radius == (4, 4)
        assert model.head.radius == (2, 2)
        assert type(model.stem[0]) is nn.Conv2d
        # same Parameter object, so the optimizer updated it
        assert model.body[0].weight is body_weight
        assert not torch.allclose(body_weight, body_before)
        for key, value in model.stem.state_dict().items():
            assert torch.equal(value, stem_before[key]), key
        assert not model.stem[1].training  # frozen BN kept in eval mode
        log = open(osp.join(runner.log_dir,
                            f'{runner.timestamp}.log')).read()
        assert 'Gradient filter on 2 conv(s)' in log
        assert 'body.0' in log and 'Trainable parameters: 618 / 858' in log
        # stem is frozen (its BatchNorm kept in eval), body and head train
        assert 'Trained modules: body, head\n' in log
        assert 'Frozen BatchNorms in eval mode (running statistics fixed): 1' \
            in log

    def test_lean_memory_trains_exactly_as_without(self):
        states, logs = [], []
        for lean_memory in (False, True):
            cfg = copy.deepcopy(self.iter_based_cfg)
            # filter_norm (on with lean_memory by default) is approximate
            cfg.custom_hooks = [dict(HOOK, lean_memory=lean_memory,
                                     filter_norm=False)]
            cfg.work_dir = osp.join(self.temp_dir.name, str(lean_memory))
            cfg.experiment_name = f'lean_{lean_memory}'
            runner = self.build_runner(cfg)
            runner.train()
            states.append(runner.model.state_dict())
            logs.append(open(osp.join(runner.log_dir,
                                      f'{runner.timestamp}.log')).read())
        # 1-bit masks give torch's gradients bit for bit
        assert states[0].keys() == states[1].keys()
        for key, value in states[0].items():
            assert torch.equal(states[1][key], value), key
        assert type(runner.model.body[2]) is LeanReLU
        assert 'Lean memory' not in logs[0]
        assert 'Lean memory: 2 of 2 part(s) lean:' in logs[1]
        # one row per kind of change, naming its modules
        assert ('activation  stem.2, body.2  installed  ReLU -> 1-bit mask'
                in logs[1])
        # the lines before it are kept
        assert 'Trained modules: body, head\n' in logs[1]

    def test_resume_continues_exactly(self):
        cfg = copy.deepcopy(self.iter_based_cfg)
        runner = self.build_runner(cfg)
        runner.train()
        final = copy.deepcopy(runner.model.state_dict())

        cfg = copy.deepcopy(self.iter_based_cfg)
        cfg.work_dir = osp.join(self.temp_dir.name, 'resumed')
        cfg.load_from = osp.join(self.temp_dir.name, 'iter_2.pth')
        cfg.resume = True
        resumed = self.build_runner(cfg)
        resumed.train()
        assert resumed.iter == 4
        assert isinstance(resumed.model.body[0], GradFilterConv2d)
        for key, value in resumed.model.state_dict().items():
            torch.testing.assert_close(value, final[key], msg=key)

    def test_distributed_needs_no_find_unused_parameters(self):
        self.setup_dist_env()
        # a free port: RunnerTestCase counts up from a fixed one, which another
        # test process on this machine may hold
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            os.environ['MASTER_PORT'] = str(sock.getsockname()[1])
        # MMEngine's own init_dist needs CUDA; on CPU start gloo first
        torch.distributed.init_process_group('gloo')
        cfg = copy.deepcopy(self.iter_based_cfg)
        cfg.launcher = 'pytorch'
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None)
        runner = self.build_runner(cfg)
        old_wrapper = runner.model
        runner.train()
        assert is_model_wrapper(runner.model)
        assert runner.model is not old_wrapper
        assert not runner.model.find_unused_parameters
        assert isinstance(runner.model.module.body[0], GradFilterConv2d)
        assert runner.iter == 4


def test_hook_rejects_bad_config_at_build():
    with pytest.raises(ValueError, match='radius'):
        GradientFilterHook(filter_install=[dict(path='body', radius=0)])
    with pytest.raises(ValueError, match='dict\\(path=..., radius=...\\)'):
        GradientFilterHook(filter_install=[dict(path='body', r=4)])
    with pytest.raises(TypeError, match='list of str'):
        GradientFilterHook(freeze_layers='backbone')


# None is filter_norm's default: follow lean_memory
@pytest.mark.parametrize('name,value', [
    (name, value) for name in ('lean_memory', 'filter_norm', 'norm_eval')
    for value in ('yes', 1, None) if (name, value) != ('filter_norm', None)])
def test_hook_rejects_non_bool_flags(name, value):
    with pytest.raises(TypeError, match=f'{name} must be a bool(?: or None)?, '
                       f'got {value!r}'):
        GradientFilterHook(**{name: value})


def test_filter_norm_follows_lean_memory_by_default():
    assert GradientFilterHook().filter_norm is True
    assert GradientFilterHook(lean_memory=False).filter_norm is False
    assert GradientFilterHook(filter_norm=False).filter_norm is False


def test_hook_rejects_filter_norm_without_lean_memory():
    with pytest.raises(ValueError, match='needs lean_memory=True'):
        GradientFilterHook(lean_memory=False, filter_norm=True)
