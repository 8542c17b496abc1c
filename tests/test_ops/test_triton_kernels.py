"""The Triton fast path on CUDA gives the pure-PyTorch reference's results."""
import os
import subprocess
import sys

import pytest
import torch

from mmgradfilt.ops import grad_filter_conv2d, reference, triton_kernels
from op_cases import OP_CASES, OP_SIZES

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_kernels.ENABLED),
    reason='needs a CUDA GPU and Triton')

SIZES = [(16, 16), (17, 23), (3, 5), (64, 61)]


@needs_gpu
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('block', [(2, 2), (4, 4), (3, 6), (8, 8), (1, 4),
                                   (8, 2)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_block_reduce_matches_pooling(size, block, dtype):
    x = torch.randn(2, 3, *size, device='cuda', dtype=dtype)
    window = tuple(min(b, n) for b, n in zip(block, size))
    want_mean = torch.nn.functional.avg_pool2d(x.float(), window, block,
                                               ceil_mode=True)
    want_sum = torch.nn.functional.avg_pool2d(x.float(), window, block,
                                              ceil_mode=True,
                                              divisor_override=1)
    got_mean = triton_kernels.block_reduce(x, block, mean=True, dtype=dtype)
    got_sum = triton_kernels.block_reduce(x, block, mean=False,
                                          dtype=torch.float32)
    assert got_mean.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(
        rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got_mean.float(), want_mean, **tol)
    torch.testing.assert_close(got_sum, want_sum, **tol)


@needs_gpu
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('block', [(2, 2), (4, 4), (3, 6), (1, 4), (8, 2)])
@pytest.mark.parametrize('grid_delta', [0, -1, 1])
def test_broadcast_matches_reference(size, block, grid_delta):
    cells = [max(-(-n // b) + grid_delta, 1) for n, b in zip(size, block)]
    grid = torch.randn(2, 3, *cells, device='cuda')
    want = reference.broadcast_blocks(grid, block, size, torch.float32)
    got = triton_kernels.broadcast_blocks(grid, block, size, torch.float32)
    torch.testing.assert_close(got, want)


@needs_gpu
@pytest.mark.parametrize('kwargs', OP_CASES)
@pytest.mark.parametrize('size', OP_SIZES)
def test_op_same_with_and_without_triton(monkeypatch, kwargs, size):
    torch.manual_seed(0)
    groups = kwargs.get('groups', 1)
    x = torch.randn(2, 8, *size, device='cuda', requires_grad=True)
    weight = torch.randn(8, 8 // groups, 3, 3, device='cuda',
                         requires_grad=True)
    bias = torch.randn(8, device='cuda', requires_grad=True)
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(triton_kernels, 'ENABLED', enabled)
        out = grad_filter_conv2d(x, weight, bias, **kwargs)
        grads.append(torch.autograd.grad(out.square().sum(),
                                         (x, weight, bias)))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_kernels_take_an_empty_batch():
    x = torch.randn(0, 3, 8, 8, device='cuda')
    out = triton_kernels.block_reduce(x, (4, 2), True, torch.float32)
    assert out.shape == (0, 3, 2, 4)
    grid = torch.randn(0, 3, 2, 4, device='cuda')
    out = triton_kernels.broadcast_blocks(grid, (4, 2), (8, 8), torch.float32)
    assert out.shape == (0, 3, 8, 8)


INTERPRETED = r'''
import torch, torch.nn.functional as F
from mmgradfilt.ops import reference as ref
from mmgradfilt.ops import triton_kernels as tk
for size, block in [((16, 16), (4, 4)), ((17, 23), (3, 6)), ((3, 5), (8, 8)),
                    ((16, 24), (1, 4)), ((17, 23), (8, 2))]:
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 3, *size).to(dtype)
        win = tuple(min(b, n) for b, n in zip(block, size))
        mean = tk.block_reduce(x, block, mean=True, dtype=dtype)
        sums = tk.block_reduce(x, block, mean=False, dtype=torch.float32)
        assert mean.dtype == dtype and sums.dtype == torch.float32
        torch.testing.assert_close(mean.float(), F.avg_pool2d(
            x.float(), win, block, ceil_mode=True), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(sums, F.avg_pool2d(
            x.float(), win, block, ceil_mode=True, divisor_override=1))
        cells = [-(-n // b) - 1 for n, b in zip(size, block)]
        grid = torch.randn(2, 3, *[max(c, 1) for c in cells])
        want = ref.broadcast_blocks(grid, block, size, torch.float32)
        got = tk.broadcast_blocks(grid, block, size, dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)
print('interpreted kernels ok')
'''


def test_kernels_in_triton_interpreter_on_cpu():
    """The same kernels, run by Triton's CPU interpreter (no GPU needed)."""
    pytest.importorskip('triton')
    proc = subprocess.run([sys.executable, '-c', INTERPRETED],
                          env=dict(os.environ, TRITON_INTERPRET='1'),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'interpreted kernels ok' in proc.stdout
