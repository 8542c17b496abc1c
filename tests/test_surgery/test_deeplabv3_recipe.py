"""The authors' 5-layer DeepLabV3 recipe on MMSegmentation's own R18 model."""
import copy

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from torch.nn.modules.batchnorm import _BatchNorm

from mmgradfilt import GradFilterConv2d, freeze_layers, install_gradient_filter

mmseg = pytest.importorskip('mmseg', reason='needs MMSegmentation')

FILTER_5L = [
    dict(path='decode_head.bottleneck', radius=3),
    dict(path='decode_head.aspp_modules.0', radius=3),
    dict(path='decode_head.aspp_modules.1', radius=3),
    dict(path='decode_head.aspp_modules.2', radius=6),
    dict(path='decode_head.aspp_modules.3', radius=9),
]
FREEZE_5L = [
    'backbone', 'decode_head', 'auxiliary_head', '~decode_head.bottleneck',
    '~decode_head.aspp_modules', '~decode_head.conv_seg'
]
TRAINED = ('decode_head.bottleneck.', 'decode_head.aspp_modules.',
           'decode_head.conv_seg.')


@pytest.fixture(scope='module')
def deeplabv3_r18(tmp_path_factory):
    cfg_file = tmp_path_factory.mktemp('cfg') / 'deeplabv3_r18.py'
    cfg_file.write_text("_base_ = ['mmseg::deeplabv3/"
                        "deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024.py']\n"
                        'model = dict(pretrained=None)\n')
    cfg = Config.fromfile(str(cfg_file))
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.init_weights()
    return model


def seg_batch(n=2, size=64, classes=19):
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 3, size, size, generator=gen)
    samples = []
    for _ in range(n):
        label = torch.randint(0, classes, (1, size, size), generator=gen)
        samples.append(SegDataSample(
            gt_sem_seg=PixelData(data=label),
            metainfo=dict(img_shape=(size, size), pad_shape=(size, size))))
    return inputs, samples


def test_five_layer_recipe(deeplabv3_r18):
    model = deeplabv3_r18
    vanilla = copy.deepcopy(model).eval()
    records = install_gradient_filter(model, FILTER_5L)
    freeze_layers(model, FREEZE_5L)

    filtered = {n: m.radius[0] for n, m in model.named_modules()
                if isinstance(m, GradFilterConv2d)}
    assert filtered == {
        'decode_head.bottleneck.conv': 3,
        'decode_head.aspp_modules.0.conv': 3,
        'decode_head.aspp_modules.1.conv': 3,
        'decode_head.aspp_modules.2.conv': 6,
        'decode_head.aspp_modules.3.conv': 9,
    }
    assert [r.detail for r in records[1:]] == [
        '128x512x1x1', '128x512x3x3, dilation 12', '128x512x3x3, dilation 24',
        '128x512x3x3, dilation 36']
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(TRAINED) for n in trainable)
    assert 'decode_head.conv_seg.weight' in trainable
    assert 'decode_head.aspp_modules.2.bn.weight' in trainable
    assert 'decode_head.image_pool.1.conv.weight' not in trainable

    inputs, samples = seg_batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), vanilla(inputs))

    model.train()
    losses = model.loss(inputs, samples)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    backbone_norms = [m for m in model.backbone.modules()
                      if isinstance(m, _BatchNorm)]
    assert backbone_norms and not any(m.training for m in backbone_norms)
    assert not model.decode_head.image_pool[1].bn.training
    assert model.decode_head.bottleneck.bn.training
