import pytest
import torch
import torch.nn as nn

from mmgradfilt import GradFilterConv2d, freeze_layers, install_gradient_filter


class Block(nn.Module):
    """A residual block with a downsample branch."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2),
                                        nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.conv2(self.bn1(self.conv1(x))) + self.downsample(x)


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                  nn.BatchNorm2d(4), nn.ReLU())
        self.layers = nn.ModuleList([Block(4, 8), Block(8, 8)])
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_installs_on_every_conv_under_a_path_and_keeps_parameters():
    net = Net()
    params = dict(net.named_parameters())
    records = install_gradient_filter(net, [dict(path='layers.1', radius=2),
                                            dict(path='head', radius=4)])
    assert [(r.path, r.radius, r.status) for r in records] == [
        ('layers.1.conv1', (2, 2), 'installed'),
        ('layers.1.conv2', (2, 2), 'installed'),
        ('layers.1.downsample.0', (2, 2), 'installed'),
        ('head', (4, 4), 'installed'),
    ]
    # the weight shape, with the stride and dilation where not 1
    assert [r.detail for r in records] == [
        '8x8x3x3, stride 2', '8x8x3x3', '8x8x1x1, stride 2', '2x8x1x1']
    assert {r.part for r in records} == {'conv'}
    filtered = {n for n, m in net.named_modules()
                if isinstance(m, GradFilterConv2d)}
    assert filtered == {r.path for r in records}
    assert type(net.layers[0].conv1) is nn.Conv2d
    for name, param in net.named_parameters():
        assert param is params[name], name
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert net.layers[1].conv1.weight.grad is not None


def test_later_items_override_and_reinstall_is_idempotent():
    net = Net()
    install_gradient_filter(net, [dict(path='layers', radius=2),
                                  dict(path='layers.1.conv2', radius=4)])
    assert net.layers[1].conv2.radius == (4, 4)
    assert net.layers[1].conv1.radius == (2, 2)
    conv = net.layers[1].conv1
    again = install_gradient_filter(net, [dict(path='layers', radius=2),
                                          dict(path='layers.1.conv2', radius=4)])
    assert {r.status for r in again} == {'unchanged'}
    assert net.layers[1].conv1 is conv
    updated = install_gradient_filter(net, [dict(path='layers.0', radius=3)])
    assert {r.status for r in updated} == {'updated'}
    assert net.layers[0].conv1.radius == (3, 3)


def test_unknown_path_names_nearest():
    with pytest.raises(ValueError, match='"layers.1.conv3" is not a submodule'
                       ' of Net.*Nearest valid paths: layers.1.conv[12]'):
        install_gradient_filter(Net(), [dict(path='layers.1.conv3', radius=2)])
    with pytest.raises(ValueError, match='"layers.1" has no "xyz" \\(its '
                       'children: conv1, bn1, conv2, downsample\\)'):
        freeze_layers(Net(), ['layers.1.xyz.conv'])
    with pytest.raises(ValueError, match='"Net" has no "backbone"'):
        freeze_layers(Net(), ['~backbone'])


def test_refuses_non_conv_and_custom_convs():
    with pytest.raises(TypeError, match='"layers.0.bn1" .*contains no nn.Conv2d'):
        install_gradient_filter(Net(), [dict(path='layers.0.bn1', radius=2)])

    class OwnConv(nn.Conv2d):

        def forward(self, x):
            return super().forward(x) * 2

    net = Net()
    net.head = OwnConv(8, 2, 1)
    with pytest.raises(TypeError, match='"head" is a OwnConv'):
        install_gradient_filter(net, [dict(path='head', radius=2)])
    assert type(net.layers[0].conv1) is nn.Conv2d  # nothing half-done


def test_freeze_rules_in_order_with_norm_eval():
    net = Net()
    records = freeze_layers(net, ['stem', 'layers', '~layers.1'])
    assert [r.rule for r in records] == ['stem', 'layers', '~layers.1']
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(n.startswith(('layers.1.', 'head.')) for n in trainable)
    assert 'layers.1.bn1.weight' in trainable and 'head.weight' in trainable
    net.train()
    frozen_bn, live_bn = net.layers[0].bn1, net.layers[1].bn1
    stats = frozen_bn.running_mean.clone()
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert torch.equal(frozen_bn.running_mean, stats)
    assert not frozen_bn.training and live_bn.training
    assert net.stem[0].weight.grad is None
    assert net.layers[0].conv1.weight.grad is None
    assert net.layers[1].conv1.weight.grad is not None
    # unfreezing releases the BatchNorm again
    freeze_layers(net, ['~layers.0'])
    net.train()
    net(torch.randn(2, 3, 16, 16))
    assert frozen_bn.training and not torch.equal(frozen_bn.running_mean, stats)
    assert freeze_layers(net, ['~layers.0'])[0].num_params == 10
