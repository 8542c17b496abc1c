"""Every classification config loads, builds offline and trains one step."""
import copy
import functools
import glob
import os.path as osp
import re

import numpy as np
import pytest
import torch

pytest.importorskip('mmpretrain', reason='the classification configs build '
                    'MMPretrain models')

import cv2  # noqa: E402
from mmcv.transforms import Compose  # noqa: E402
from mmengine.config import Config, utils  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import HOOKS, init_default_scope  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402

from mmgradfilt import GradFilterConv2d  # noqa: E402
from mmgradfilt.benchmark import step  # noqa: E402
from mmgradfilt.hooks import recipe_from_config  # noqa: E402
from mmgradfilt.hooks.pretrained_check_hook import (  # noqa: E402
    CHECKPOINT_HINT, missing_checkpoints_error, pretrained_checkpoints)

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', 'configs')
CONFIGS = sorted(
    path for folder in ('mobilenet_v2', 'resnet', 'mcunet', 'demo_cls')
    for path in glob.glob(osp.join(CONFIG_ROOT, folder, '*.py')))
# a '-cache' variant is its parent plus FrozenFeatureCacheHook
VARIANT = re.compile(
    r'_(full|pretrain|base-last(\d)|filt-last(\d)-r(\d))(-cache)?_')
_models = {}  # built models by config, copied per test


@pytest.fixture(autouse=True, scope='module')
def fast_cpu():
    """Speed-ups that change no result.

    MMEngine re-reads all of MMPretrain's metafiles for every ``mmpretrain::``
    base (0.2 s each): read them once. Random weights with BatchNorm in eval
    mode shrink activations into denormals, which slow CPU kernels ~20x:
    flush them. Tiny tensors run faster on one thread, above all on a busy
    machine.
    """
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, '_get_cfg_metainfo',
                   functools.lru_cache(utils._get_cfg_metainfo))
        torch.set_flush_denormal(True)
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def build_model(cfg):
    """The config's model with its data preprocessor, as the Runner builds
    it (random weights); built once per model config."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    key = repr(model_cfg)
    if key not in _models:
        _models[key] = step.build_model(cfg, model_cfg)
    return copy.deepcopy(_models[key]).train()


def one_batch(num_classes):
    gen = torch.Generator().manual_seed(0)
    return dict(
        inputs=[torch.randint(0, 256, (3, 32, 32), generator=gen,
                              dtype=torch.uint8) for _ in range(2)],
        data_samples=[DataSample().set_gt_label(i % num_classes)
                      for i in range(2)])


def test_configs_found():
    assert len(CONFIGS) >= 4 * 3 * 18


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config(path):
    cfg = Config.fromfile(path)
    name = osp.basename(path)
    variant = VARIANT.search(name)
    assert variant, f'{name}: no variant in the name'
    kind = variant.group(1).split('-')[0]
    num_blocks = int(variant.group(2) or variant.group(3) or 0)
    radius = int(variant.group(4) or 0)

    # the user split in the name is the partition trained and validated on
    user = int(re.search(r'-user(\d)\.py$', name).group(1))
    assert cfg.train_dataloader.dataset.partition == user
    assert cfg.val_dataloader.dataset.partition == user
    if kind == 'pretrain':
        assert cfg.load_from is None and not cfg.model.backbone.norm_eval
        if 'digits' not in name:  # the demo pretrains from scratch
            assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    else:  # fine-tuning loads what the pretrain config of its folder writes
        pretrain = osp.basename(osp.dirname(cfg.load_from)) + '.py'
        assert osp.isfile(osp.join(osp.dirname(path), pretrain)), pretrain

    model = build_model(cfg)
    hooks = [h for h in cfg.custom_hooks if h.type == 'GradientFilterHook']
    assert len(hooks) == (kind in ('base', 'filt'))
    assert len([h for h in cfg.custom_hooks
                if h.type == 'FrozenFeatureCacheHook']) == bool(variant[5])
    for hook in hooks:
        HOOKS.build(hook).apply(model)

    filtered = {n: m.radius for n, m in model.named_modules()
                if isinstance(m, GradFilterConv2d)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if kind in ('base', 'filt'):
        blocks = tuple(f'{b}.' for b in cfg.last_blocks[:num_blocks])
        assert trainable == {
            n for n, _ in model.named_parameters()
            if n.startswith(blocks) or n.startswith('head.')}
        convs = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and n.startswith(blocks)}
        assert set(filtered) == (convs if kind == 'filt' else set())
        assert set(filtered.values()) <= {(radius, radius)}
    else:
        assert not filtered
        assert trainable == {n for n, _ in model.named_parameters()}

    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = model.train_step(
        one_batch(cfg.model.head.num_classes), optim_wrapper)
    assert torch.isfinite(log['loss'])
    changed = {n for n, p in model.named_parameters()
               if not torch.equal(p, before[n])}
    # random weights and 2 images make huge gradients, which clipping scales
    # down below float resolution for some parameters: check the frozen ones
    assert changed and changed <= trainable


def test_mcunet_trains_offline(tmp_path, monkeypatch):
    """An MCUNet config builds with no file at all (its architecture is
    built in, its weights random) and one step at the model's 96x96 input
    trains the filtered blocks only; its ImageNet weights stay a local file
    whose absence the run reports."""
    monkeypatch.chdir(tmp_path)  # no data/ to read from
    folder = osp.join(CONFIG_ROOT, 'mcunet')
    cfg = Config.fromfile(osp.join(
        folder, 'mcunet-5fps_filt-last2-r4_1xb128-50e_cifar10-user1.py'))
    model = build_model(cfg)
    recipe_from_config(cfg).apply(model)
    filtered = {n: m for n, m in model.named_modules()
                if isinstance(m, GradFilterConv2d)}
    # expand, depthwise and project conv of the last two blocks
    assert len(filtered) == 6 and all(
        n.startswith(('backbone.blocks.13.', 'backbone.blocks.12.'))
        for n in filtered)

    train = step.TrainStep(model, cfg.optim_wrapper,
                           step.synthetic_batch(cfg, 2, (96, 96)))
    train.forward()
    train.backward()
    for name, conv in filtered.items():
        grad = conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(n).grad is None
                          for n in frozen)
    before = {n: m.weight.detach().clone() for n, m in filtered.items()}
    train.optimizer()
    assert any(not torch.equal(m.weight, before[n])
               for n, m in filtered.items())

    pretrain = Config.fromfile(osp.join(
        folder, 'mcunet-5fps_pretrain_1xb128-50e_cifar10-user0.py'))
    error = missing_checkpoints_error(
        pretrained_checkpoints(build_model(pretrain)), CHECKPOINT_HINT)
    assert 'data/pretrained/mcunet-5fps_imagenet.pth' in str(error)


@pytest.mark.parametrize('piece, raw_side, side', [
    ('cifar10_user-split_bs128', 32, 224),
    ('cifar100_user-split_bs128', 32, 224),
    ('imagenet_user-split_bs64', None, 224),
    ('digits_user-split_bs32', 64, 64),
])
def test_dataset_pipelines(piece, raw_side, side, tmp_path):
    """The pipelines of each dataset piece turn a raw sample into a batch."""
    cfg = Config.fromfile(
        osp.join(CONFIG_ROOT, '_base_', 'datasets', f'{piece}.py'))
    init_default_scope('mmpretrain')
    rng = np.random.default_rng(0)
    if raw_side is None:  # ImageNet reads image files
        path = str(tmp_path / 'img.png')
        cv2.imwrite(path, rng.integers(0, 256, (300, 400, 3), np.uint8))
        sample = dict(img_path=path)
    else:  # CIFAR and digits hold arrays
        sample = dict(img=rng.integers(0, 256, (raw_side, raw_side, 3),
                                       np.uint8))
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        assert loader.dataset.type == 'UserSplitDataset'
        packed = Compose(loader.dataset.dataset.pipeline)(
            dict(sample, gt_label=3))
        assert packed['inputs'].shape == (3, side, side)
        assert packed['data_samples'].gt_label.item() == 3
