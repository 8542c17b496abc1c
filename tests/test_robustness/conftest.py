"""A tiny MMSeg DeepLabV3 config and dataset shared by the robustness tests."""
import copy

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from PIL import Image

from mmgradfilt import GradientFilterHook

NUM_IMAGES = 8
IMAGE_SIZE = 32

# DeepLabV3-R18-D8 at a quarter width on 32x32 images (4x4 feature maps), with
# the filter on the ASPP head and a frozen backbone: the usual recipe, small.
CONFIG = """
_base_ = ['mmseg::_base_/models/deeplabv3_r50-d8.py',
          'mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['mmgradfilt'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
crop_size = ({size}, {size})
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(depth=18, stem_channels=16, base_channels=16,
                  norm_cfg=norm_cfg),
    decode_head=dict(in_channels=128, channels=16, dilations=(1, 2, 3, 4),
                     dropout_ratio=0.0, num_classes=3, norm_cfg=norm_cfg),
    auxiliary_head=None)
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=False),
    dataset=dict(
        type='BaseSegDataset',
        data_root='{data_root}',
        metainfo=dict(classes=('background', 'a', 'b')),
        data_prefix=dict(img_path='img', seg_map_path='ann'),
        img_suffix='.png',
        seg_map_suffix='.png',
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations'),
                  dict(type='PackSegInputs')]))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=100)
optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
param_scheduler = []
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2),
    sampler_seed=dict(type='DistSamplerSeedHook'))
custom_hooks = [
    dict(type='GradientFilterHook',
         filter_install=[dict(path='decode_head.aspp_modules', radius=2),
                         dict(path='decode_head.bottleneck', radius=2)],
         freeze_layers=['backbone', 'decode_head.image_pool'])
]
randomness = dict(seed=0)
"""


@pytest.fixture(scope='session')
def seg_data_root(tmp_path_factory):
    """``img/*.png`` and ``ann/*.png`` (labels 0-2) in MMSeg's layout."""
    root = tmp_path_factory.mktemp('seg_data')
    (root / 'img').mkdir()
    (root / 'ann').mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        label = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        label[:, IMAGE_SIZE // 2:] = 1 + i % 2
        Image.fromarray(image).save(root / 'img' / f'{i}.png')
        Image.fromarray(label).save(root / 'ann' / f'{i}.png')
    return str(root)


@pytest.fixture(scope='session')
def seg_config_file(seg_data_root, tmp_path_factory):
    """Path of the tiny filtered DeepLabV3 training config."""
    path = tmp_path_factory.mktemp('cfg') / 'deeplabv3_tiny_filt.py'
    path.write_text(CONFIG.format(size=IMAGE_SIZE, data_root=seg_data_root))
    return str(path)


@pytest.fixture(scope='session')
def seg_cfg(seg_config_file):
    """The tiny config, loaded (its ``custom_imports`` import mmgradfilt)."""
    pytest.importorskip('mmseg')
    init_default_scope('mmseg')
    return Config.fromfile(seg_config_file)


@pytest.fixture(scope='session')
def build_seg_model(seg_cfg):
    """``build(filtered)``: the tiny model, seeded, frozen as the recipe says.

    ``filtered=False`` gives the vanilla model: the same layers frozen, no
    filter.
    """
    from mmseg.registry import MODELS

    def build(filtered: bool = True):
        torch.manual_seed(0)
        model = MODELS.build(copy.deepcopy(seg_cfg.model))
        model.init_weights()
        hook_cfg = dict(seg_cfg.custom_hooks[0])
        hook_cfg.pop('type')
        if not filtered:
            hook_cfg['filter_install'] = []
        GradientFilterHook(**hook_cfg).apply(model)
        return model

    return build


@pytest.fixture(scope='session')
def seg_batch(seg_cfg):
    """One training batch from MMSeg's dataset and pipeline."""
    return next(iter(Runner.build_dataloader(seg_cfg.train_dataloader)))


@pytest.fixture(scope='session')
def build_resnet18():
    """``build(filtered)``: torchvision's ResNet-18 training ``layer4`` only.

    ``filtered=True`` puts the filter on ``layer4``. It needs no MMCV, so the
    CUDA and ONNX checks run where only PyTorch and MMEngine are installed.
    """
    torchvision = pytest.importorskip('torchvision')

    def build(filtered: bool = True):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        GradientFilterHook(
            filter_install=[dict(path='layer4', radius=2)] if filtered else [],
            freeze_layers=['conv1', 'bn1', 'layer1', 'layer2', 'layer3'],
        ).apply(model)
        return model

    return build
