import pytest
import torch
import torch.nn as nn
from mmengine.registry import MODELS

from mmgradfilt import GradFilterConv2d
from mmgradfilt.ops import grad_filter_conv2d


def test_same_parameters_state_dict_and_forward_as_conv2d():
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    filt = GradFilterConv2d(4, 6, 3, stride=2, padding=1, radius=2)
    assert filt.state_dict().keys() == plain.state_dict().keys()
    filt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 15, 17)
    assert torch.equal(filt(x), plain(x))
    with torch.no_grad():
        assert torch.equal(filt(x), plain(x))
    assert 'radius=(2, 2)' in repr(filt)


def test_backward_is_the_filtered_op():
    filt = GradFilterConv2d(3, 5, 3, padding='same', radius=(2, 4))
    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    filt(x).square().sum().backward()
    got = (x.grad, filt.weight.grad, filt.bias.grad)
    leaves = [t.detach().requires_grad_() for t in (x, filt.weight, filt.bias)]
    out = grad_filter_conv2d(*leaves, padding=(1, 1), radius=(2, 4))
    want = torch.autograd.grad(out.square().sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # and it is not the exact gradient
    exact = nn.functional.conv2d(*leaves, padding=1)
    assert not torch.allclose(
        torch.autograd.grad(exact.square().sum(), leaves[1])[0], got[1])


def test_from_conv_shares_parameters():
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
    filt = GradFilterConv2d.from_conv(conv, radius=3)
    assert filt.weight is conv.weight and filt.bias is None
    assert (filt.stride, filt.padding, filt.dilation, filt.groups) == (
        conv.stride, conv.padding, conv.dilation, conv.groups)


def test_registered_in_mmengine_models():
    assert isinstance(MODELS.build(dict(type='GradFilterConv2d', in_channels=2,
                                        out_channels=2, kernel_size=1)),
                      GradFilterConv2d)


def test_registered_for_mmcv_builders():
    cnn = pytest.importorskip('mmcv.cnn', reason='MMCV builders need mmcv')
    layer = cnn.build_conv_layer(dict(type='GradFilterConv2d', radius=4), 8,
                                 16, 3, padding=1)
    assert isinstance(layer, GradFilterConv2d) and layer.radius == (4, 4)
    module = cnn.ConvModule(8, 16, 3, padding=1,
                            conv_cfg=dict(type='GradFilterConv2d', radius=2),
                            norm_cfg=dict(type='BN'))
    assert isinstance(module.conv, GradFilterConv2d)
    assert module.conv.radius == (2, 2) and module.conv.padding == (1, 1)
    out = module(torch.randn(2, 8, 8, 8))
    out.sum().backward()
    assert module.conv.weight.grad is not None


@pytest.mark.parametrize('radius', [0, -1, 1.5, '4', (2, 0), True])
def test_rejects_bad_radius(radius):
    with pytest.raises(ValueError, match='radius must be a positive int'):
        GradFilterConv2d(2, 2, 3, radius=radius)


def test_rejects_unsupported_padding():
    with pytest.raises(ValueError, match='padding_mode="zeros"'):
        GradFilterConv2d(2, 2, 3, padding=1, padding_mode='reflect')
    with pytest.raises(ValueError, match='symmetric padding'):
        GradFilterConv2d(2, 2, 4, padding='same')
