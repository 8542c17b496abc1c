import pytest
import torch
from mmengine.registry import init_default_scope
from mmpretrain.registry import MODELS

from mmgradfilt import GradFilterConv2d, install_gradient_filter
from mmgradfilt.models import MCUNet


def build(net_config, **kwargs):
    return MODELS.build(dict(type='MCUNet', net_config=net_config, **kwargs))


def test_structure_and_forward(mcunet_net_config):
    model = build(mcunet_net_config, out_indices=(1, -1))
    assert isinstance(model, MCUNet) and len(model.blocks) == 14
    assert model.blocks[0].mobile_inverted_conv.inverted_bottleneck is None
    assert not model.blocks[1].with_shortcut and model.blocks[2].with_shortcut
    assert model.blocks[1].mobile_inverted_conv.depth_conv.conv.groups == 24
    outs = model(torch.rand(2, 3, 32, 32))
    # stride 2 in the first conv and in blocks 1, 3, 5, 7
    assert [o.shape for o in outs] == [(2, 16, 8, 8), (2, 160, 1, 1)]


def test_state_dict_names_follow_mcunet_package(mcunet_net_config):
    keys = set(build(mcunet_net_config).state_dict())
    for key in ['first_conv.conv.weight', 'first_conv.bn.running_var',
                'blocks.0.mobile_inverted_conv.depth_conv.conv.weight',
                'blocks.3.mobile_inverted_conv.inverted_bottleneck.conv.weight',
                'blocks.3.mobile_inverted_conv.point_linear.bn.bias']:
        assert key in keys
    assert not any('inverted_bottleneck' in k for k in keys
                   if k.startswith('blocks.0.'))


def test_loads_mcunet_checkpoint(mcunet_net_config, tmp_path):
    """A checkpoint in the package's format (with its classifier) loads."""
    source = build(mcunet_net_config)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = dict(source.state_dict())
    state['classifier.linear.weight'] = torch.zeros(10, 32)
    path = tmp_path / 'mcunet.pth'
    torch.save(dict(state_dict=state), path)
    model = build(mcunet_net_config,
                  init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], msg=name)


def test_filter_reaches_expand_depthwise_project(mcunet_net_config):
    init_default_scope('mmpretrain')
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='MCUNet', net_config=mcunet_net_config),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=160)))
    records = install_gradient_filter(
        model, [dict(path='backbone.blocks.13', radius=2)])
    prefix = 'backbone.blocks.13.mobile_inverted_conv.'
    assert [r.path for r in records] == [
        prefix + 'inverted_bottleneck.conv', prefix + 'depth_conv.conv',
        prefix + 'point_linear.conv']
    assert isinstance(model.backbone.blocks[13].mobile_inverted_conv
                      .depth_conv.conv, GradFilterConv2d)
    loss = model(torch.rand(2, 3, 32, 32), mode='tensor').sum()
    loss.backward()
    assert model.backbone.blocks[13].mobile_inverted_conv.depth_conv.conv \
        .weight.grad is not None


def test_norm_eval(mcunet_net_config):
    model = build(mcunet_net_config, norm_eval=True).train()
    assert not model.blocks[5].mobile_inverted_conv.depth_conv.bn.training
    assert model.training


def test_errors(mcunet_net_config, tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.json'):
        build(str(tmp_path / 'missing.json'))
    with pytest.raises(IndexError, match='out index 14'):
        build(mcunet_net_config, out_indices=(14, ))
