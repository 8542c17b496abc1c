"""The C++ fast path on CPU gives the pure-PyTorch reference's results."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmgradfilt.ops import cpu_kernels, grad_filter_conv2d
from mmgradfilt.ops import grad_filter_conv as reference

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(torch.zeros(1, 1, 1, 1)),
    reason='the C++ kernels could not be compiled here')

SIZES = [(16, 16), (17, 23), (3, 5), (64, 61)]
BLOCKS = [(2, 2), (4, 4), (3, 6), (8, 8), (5, 5)]  # (5, 5): a runtime width


@needs_kernels
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32,
                                   torch.bfloat16])
def test_block_reduce_matches_pooling(size, block, dtype):
    x = torch.randn(2, 3, *size, dtype=torch.float64).to(dtype)
    window = tuple(min(b, n) for b, n in zip(block, size))
    ref = x.double()
    want_mean = F.avg_pool2d(ref, window, block, ceil_mode=True)
    want_sum = F.avg_pool2d(ref, window, block, ceil_mode=True,
                            divisor_override=1)
    acc = reference.grid_dtype(dtype)
    got_mean = cpu_kernels.block_reduce(x, block, mean=True, dtype=dtype)
    got_sum = cpu_kernels.block_reduce(x, block, mean=False, dtype=acc)
    assert got_mean.dtype == dtype and got_sum.dtype == acc
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
    torch.testing.assert_close(got_mean.double(), want_mean, rtol=tol[dtype],
                               atol=tol[dtype])
    torch.testing.assert_close(got_sum.double(), want_sum, rtol=tol[acc],
                               atol=tol[acc] * 10)


@needs_kernels
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('block', BLOCKS)
@pytest.mark.parametrize('grid_delta', [0, -1, 1])
@pytest.mark.parametrize('grid_dtype,dtype', [(torch.float64, torch.float64),
                                              (torch.float32, torch.float32),
                                              (torch.float32, torch.float16)])
def test_broadcast_matches_reference(size, block, grid_delta, grid_dtype,
                                     dtype):
    cells = [max(-(-n // b) + grid_delta, 1) for n, b in zip(size, block)]
    grid = torch.randn(2, 3, *cells, dtype=grid_dtype)
    want = reference.broadcast_blocks(grid, block, size, dtype)
    got = cpu_kernels.broadcast_blocks(grid, block, size, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    # the two divide in different orders: a last-bit difference before the
    # cast may round to neighbouring values of the output dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3}
    torch.testing.assert_close(got, want, rtol=tol[dtype], atol=tol[dtype])


@needs_kernels
@pytest.mark.parametrize('kernel', [(3, 3), (5, 5), (1, 3), (7, 7), (2, 4)])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_tap_sum_and_repeat(kernel, dtype):
    weight = torch.randn(6, 4, *kernel, dtype=dtype)
    summed = cpu_kernels.sum_taps(weight)
    torch.testing.assert_close(summed, weight.sum((2, 3), keepdim=True))
    repeated = cpu_kernels.repeat_taps(summed, weight.shape)
    assert torch.equal(repeated, summed.expand_as(weight))


@needs_kernels
@pytest.mark.parametrize('kwargs', [
    dict(padding=(1, 1)),
    dict(stride=(2, 2), padding=(1, 1)),
    dict(padding=(12, 12), dilation=(12, 12), radius=(3, 3)),
    dict(padding=(1, 1), groups=8),
    dict(padding=(0, 0), radius=(5, 5)),
])
@pytest.mark.parametrize('threads', [1, 2])
def test_op_same_with_and_without_kernels(monkeypatch, kwargs, threads):
    torch.manual_seed(0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    groups = kwargs.get('groups', 1)
    x = torch.randn(2, 8, 37, 45, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    grads = []
    try:
        for enabled in (True, False):
            monkeypatch.setattr(cpu_kernels, 'ENABLED', enabled)
            out = grad_filter_conv2d(x, weight, bias, **kwargs)
            grads.append(torch.autograd.grad(out.square().sum(),
                                             (x, weight, bias)))
    finally:
        torch.set_num_threads(old_threads)
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


def test_falls_back_to_reference_when_compiling_fails(monkeypatch):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError('no C++ compiler')

    monkeypatch.setattr(cpp_extension, 'load', fail)
    monkeypatch.setattr(cpu_kernels, 'loaded',
                        cpu_kernels.loaded.__wrapped__)
    logged = []
    monkeypatch.setattr(cpu_kernels, 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs)))
    assert not cpu_kernels.available(torch.zeros(1, 1, 4, 4))
    msg, kwargs = logged[-1]
    assert 'CPU kernels unavailable (no C++ compiler)' in msg
    assert kwargs['level'] == logging.WARNING
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, requires_grad=True)
    out = grad_filter_conv2d(x, weight, padding=1, radius=4)
    out.sum().backward()
    want = weight.sum((0, 2, 3))[None, :, None, None].expand_as(x)
    torch.testing.assert_close(x.grad, want)


def test_environment_variable_turns_kernels_off():
    code = ('import torch; from mmgradfilt.ops import cpu_kernels; '
            'print(cpu_kernels.available(torch.zeros(1, 1, 4, 4)))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, MMGRADFILT_CPU_KERNELS='0'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == 'False'
