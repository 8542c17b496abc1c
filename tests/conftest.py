import functools
import json
from pathlib import Path

import pytest
import torch
from mmengine.config import utils as cfg_utils


def write_mcunet_net_config(path, num_blocks=14, num_classes=10):
    """A small net config in the ``mcunet`` package's JSON format.

    Blocks alternate between stride-2 expanding blocks without shortcut and
    stride-1 blocks with an identity shortcut; the first has no expand conv,
    the last has 160 output channels.
    """
    blocks, channels = [], 8
    for i in range(num_blocks):
        out = min(channels * 2, 32) if i % 2 else channels
        if i == num_blocks - 1:
            out = 160  # as mcunet-5fps, whose head the configs set up
        blocks.append(dict(
            name='MobileInvertedResidualBlock',
            mobile_inverted_conv=dict(
                name='MBInvertedConvLayer', in_channels=channels,
                out_channels=out, kernel_size=(3, 5, 7)[i % 3],
                stride=2 if i % 2 and i < 8 else 1,
                expand_ratio=1 if i == 0 else 3,
                mid_channels=None if i == 0 else channels * 3,
                act_func='relu6', use_se=False),
            shortcut=None if i % 2 or i == 0 else dict(
                name='IdentityLayer', in_channels=[channels],
                out_channels=[channels], use_bn=False, act_func=None,
                dropout_rate=0, ops_order='weight_bn_act')))
        channels = out
    config = dict(
        name='ProxylessNASNets',
        bn=dict(momentum=0.1, eps=1e-5, ws_eps=None),
        first_conv=dict(
            name='ConvLayer', kernel_size=3, stride=2, dilation=1, groups=1,
            bias=False, has_shuffle=False, in_channels=3, out_channels=8,
            use_bn=True, act_func='relu6', dropout_rate=0,
            ops_order='weight_bn_act'),
        blocks=blocks,
        feature_mix_layer=None,
        classifier=dict(
            name='LinearLayer', in_features=channels,
            out_features=num_classes, bias=True, use_bn=False, act_func=None,
            dropout_rate=0, ops_order='weight_bn_act'),
        resolution=32)
    with open(path, 'w') as f:
        json.dump(config, f)
    return config


@pytest.fixture(scope='session')
def mcunet_net_config(tmp_path_factory):
    """Path of a 14-block MCUNet net config (as many blocks as mcunet-5fps)."""
    path = tmp_path_factory.mktemp('mcunet') / 'net.json'
    write_mcunet_net_config(path)
    return str(path)


@pytest.fixture(scope='session')
def digits_shift_weights(tmp_path_factory):
    """(data root, checkpoint): a few canvases of the digits demo's shifted
    domain, which its fine-tuning configs train on, and random weights of
    their model (seeded) in a checkpoint."""
    import torch
    from mmengine.config import Config

    from mmgradfilt.benchmark.step import build_model
    from mmgradfilt.datasets import make_digits_seg
    root = tmp_path_factory.mktemp('digits_shift')
    make_digits_seg(str(root / 'data'), splits=dict(shift_train=('target', 4)))
    config = ('configs/demo_seg/'
              'deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64.py')
    model = build_model(Config.fromfile(
        str(Path(__file__).resolve().parents[1] / config)))
    torch.manual_seed(0)
    model.init_weights()
    checkpoint = root / 'weights.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    return root / 'data', checkpoint


@pytest.fixture(scope='module')
def fast_cpu():
    """For a module of tiny random-weight models: OpenMMLab's metafiles read
    once, one thread and no denormals (changes no result, only the time)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg_utils, '_get_cfg_metainfo',
                   functools.lru_cache(cfg_utils._get_cfg_metainfo))
        mp.setattr(cfg_utils, 'load', functools.lru_cache(cfg_utils.load))
        torch.set_flush_denormal(True)
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
