"""Finding the norms that filtered convs feed and swapping them for
FilteredBatchNorm2d (the surgery; the math is tested in test_memory)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model.utils import _BatchNormXd

from mmgradfilt.layers import GradFilterConv2d
from mmgradfilt.memory import FilteredBatchNorm2d
from mmgradfilt.surgery import (SurgeryRecord, filtered_norm_pairs,
                                install_filtered_norm)


def conv_module(**kwargs):
    cnn = pytest.importorskip('mmcv.cnn')
    return cnn.ConvModule(3, 4, 3, padding=1,
                          conv_cfg=dict(type='GradFilterConv2d', radius=2),
                          norm_cfg=dict(type='BN'), **kwargs)


def test_install_on_conv_module():
    torch.manual_seed(7)
    module = conv_module()
    bn = module.bn
    keys = list(module.state_dict())
    x = torch.randn(2, 3, 10, 10)
    want = module(x)
    records = install_filtered_norm(module)
    assert records == [SurgeryRecord(
        'norm', 'bn', 'installed',
        'BatchNorm2d -> patch statistics (radius 2, after conv)', (2, 2),
        'conv')]
    assert isinstance(module.bn, FilteredBatchNorm2d) and module.norm is module.bn
    assert module.bn.weight is bn.weight and module.bn.bias is bn.bias
    assert module.bn.running_mean is bn.running_mean
    assert module.bn.num_batches_tracked is bn.num_batches_tracked
    assert list(module.state_dict()) == keys
    nodes = []
    module.bn.register_forward_hook(
        lambda m, a, out: nodes.append(out.grad_fn.name()))
    out = module(x)
    assert nodes == ['FilteredBatchNormFunctionBackward']
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert module.bn.weight.grad is not None
    # again: nothing to do; a new conv radius updates the norm's
    assert install_filtered_norm(module)[0].status == 'unchanged'
    module.conv.radius = (4, 4)
    assert install_filtered_norm(module)[0].status == 'updated'
    assert module.bn.radius == (4, 4)


def test_norm_cfg_builds_in_conv_module():
    cnn = pytest.importorskip('mmcv.cnn')
    module = cnn.ConvModule(
        3, 4, 3, conv_cfg=dict(type='GradFilterConv2d', radius=2),
        norm_cfg=dict(type='FilteredBatchNorm2d', radius=2))
    assert module.norm_name == 'bn' and module.bn.radius == (2, 2)


def test_install_in_sequential_and_refusals():
    def seq(conv, norm):
        return nn.Sequential(conv, norm, nn.ReLU())

    filt = lambda: GradFilterConv2d(4, 4, 3, padding=1, radius=2)  # noqa: E731
    frozen = nn.BatchNorm2d(4)
    frozen.requires_grad_(False)
    frozen.eval()
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_pre_hook(lambda m, a: None)
    class OwnBN(nn.BatchNorm2d):
        pass

    # eval mode with a trained affine (MMPretrain's norm_eval): filtered
    eval_trained = nn.BatchNorm2d(4).eval()
    model = nn.ModuleDict(dict(
        ok=seq(filt(), nn.BatchNorm2d(4)),
        # what revert_sync_batchnorm makes of SyncBN
        xd=seq(filt(), _BatchNormXd(4)),
        evalbn=seq(filt(), eval_trained),
        plain=seq(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
        gn=seq(filt(), nn.GroupNorm(2, 4)),
        bn1d=seq(filt(), nn.BatchNorm1d(4)),
        own=seq(filt(), OwnBN(4)),
        sync=seq(filt(), nn.SyncBatchNorm(4)),
        frozen=seq(filt(), frozen),
        hooked=seq(filt(), hooked),
        first=nn.Sequential(nn.BatchNorm2d(4), filt())))
    assert filtered_norm_pairs(model) == [
        (f'{k}.0', f'{k}.1') for k in ('ok', 'xd', 'evalbn', 'gn', 'bn1d', 'own',
                                       'sync', 'frozen', 'hooked')]
    records = {r.path: r for r in install_filtered_norm(model)}
    for key in ('ok', 'xd', 'evalbn'):
        assert records[f'{key}.1'].status == 'installed'
        assert isinstance(model[key][1], FilteredBatchNorm2d)
    assert records['xd.1'].detail == ('_BatchNormXd -> patch statistics '
                                      '(radius 2, after xd.0)')
    assert not model.evalbn[1].training
    reasons = {path: r.detail for path, r in records.items()
               if r.status == 'skipped'}
    assert reasons == {
        'plain.1': 'BatchNorm2d: not fed by a GradFilterConv2d',
        'gn.1': 'GroupNorm: not a 2-D BatchNorm',
        'bn1d.1': 'BatchNorm1d: not a 2-D BatchNorm',
        'own.1': 'OwnBN: a subclass with its own behaviour, which a swap '
        'would drop',
        'sync.1': 'SyncBatchNorm: its batch statistics and gradient sums are '
        'synced across processes, which the filtered backward does not do',
        'frozen.1': 'BatchNorm2d: frozen and in eval mode: its exact '
        'backward, dx = gamma * invstd * g, has nothing to filter',
        'hooked.1': 'BatchNorm2d: has module hooks, which a swap would drop',
        'first.0': 'BatchNorm2d: not fed by a GradFilterConv2d'}
    assert {p for p, r in records.items() if r.radius} == {
        f'{k}.1' for k in ('ok', 'xd', 'evalbn', 'gn', 'bn1d', 'own', 'sync',
                           'frozen', 'hooked')}
    assert [type(m) for m in model.modules()].count(FilteredBatchNorm2d) == 3
    # the swapped _BatchNormXd runs filtered, batch statistics as before
    x = torch.randn(2, 4, 8, 8)
    want = F.batch_norm(model.xd[0](x), None, None, model.xd[1].weight,
                        model.xd[1].bias, True)
    out = model.xd[:2](x)
    assert out.grad_fn.name() == 'FilteredBatchNormFunctionBackward'
    torch.testing.assert_close(out, want)


def test_refuses_norm_before_conv_in_conv_module():
    module = conv_module(order=('norm', 'conv', 'act'))
    assert filtered_norm_pairs(module) == []
    (record, ) = install_filtered_norm(module)
    assert record.status == 'skipped'


def test_install_in_resnet_block():
    resnet = pytest.importorskip('mmseg.models.backbones.resnet')
    block = resnet.BasicBlock(4, 4)
    block.conv2 = GradFilterConv2d.from_conv(block.conv2, 2)
    records = install_filtered_norm(block)
    assert [(r.path, r.status) for r in records] == [('bn1', 'skipped'),
                                                     ('bn2', 'installed')]
    nodes = []
    block.norm2.register_forward_hook(
        lambda m, a, out: nodes.append(out.grad_fn.name()))
    block(torch.randn(2, 4, 8, 8, requires_grad=True)).sum().backward()
    assert nodes == ['FilteredBatchNormFunctionBackward']
    assert block.norm2.radius == (2, 2) and block.norm2.weight.grad is not None
