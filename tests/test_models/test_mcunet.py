import json

import pytest
import torch

pytest.importorskip('mmpretrain', reason='MCUNet is an MMPretrain backbone')

from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

from mmgradfilt import GradFilterConv2d, install_gradient_filter  # noqa: E402
from mmgradfilt.models import MCUNet  # noqa: E402
from mmgradfilt.models.backbones.mcunet import arch_net_config  # noqa: E402

# MCUNet-5fps as published in the mcunet model zoo (mcunet-in1, net config
# mcunet-5fps_imagenet.json), per block: hidden (depthwise) channels, output
# channels, depthwise kernel; the stride-2 blocks and those with an identity
# shortcut. The first conv is 3x3, stride 2, 16 channels.
HIDDEN_5FPS = [16, 32, 48, 48, 120, 120, 160, 160, 144, 192, 240, 384, 384,
               576]
OUT_5FPS = [8, 16, 16, 24, 24, 40, 40, 48, 48, 48, 96, 96, 96, 160]
KERNEL_5FPS = [3, 3, 3, 7, 3, 3, 7, 5, 3, 3, 7, 5, 5, 3]
STRIDE2_5FPS = {1, 3, 5, 10}
SHORTCUT_5FPS = {2, 4, 6, 8, 9, 11, 12}
# the model zoo's table: #Params 0.64M, MACs 12.8M at 96x96, both with the
# 1000-class classifier (0.16M of each)
PARAMS_5FPS, MACS_5FPS = 0.64e6, 12.8e6


def build(net_config=None, **kwargs):
    # in MMPretrain's scope whatever scope an earlier test left as default
    return MODELS.build(dict(type='MCUNet', _scope_='mmpretrain',
                             net_config=net_config, **kwargs))


def imagenet_classifier(**backbone):
    init_default_scope('mmpretrain')
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='MCUNet', **backbone),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=160)))


def conv_linear_macs(model, x):
    """Multiply-accumulates of the conv and linear layers on input ``x``."""
    macs = []

    def count(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * \
                module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        macs.append(out.numel() // out.shape[0] * per_output)

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x, mode='tensor')
    for handle in handles:
        handle.remove()
    return sum(macs)


def test_mcunet_5fps_is_built_in():
    model = build()
    assert model.resolution == 96
    first = model.first_conv.conv
    assert (first.in_channels, first.out_channels, first.kernel_size,
            first.stride) == (3, 16, (3, 3), (2, 2))
    assert len(model.blocks) == 14 and model.feature_mix_layer is None
    convs = [b.mobile_inverted_conv for b in model.blocks]
    assert [c.depth_conv.conv.out_channels for c in convs] == HIDDEN_5FPS
    assert [c.depth_conv.conv.groups for c in convs] == HIDDEN_5FPS
    assert [c.point_linear.conv.out_channels for c in convs] == OUT_5FPS
    assert [c.depth_conv.conv.kernel_size[0] for c in convs] == KERNEL_5FPS
    assert {i for i, c in enumerate(convs)
            if c.depth_conv.conv.stride == (2, 2)} == STRIDE2_5FPS
    assert {i for i, b in enumerate(model.blocks)
            if b.with_shortcut} == SHORTCUT_5FPS
    # the first block has no expand conv, as its expand ratio is 1
    assert [c.inverted_bottleneck is None for c in convs] == \
        [True] + [False] * 13
    assert all(isinstance(c.depth_conv.activate, torch.nn.ReLU6) and
               not c.point_linear.with_activation for c in convs)
    assert model.first_conv.bn.eps == 1e-5
    out, = model(torch.rand(1, 3, 96, 96))
    assert out.shape == (1, 160, 3, 3)


def test_mcunet_5fps_params_and_macs_match_model_zoo():
    model = imagenet_classifier().eval()
    params = sum(p.numel() for p in model.parameters())
    macs = conv_linear_macs(model, torch.rand(1, 3, 96, 96))
    assert params == pytest.approx(PARAMS_5FPS, rel=0.01)
    assert macs == pytest.approx(MACS_5FPS, rel=0.01)


def test_arch_and_its_net_config_build_the_same(tmp_path):
    path = tmp_path / 'mcunet-5fps.json'
    path.write_text(json.dumps(arch_net_config('5fps')))
    from_arch, from_file = build().state_dict(), build(str(path)).state_dict()
    assert list(from_arch) == list(from_file)
    assert all(from_arch[k].shape == from_file[k].shape for k in from_arch)


def test_structure_and_forward(mcunet_net_config):
    model = build(mcunet_net_config, out_indices=(1, -1))
    assert isinstance(model, MCUNet) and len(model.blocks) == 14
    assert model.blocks[0].mobile_inverted_conv.inverted_bottleneck is None
    assert not model.blocks[1].with_shortcut and model.blocks[2].with_shortcut
    assert model.blocks[1].mobile_inverted_conv.depth_conv.conv.groups == 24
    outs = model(torch.rand(2, 3, 32, 32))
    # stride 2 in the first conv and in blocks 1, 3, 5, 7
    assert [o.shape for o in outs] == [(2, 16, 8, 8), (2, 160, 1, 1)]


@pytest.mark.parametrize('from_file', [False, True], ids=['arch', 'json'])
def test_state_dict_names_follow_mcunet_package(from_file, mcunet_net_config):
    keys = set(build(mcunet_net_config if from_file else None).state_dict())
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
    with pytest.raises(ValueError, match="unknown MCUNet arch '3fps'"):
        build(arch='3fps')
    with pytest.raises(IndexError, match='out index 14'):
        build(mcunet_net_config, out_indices=(14, ))
