"""The frontier of the frozen part: which tensors, and training from them is
the same training."""
import copy
import functools
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope

from mmgradfilt.frontier import find_frontier

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', 'configs')
SEG = {
    'deeplabv3_r18': 'deeplabv3/deeplabv3_r18-d8_filt5L_4xb2-20k_'
                     'voc12aug-512x512.py',
    'deeplabv3_r18_10L': 'deeplabv3/deeplabv3_r18-d8_filt10L_4xb2-20k_'
                         'voc12aug-512x512.py',
    'deeplabv3_mv2': 'deeplabv3/deeplabv3_m-v2-d8_filt5L_4xb2-20k_'
                     'voc12aug-512x512.py',
    'fcn_r18': 'fcn/fcn_r18-d8_filt5L_4xb2-20k_voc12aug-512x512.py',
    'pspnet_r18': 'pspnet/pspnet_r18-d8_filt5L_4xb2-20k_voc12aug-512x512.py',
    'pspnet_mv2': 'pspnet/pspnet_m-v2-d8_filt10L_4xb2-20k_'
                  'voc12aug-512x512.py',
    'upernet_r18': 'upernet/upernet_r18_filt5L_4xb2-20k_voc12aug-512x512.py',
    'upernet_r18_10L': 'upernet/upernet_r18_filt10L_4xb2-20k_'
                       'voc12aug-512x512.py',
}
CLS = {
    'resnet18': 'resnet/resnet18_filt-last2-r2_1xb128-50e_cifar10-user1.py',
    'resnet34': 'resnet/resnet34_filt-last2-r2_1xb128-50e_cifar10-user1.py',
    'mobilenet_v2': 'mobilenet_v2/mobilenet-v2_filt-last2-r2_1xb128-50e_'
                    'cifar10-user1.py',
    'mcunet': 'mcunet/mcunet-5fps_filt-last2-r2_1xb128-50e_cifar10-user1.py',
}
SIZE = 32


pytestmark = pytest.mark.usefixtures('fast_cpu')


def build(config):
    """The config's model (random weights) after its GradientFilterHook, in
    training mode, and a preprocessed batch of two tiny samples."""
    from mmengine.registry import HOOKS, MODELS
    cfg = Config.fromfile(osp.join(CONFIG_ROOT, config))
    init_default_scope(cfg.default_scope)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pop('pretrained', None)
    if model_cfg.backbone.get('init_cfg'):
        model_cfg.backbone.init_cfg = None
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    if model_cfg.data_preprocessor.get('size') is not None:
        model_cfg.data_preprocessor.size = (SIZE, SIZE)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(model_cfg))
    for hook in cfg.custom_hooks:
        if hook.type == 'GradientFilterHook':
            HOOKS.build(hook).apply(model)
    model.train()
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, SIZE, SIZE), generator=gen,
                            dtype=torch.uint8) for _ in range(2)]
    if cfg.default_scope == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        classes = cfg.model.decode_head.num_classes
        samples = [SegDataSample(
            gt_sem_seg=PixelData(data=torch.randint(
                0, classes, (1, SIZE, SIZE), generator=gen)),
            metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
            for _ in range(2)]
    else:
        from mmpretrain.structures import DataSample
        samples = [DataSample().set_gt_label(i) for i in range(2)]
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples),
                                   True)
    return model, data


def loss_fn(model, data):
    return lambda: model.parse_losses(model(**data, mode='loss'))[0]


def names_of_params(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def names(frontier):
    return [t.name for t in frontier.tensors]


def count_runs(modules):
    """Count the runs of each module's own ``forward`` (hooks fire around a
    replayed call too, so they cannot tell)."""
    runs = []

    def counting(name, forward, *args, **kwargs):
        runs.append(name)
        return forward(*args, **kwargs)

    for name, module in modules.items():
        module.forward = functools.partial(counting, name, module.forward)
    return runs


def frozen_part(frontier):
    return {f'{path}.{sub}'.rstrip('.'): m
            for path, module in frontier.frozen_modules.items()
            for sub, m in module.named_modules()}


@pytest.mark.parametrize('config', [*SEG.values(), *CLS.values()],
                         ids=[*SEG, *CLS])
def test_replay_trains_exactly_as_the_whole_forward(config):
    model, data = build(config)
    run_loss = loss_fn(model, data)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    frontier = find_frontier(model, run_loss, batch_size=2)
    assert frontier, 'empty frontier'
    # finding it changed no buffer and gave no parameter a gradient
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())

    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)  # the same dropout in the trained part, if any
    with frontier.capture() as captured:
        loss = run_loss()
    grads = torch.autograd.grad(loss, params)
    assert captured.frozen_seconds > 0
    assert [tuple(t.shape) for t in captured.tensors] == [
        (2, *t.shape) for t in frontier.tensors]

    frozen = frozen_part(frontier)
    runs = count_runs(frozen)
    torch.manual_seed(1)
    with frontier.replay(captured.tensors):
        replayed = run_loss()
    replayed_grads = torch.autograd.grad(replayed, params)
    assert not runs, f'frozen modules upstream of the frontier ran: {runs}'
    run_loss()  # the counters see a normal forward
    assert set(frontier.frozen_modules) <= set(runs)
    for module in frozen.values():
        del module.forward
    torch.testing.assert_close(replayed, loss, rtol=1e-6, atol=0)
    for name, g, ref in zip(names_of_params(model), replayed_grads, grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=name)
    # the context restored the modules: a normal forward runs them again
    run_loss()
    assert all('forward' not in m.__dict__
               for m in frontier.frozen_modules.values())


def test_deeplabv3_frontier_is_the_level_read_and_the_image_pool():
    model, data = build(SEG['deeplabv3_r18'])
    frontier = find_frontier(model, loss_fn(model, data))
    # output stride 8: 4x4 maps of 32x32 inputs; the image pool's 1x1 map
    assert names(frontier) == ['backbone[3]', 'decode_head.image_pool']
    assert frontier.specs == [((512, 4, 4), torch.float32),
                              ((128, 1, 1), torch.float32)]
    assert frontier.bytes_per_sample() == 4 * (512 * 16 + 128)
    assert frontier.bytes_per_sample('float16') == 2 * (512 * 16 + 128)
    assert frontier.table()[0] == ['backbone[3]', '512x4x4', '32,768']


def test_upernet_frontier_has_every_level():
    # filt10L trains the lateral convs: the four backbone levels are read
    model, data = build(SEG['upernet_r18_10L'])
    frontier = find_frontier(model, loss_fn(model, data))
    levels = [t for t in frontier.tensors if t.path == 'backbone']
    assert [(t.index, t.shape) for t in levels] == [
        (0, (64, 8, 8)), (1, (128, 4, 4)), (2, (256, 2, 2)), (3, (512, 1, 1))]
    # its frozen pyramid-pooling branches are cached too, and the pooling
    # (no parameters) of the trained ones
    assert {t.path for t in frontier.tensors} - {'backbone'} == {
        'decode_head.psp_modules.0.0', 'decode_head.psp_modules.1.0',
        'decode_head.psp_modules.2', 'decode_head.psp_modules.3'}
    # filt5L freezes them: the frozen lateral 1x1 convs' outputs of levels
    # 0-2 and level 3 (with its frozen pyramid pooling) are read instead
    model, data = build(SEG['upernet_r18'])
    frontier = find_frontier(model, loss_fn(model, data))
    assert names(frontier) == [
        'backbone[3]', 'decode_head.lateral_convs.0',
        'decode_head.lateral_convs.1', 'decode_head.lateral_convs.2',
        *(f'decode_head.psp_modules[{i}]' for i in range(4))]


@pytest.mark.parametrize('config, expected, shape', [
    (CLS['resnet18'], ['backbone.layer3'], (256, 2, 2)),
    (CLS['resnet34'], ['backbone.layer4.0'], (512, 1, 1)),
    (SEG['fcn_r18'], ['backbone.layer4.0'], (512, 4, 4)),
    # the frozen downsample branch of the first trained block too
    (SEG['deeplabv3_r18_10L'],
     ['backbone.layer3', 'backbone.layer4.0.downsample'], (256, 4, 4)),
    (CLS['mobilenet_v2'], ['backbone.layer6'], (160, 1, 1)),
    (CLS['mcunet'], ['backbone.blocks.11'], (96, 1, 1)),
], ids=['resnet18', 'resnet34', 'fcn', 'deeplabv3_10L', 'mobilenet_v2',
        'mcunet'])
def test_cut_inside_the_backbone_is_the_first_trained_blocks_input(
        config, expected, shape):
    model, data = build(config)
    frontier = find_frontier(model, loss_fn(model, data))
    assert names(frontier) == expected
    assert frontier.tensors[0].shape == shape
    # the stem and every frozen block before are skipped
    assert ('backbone.layer1', 0) in frontier.calls or (
        'backbone.blocks.0', 0) in frontier.calls


# Refusals, on small models


class Net(nn.Module):
    """A frozen stem and body, a trained head."""

    def __init__(self, body=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                  nn.BatchNorm2d(4), nn.ReLU())
        self.body = body or nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        for module in (self.stem, self.body):
            module.requires_grad_(False)
        self.stem[1].eval()

    def forward(self, x):
        return self.head(self.body(self.stem(x))).square().mean()


class Noise(nn.Module):

    def forward(self, x):
        return x + torch.rand_like(x)


class Pair(nn.Module):
    """A frozen module returning a dict."""

    def forward(self, x):
        return dict(a=x, b=x * 2)


def run(net, x=None):
    x = torch.randn(2, 3, 8, 8) if x is None else x
    return find_frontier(net, lambda: net(x), batch_size=len(x))


def test_plain_net_frontier_and_buffers_kept():
    net = Net()
    net.stem[1].train()  # frozen BN in training mode
    with pytest.raises(ValueError, match=r'stem\.1 \(inside stem\): a frozen '
                       'BatchNorm in training mode'):
        run(net)
    net.stem[1].eval()
    assert names(run(net)) == ['body']


def test_refuses_active_dropout():
    net = Net(nn.Sequential(nn.Conv2d(4, 4, 1), nn.Dropout(0.1)))
    with pytest.raises(ValueError, match=r'body\.1 \(inside body\): active '
                       'dropout'):
        run(net)
    net.body[1].p = 0.0  # no effect: cacheable
    assert names(run(net)) == ['body']


def test_refuses_randomness_naming_the_module():
    net = Net(nn.Sequential(nn.Conv2d(4, 4, 1), Noise(), nn.ReLU()))
    with pytest.raises(ValueError, match=r'^body\.1: its output differs '
                       'between two forwards'):
        run(net)


def test_refuses_batch_augments():
    net = Net()
    net.data_preprocessor = nn.Module()
    net.data_preprocessor.batch_augments = object()
    with pytest.raises(ValueError, match='data_preprocessor.batch_augments '
                       'mixes the samples'):
        run(net)


def test_refuses_an_output_it_cannot_hold():
    class DictNet(Net):
        def forward(self, x):
            return self.head(self.body(self.stem(x))['b']).mean()

    with pytest.raises(ValueError, match='body: the trained part reads its '
                       'output, a dict'):
        run(DictNet(Pair()))


def test_refuses_a_frontier_that_is_not_batch_major():
    class Mean(nn.Module):
        def forward(self, x):
            return x.mean(0)

    class MeanNet(Net):
        def forward(self, x):
            return self.head(self.body(self.stem(x))[None]).mean()

    with pytest.raises(ValueError, match=r'body: its output of shape '
                       r'\(4, 8, 8\) is not batch-major'):
        run(MeanNet(Mean()))


def test_refuses_a_frozen_output_read_without_gradient():
    class Detached(Net):
        def forward(self, x):
            y = self.stem(x)
            return (self.head(y) * self.body(y).detach()[:, :2]).mean()

    with pytest.raises(ValueError, match='read without autograd'):
        run(Detached())


def test_nothing_trained_and_nothing_frozen():
    net = Net()
    net.head.requires_grad_(False)
    with pytest.raises(ValueError, match='no trained parameter'):
        run(net)
    net.requires_grad_(True)
    assert not run(net)


def test_shared_input_stays_shared_and_placeholders_cost_nothing():
    class Twice(Net):
        def __init__(self):
            super().__init__()
            self.head2 = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            a = self.stem(x)
            y = self.body(a)
            seen.append(y)
            return (self.head(y) + self.head2(y)).mean()

    seen = []
    net = Twice()
    x = torch.randn(3, 3, 8, 8)
    frontier = run(net, x)
    assert names(frontier) == ['body'] and frontier.calls == [
        ('stem', 0), ('body', 0)]
    given = torch.randn(3, 4, 8, 8)
    seen.clear()
    with frontier.replay([given]):
        net(x)
    assert len(seen) == 1 and seen[0] is given
    # a smaller last batch: the placeholders follow its size, expanded from
    # one element
    net.stem.register_forward_hook(lambda m, a, out: seen.append(out))
    seen.clear()
    small = given[:1]
    with frontier.replay([small]):
        net(x[:1])
    placeholder, body = seen
    assert body is small
    assert placeholder.shape == (1, 4, 8, 8) and placeholder.stride() == (
        0, 0, 0, 0) and not placeholder.any()
