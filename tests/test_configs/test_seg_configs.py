"""Every segmentation config: builds offline, its hook follows the recipe, and
one real training step runs on a tiny input."""
import copy
import functools
import glob
import os.path as osp
import re

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, init_default_scope

from mmgradfilt import GradFilterConv2d, GradientFilterHook

mmseg = pytest.importorskip('mmseg', reason='needs MMSegmentation')

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', 'configs')
SEG_FOLDERS = ('deeplabv3', 'fcn', 'pspnet', 'upernet', 'demo_seg')
CONFIGS = sorted(
    osp.relpath(path, CONFIG_ROOT) for folder in SEG_FOLDERS
    for path in glob.glob(osp.join(CONFIG_ROOT, folder, '*.py')))
# a '-cache' variant is its parent plus FrozenFeatureCacheHook
NAME = re.compile(r'(?P<model>[\w-]+?)_(?P<variant>calib|full|enc\d+L|'
                  r'filt\d+L)(?P<cache>-cache)?_(?P<sched>\dxb\d-\d+k?)_'
                  r'(?P<data>[\w-]+)\.py')
SIZE = 32  # input side: 4x4 maps at output stride 8
USER_EXAMPLE = 'demo_seg/example_user_filt10L_adamw.py'


def _r18_blocks(radius, *blocks):
    return {f'backbone.{b}.conv{j}': radius for b in blocks for j in (1, 2)}


def _mv2_convs(radius, *convs):
    return {f'backbone.{c}.conv': radius for c in convs}


DLV3_5L = {
    'decode_head.bottleneck.conv': 3,
    'decode_head.aspp_modules.0.conv': 3,
    'decode_head.aspp_modules.1.conv': 3,
    'decode_head.aspp_modules.2.conv': 6,
    'decode_head.aspp_modules.3.conv': 9,
}
UPER_5L = {
    'decode_head.fpn_bottleneck.conv': 8,
    'decode_head.fpn_convs.0.conv': 8,
    'decode_head.fpn_convs.1.conv': 4,
    'decode_head.fpn_convs.2.conv': 2,
    'decode_head.bottleneck.conv': 2,
}
FCN_HEAD = ('decode_head.conv_cat.conv', 'decode_head.convs.0.conv',
            'decode_head.convs.1.conv')
PSP_POOL = tuple(f'decode_head.psp_modules.{i}.1.conv' for i in range(4))
MV2_LAST = ('layer7.0.conv.0', 'layer7.0.conv.1', 'layer7.0.conv.2')
# The recipes of the paper, written out: filtered convs and their radius
FILTERED = {
    ('deeplabv3_r18-d8', '5L'): DLV3_5L,
    ('deeplabv3_r18-d8', '10L'): {
        **DLV3_5L, **_r18_blocks(2, 'layer4.0', 'layer4.1')},
    ('deeplabv3_m-v2-d8', '5L'): DLV3_5L,
    ('deeplabv3_m-v2-d8', '10L'): {
        **DLV3_5L, **_mv2_convs(3, *MV2_LAST, 'layer6.2.conv.2')},
    ('fcn_r18-d8', '5L'): {
        **dict.fromkeys(FCN_HEAD, 4), **_r18_blocks(4, 'layer4.1')},
    ('fcn_r18-d8', '10L'): {
        **dict.fromkeys(FCN_HEAD, 2),
        **_r18_blocks(2, 'layer4.1', 'layer4.0', 'layer3.1'),
        'backbone.layer4.0.downsample.0': 2},
    ('pspnet_r18-d8', '5L'): {'decode_head.bottleneck.conv': 4},
    ('pspnet_r18-d8', '10L'): {
        'decode_head.bottleneck.conv': 4,
        **_r18_blocks(4, 'layer4.0', 'layer4.1')},
    ('pspnet_m-v2-d8', '5L'): {'decode_head.bottleneck.conv': 4},
    ('pspnet_m-v2-d8', '10L'): {
        'decode_head.bottleneck.conv': 4,
        **_mv2_convs(4, *MV2_LAST, 'layer6.2.conv.2', 'layer6.2.conv.1')},
    ('upernet_r18', '5L'): UPER_5L,
    ('upernet_r18', '10L'): {
        **UPER_5L, 'decode_head.lateral_convs.0.conv': 8,
        'decode_head.lateral_convs.1.conv': 4,
        'decode_head.lateral_convs.2.conv': 2},
    ('deeplabv3_r18-tiny-d8', '5L'): dict.fromkeys(DLV3_5L, 2),
}
# Convs that train without a filter, besides the classifier conv_seg
UNFILTERED = {
    ('fcn_r18-d8', '10L'): set(),
    ('pspnet_r18-d8', '5L'): set(PSP_POOL),
    ('pspnet_r18-d8', '10L'): {*PSP_POOL, 'backbone.layer4.0.downsample.0'},
    ('pspnet_m-v2-d8', '5L'): set(PSP_POOL),
    ('pspnet_m-v2-d8', '10L'): set(PSP_POOL),
    ('upernet_r18', '10L'): set(PSP_POOL[:2]),
}
MV2_DECODER = {'decode_head.image_pool.1.conv', *DLV3_5L}
CALIB_TRAINED = {
    'deeplabv3_m-v2-d8': MV2_DECODER,
    'pspnet_m-v2-d8': {*PSP_POOL, 'decode_head.bottleneck.conv'},
}
# The user example: the demo's 10-layer recipe, radius 4 on the ASPP branches
USER_FILTERED = {
    **dict.fromkeys(DLV3_5L, 2),
    **{f'decode_head.aspp_modules.{i}.conv': 4 for i in range(4)},
    **_r18_blocks(2, 'layer4.0', 'layer4.1')}

_models = {}


@pytest.fixture(scope='module', autouse=True)
def cached_metafiles():
    """Parse MMSeg's metafiles once: MMEngine reads all of them again for
    every ``mmseg::`` base (about 0.3 s each)."""
    import mmengine.config.utils as cfg_utils
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cfg_utils, 'load', functools.lru_cache(cfg_utils.load))
        yield


def build_model(cfg: Config) -> nn.Module:
    """The config's model with pretrained weights off, built once per
    architecture and copied."""
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.backbone.get('init_cfg'):
        model_cfg.backbone.init_cfg = None
    model_cfg.data_preprocessor.size = (SIZE, SIZE)
    key = Config(dict(model=model_cfg)).pretty_text
    if key not in _models:
        from mmseg.registry import MODELS
        torch.manual_seed(0)
        _models[key] = revert_sync_batchnorm(MODELS.build(model_cfg))
    return copy.deepcopy(_models[key])


def tiny_batch(num_classes: int) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, SIZE, SIZE), generator=gen,
                                    dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, SIZE, SIZE), generator=gen)
        samples.append(SegDataSample(
            gt_sem_seg=PixelData(data=label),
            metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE))))
    return dict(inputs=inputs, data_samples=samples)


def expected(config: str):
    """``(filtered {conv: radius}, trainable convs or None for all)``."""
    if config == USER_EXAMPLE:
        return USER_FILTERED, set(USER_FILTERED) | {'decode_head.conv_seg'}
    match = NAME.fullmatch(osp.basename(config))
    assert match, f'{config} does not follow the naming pattern'
    model, variant = match['model'], match['variant']
    if variant == 'full' or model.endswith('tiny-d8') and variant == 'calib':
        return {}, None  # all layers train (the demo's calib: from scratch)
    if variant == 'calib':
        trained = CALIB_TRAINED.get(model, set()) | {'decode_head.conv_seg'}
        return {}, trained
    layers = variant[-3:] if variant.endswith('10L') else variant[-2:]
    filtered = FILTERED[model, layers]
    trained = set(filtered) | UNFILTERED.get((model, layers), set()) | {
        'decode_head.conv_seg'}
    return (filtered if variant.startswith('filt') else {}), trained


def test_config_set_is_complete():
    names = {osp.basename(c) for c in CONFIGS}
    models = ['deeplabv3_r18-d8', 'deeplabv3_m-v2-d8', 'fcn_r18-d8',
              'pspnet_r18-d8', 'pspnet_m-v2-d8', 'upernet_r18']
    for model in models:
        calib = '5k' if 'm-v2' in model else '1k'
        for data in ('voc12aug-512x512', 'cityscapes-512x1024'):
            assert f'{model}_calib_4xb2-{calib}_{data}.py' in names
            for variant in ('full', 'enc5L', 'enc10L', 'filt5L', 'filt10L'):
                assert f'{model}_{variant}_4xb2-20k_{data}.py' in names
    assert len(names) >= 72 + 4


@pytest.mark.parametrize('config', CONFIGS)
def test_seg_config(config):
    cfg = Config.fromfile(osp.join(CONFIG_ROOT, config))
    assert 'mmgradfilt' in cfg.custom_imports.imports
    assert cfg.train_dataloader.batch_size == (8 if 'demo' in config else 2)
    init_default_scope(cfg.default_scope)
    filtered, trained = expected(config)
    if 'calib' in config and 'tiny' not in config:
        assert cfg.model.backbone.init_cfg.type == 'Pretrained'
        assert cfg.load_from is None
        assert cfg.default_hooks.checkpoint.out_dir == 'checkpoints'
    if trained is not None and 'calib' not in config:
        calib = cfg.load_from.split('/')[1]
        assert osp.isfile(osp.join(CONFIG_ROOT, osp.dirname(config),
                                   calib + '.py')), cfg.load_from

    model = build_model(cfg)
    cache = [h for h in cfg.get('custom_hooks', [])
             if h.type == 'FrozenFeatureCacheHook']
    assert len(cache) == bool(NAME.fullmatch(osp.basename(config)) and
                              NAME.fullmatch(osp.basename(config))['cache'])
    hooks = [HOOKS.build(h) for h in cfg.get('custom_hooks', [])
             if h not in cache]
    assert len(hooks) == (trained is not None)
    for hook in hooks:
        assert isinstance(hook, GradientFilterHook)
        hook.apply(model)

    radius = {n: m.radius for n, m in model.named_modules()
              if isinstance(m, GradFilterConv2d)}
    assert radius == {n: (r, r) for n, r in filtered.items()}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    trainable = {n for n, m in convs.items() if m.weight.requires_grad}
    assert trainable == (set(convs) if trained is None else trained)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    log_vars = model.train_step(
        tiny_batch(cfg.model.decode_head.num_classes), optim_wrapper)
    assert torch.isfinite(log_vars['loss'])
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        conv = name.rsplit('.', 1)[0]
        if conv in convs and name.endswith('weight'):
            assert changed == (conv in trainable), name
