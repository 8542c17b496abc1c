"""1-bit-mask activations: torch's outputs and gradients, ceil(n/8) bytes kept."""
import math

import pytest
import torch
import torch.nn as nn

from mmgradfilt.benchmark.memory import SavedTensorMeter
from mmgradfilt.memory import (LeanLeakyReLU, LeanReLU, LeanReLU6,
                               lean_activation, pack_bits, unpack_bits)

TORCH_ACTIVATIONS = [
    nn.ReLU, nn.ReLU6,
    lambda inplace: nn.LeakyReLU(0.1, inplace),
    lambda inplace: nn.LeakyReLU(-0.5),  # torch: no in-place negative slope
]
NAMES = ['relu', 'relu6', 'leaky', 'leaky-negative']
SIZES = [(1, ), (7, ), (9, ), (3, 5, 7), (2, 3, 11, 13)]  # none a multiple of 8


def _inputs(shape, dtype):
    """Random values around both ends of ReLU6 and exactly at 0 and 6."""
    gen = torch.Generator().manual_seed(math.prod(shape))
    x = torch.randn(shape, generator=gen, dtype=dtype) * 5
    flat = x.view(-1)
    flat[::3] = 0
    flat[1::4] = 6
    flat[2::5] = -0.0
    return x


def _output_and_grad(module, x, grad):
    """Output and input gradient of ``module`` at ``x`` through a non-leaf,
    as a layer inside a model sees it."""
    leaf = x.clone().requires_grad_()
    out = module(leaf * 1)
    out.backward(grad)
    return out.detach(), leaf.grad


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape', SIZES, ids=str)
@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('make', TORCH_ACTIVATIONS, ids=NAMES)
def test_same_output_and_gradient_as_torch(make, inplace, shape, dtype):
    ref = make(inplace=inplace)
    lean = lean_activation(ref)
    assert type(lean) in (LeanReLU, LeanReLU6, LeanLeakyReLU)
    assert isinstance(lean, type(ref))
    assert lean.extra_repr() == ref.extra_repr()
    x = _inputs(shape, dtype)
    grad = torch.randn(shape, dtype=dtype)
    out_ref, grad_ref = _output_and_grad(ref, x, grad)
    out, grad_lean = _output_and_grad(lean, x, grad)
    # bit for bit: the same kernels compute both
    assert torch.equal(out, out_ref)
    assert torch.equal(grad_lean, grad_ref)


@pytest.mark.parametrize('make', TORCH_ACTIVATIONS[:3], ids=NAMES[:3])
def test_inplace_overwrites_input_like_torch(make):
    ref = make(inplace=True)
    lean = lean_activation(ref)
    x = _inputs((4, 6), torch.float32)
    results = []
    for module in (ref, lean):
        leaf = x.clone().requires_grad_()
        hidden = leaf * 2
        out = module(hidden)
        assert out is hidden and hidden._version > 0
        # in place on a view: autograd routes the gradient through the base
        base = leaf * 3
        module(base[:, :3])
        (out.sum() + base.pow(2).sum()).backward()
        results.append((out.detach(), base.detach(), leaf.grad))
    for lean_value, ref_value in zip(results[1], results[0]):
        assert torch.equal(lean_value, ref_value)


def test_inplace_on_a_leaf_is_refused_as_torch_refuses_it():
    leaf = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match='leaf Variable'):
        nn.ReLU(inplace=True)(leaf)
    with pytest.raises(RuntimeError, match='leaf Variable'):
        LeanReLU(inplace=True)(leaf)


@pytest.mark.parametrize('shape', [(1, ), (9, ), (2, 3, 11, 13), (8, 16)],
                         ids=str)
@pytest.mark.parametrize('lean_type', [LeanReLU, LeanReLU6, LeanLeakyReLU])
def test_saves_ceil_n_over_8_bytes(lean_type, shape):
    x = _inputs(shape, torch.float32).requires_grad_()
    module = lean_type()
    with SavedTensorMeter(module, dict(act=module)) as meter:
        out = module(x * 1)
    assert meter.total_bytes == meter.module_bytes['act'] == math.ceil(
        x.numel() / 8)
    out.sum().backward()  # the graph is intact


def test_no_gradient_needed_is_plain_torch():
    x = _inputs((3, 9), torch.float32)
    module = LeanReLU6(inplace=True)
    with SavedTensorMeter(module) as meter:
        out = module(x)  # no input needs a gradient
        with torch.no_grad():
            module(torch.randn(3, requires_grad=True))
    assert out is x and out.grad_fn is None and meter.total_bytes == 0


@pytest.mark.parametrize('numel', [0, 1, 7, 8, 9, 63, 64, 1001])
def test_pack_bits_round_trip(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > .5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
    assert torch.equal(unpack_bits(packed, numel), mask.to(torch.uint8))
    # every bit pattern of a byte, the sign bit of the int64 words included
    bits = torch.arange(256, dtype=torch.uint8)
    patterns = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).bool()
    assert torch.equal(unpack_bits(pack_bits(patterns), 2048).view(256, 8),
                       patterns.to(torch.uint8))


def test_keeps_train_mode_and_state_dict():
    ref = nn.LeakyReLU(0.3, inplace=True).eval()
    lean = lean_activation(ref)
    assert not lean.training and lean.negative_slope == 0.3 and lean.inplace
    assert lean.state_dict() == {}
    assert lean_activation(nn.GELU()) is None
    # a subclass may compute something else: not swapped
    assert lean_activation(type('MyReLU', (nn.ReLU, ), {})()) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('lean_type', [LeanReLU, LeanReLU6, LeanLeakyReLU])
def test_cuda_matches_torch(lean_type):
    ref = {LeanReLU: nn.ReLU, LeanReLU6: nn.ReLU6,
           LeanLeakyReLU: nn.LeakyReLU}[lean_type]()
    x = _inputs((2, 3, 11, 13), torch.float32).cuda()
    grad = torch.randn_like(x)
    out_ref, grad_ref = _output_and_grad(ref, x, grad)
    out, grad_lean = _output_and_grad(lean_activation(ref), x, grad)
    assert torch.equal(out, out_ref) and torch.equal(grad_lean, grad_ref)
