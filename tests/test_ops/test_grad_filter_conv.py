import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from mmgradfilt.ops import (backend, cpu_kernels, grad_filter_conv,
                            grad_filter_conv2d, reference, triton_kernels)
from mmgradfilt.ops.grad_filter_conv import GradFilterConv2dFunction

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))]


def smooth_field(n, c, h, w, seed, dtype=torch.float64, device='cpu'):
    """Random low-frequency fields: a few cosines over the whole map."""
    gen = torch.Generator().manual_seed(seed)
    freq = torch.rand(n, c, 3, generator=gen, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                            torch.linspace(0, 1, w, dtype=torch.float64),
                            indexing='ij')
    field = torch.cos(2 * freq[..., 0, None, None] * xx +
                      2 * freq[..., 1, None, None] * yy +
                      6 * freq[..., 2, None, None])
    return field.to(device=device, dtype=dtype)


def paper_reference(x, weight, grad_out, r, groups):
    """The paper's equations, stride 1, patch by patch, with plain loops;
    ``r`` an int or an ``(rh, rw)`` pair (rectangular patches)."""
    rh, rw = _pair(r)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    per_group = c_in // groups
    # the summed kernel as a dense (c_out, c_in) matrix
    w_sum = torch.zeros(c_out, c_in, dtype=x.dtype)
    for co in range(c_out):
        g0 = co // (c_out // groups) * per_group
        w_sum[co, g0:g0 + per_group] = weight[co].sum((1, 2))
    grad_x = torch.zeros_like(x)
    grad_w_sum = torch.zeros(c_out, c_in, dtype=x.dtype)
    for i in range(0, h, rh):
        for j in range(0, w, rw):
            g_p = grad_out[:, :, i:i + rh, j:j + rw].mean((2, 3))  # (n, c_out)
            x_p = x[:, :, i:i + rh, j:j + rw].sum((2, 3))  # (n, c_in)
            grad_w_sum += g_p.T @ x_p
            grad_x[:, :, i:i + rh, j:j + rw] = (g_p @ w_sum)[:, :, None, None]
    grad_w = torch.stack([
        grad_w_sum[co, co // (c_out // groups) * per_group:][:per_group]
        for co in range(c_out)
    ])[:, :, None, None].expand_as(weight)
    return grad_x, grad_w, grad_out.sum((0, 2, 3))


def run_both(x, weight, bias, grad_out, stride, padding, dilation, groups, r):
    """Exact autograd gradients and filtered ones for the same conv; each of
    stride, padding, dilation and r an int or a pair."""
    args = (*map(_pair, (stride, padding, dilation)), groups)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    exact_out = F.conv2d(*leaves, *args)
    exact = torch.autograd.grad(exact_out, leaves, grad_out)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    filt_out = grad_filter_conv2d(*leaves, *args, radius=_pair(r))
    filt = torch.autograd.grad(filt_out, leaves, grad_out)
    return exact_out, filt_out, exact, filt


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('groups,c_in,c_out', [(1, 3, 5), (4, 4, 8),
                                               (6, 6, 6)])
@pytest.mark.parametrize('kernel,r', [(3, 2), (3, 4), (1, 4), (5, 4),
                                      (3, (2, 4)), (5, (4, 2))])
def test_matches_paper_equations_stride1(device, groups, c_in, c_out, kernel,
                                         r):
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 8, 8, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel,
                         dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    grad_out = torch.randn(2, c_out, 8, 8, dtype=torch.float64)
    _, _, _, filt = run_both(*(t.to(device) for t in (x, weight, bias,
                                                      grad_out)),
                             1, kernel // 2, 1, groups, r)
    for got, want in zip(filt, paper_reference(x, weight, grad_out, r, groups)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


# (stride, padding, dilation, groups, kernel, size, r): every supported kind
CONFIGS = {
    'dense3x3': (1, 1, 1, 1, 3, 64, 4),
    'dense3x3_r2': (1, 1, 1, 1, 3, 64, 2),
    'pointwise': (1, 0, 1, 1, 1, 64, 4),
    'stride2': (2, 1, 1, 1, 3, 128, 4),
    'stride2_pointwise': (2, 0, 1, 1, 1, 128, 4),
    'depthwise': (1, 1, 1, 8, 3, 64, 4),
    'depthwise_stride2': (2, 1, 1, 8, 3, 128, 2),
    'dilation2_small': (1, 2, 2, 1, 3, 64, 4),
    'aspp_d12_r3': (1, 12, 12, 1, 3, 96, 3),
    'aspp_d24_r6': (1, 24, 24, 1, 3, 192, 6),
    'odd_size': (1, 1, 1, 1, 3, 61, 4),
    'odd_stride2': (2, 1, 1, 1, 3, 127, 4),
    'valid_padding': (1, 0, 1, 1, 3, 62, 4),
}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', list(CONFIGS))
def test_close_to_exact_gradient_on_smooth_inputs(name, device):
    stride, padding, dilation, groups, kernel, size, r = CONFIGS[name]
    torch.manual_seed(0)
    x = smooth_field(2, 8, size, size, seed=1, device=device)
    weight = torch.randn(16, 8 // groups, kernel, kernel, dtype=torch.float64,
                         device=device)
    bias = torch.randn(16, dtype=torch.float64, device=device)
    out_size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    grad_out = smooth_field(2, 16, out_size, out_size, seed=2, device=device)
    exact_out, filt_out, exact, filt = run_both(x, weight, bias, grad_out,
                                                stride, padding, dilation,
                                                groups, r)
    assert torch.equal(exact_out, filt_out)
    for part, want, got in zip(('input', 'weight', 'bias'), exact, filt):
        if part == 'input' and stride > 1:
            # a strided conv's exact input gradient alternates between pixels
            # that 1 or 2 taps reach; compare over stride x stride cells
            want, got = (F.avg_pool2d(t, stride, ceil_mode=True)
                         for t in (want, got))
        cos = F.cosine_similarity(want.flatten(), got.flatten(), dim=0)
        scale = got.norm() / want.norm()
        assert cos > 0.95, f'{part} gradient direction off: cos={cos:.4f}'
        assert 0.9 < scale < 1.1, f'{part} gradient scale off: {scale:.4f}'


def test_stride_scale_is_one_over_s_squared():
    """A constant output gradient of a strided conv keeps its total."""
    x = torch.ones(1, 1, 32, 32, dtype=torch.float64)
    weight = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    grad_out = torch.ones(1, 1, 15, 15, dtype=torch.float64)
    _, _, exact, filt = run_both(x, weight, torch.zeros(1, dtype=x.dtype),
                                 grad_out, 2, 0, 1, 1, 4)
    # no tap falls in padding: every output sends W~ to the input
    torch.testing.assert_close(exact[0].sum(), weight.sum() * 225)
    torch.testing.assert_close(filt[0].sum(), exact[0].sum())
    # and spreads it evenly: 1/s^2 of the stride-1 value per pixel
    torch.testing.assert_close(filt[0][0, 0, 0, 0], weight.sum() / 4)


@pytest.mark.parametrize('r,d', [((3, 3), (12, 12)), ((3, 3), (6, 12)),
                                 ((2, 4), (8, 8)), ((2, 3), (4, 12))])
def test_dilated_variant_exact_for_patchwise_constant_gradient(r, d):
    """With d = m * r (per axis) and g constant on r x r patches, ASPP's grid
    conv is exact; pairs of radii and dilations included."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 36, 36, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    coarse = torch.randn(2, 5, 36 // r[0], 36 // r[1], dtype=torch.float64)
    grad_out = coarse.repeat_interleave(r[0], 2).repeat_interleave(r[1], 3)
    _, _, exact, filt = run_both(x, weight, torch.zeros(5, dtype=x.dtype),
                                 grad_out, 1, d, d, 1, r)
    torch.testing.assert_close(filt[1], exact[1], rtol=1e-10, atol=1e-10)
    # the input gradient is exact up to its mean over each r x r block
    block_means = F.avg_pool2d(exact[0], r)
    torch.testing.assert_close(
        filt[0],
        block_means.repeat_interleave(r[0], 2).repeat_interleave(r[1], 3),
        rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('r', [2, 4, 7])
def test_saves_only_pooled_input(device, r):
    conv_x = torch.randn(2, 16, 56, 56, device=device, requires_grad=True)
    weight = torch.randn(32, 16, 3, 3, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grad_filter_conv2d(conv_x, weight, None, padding=(1, 1),
                                 radius=(r, r))
    activations = [t for t in saved if t is not weight]
    saved_elems = sum(t.numel() for t in activations)
    # ceil(56 / r)^2 blocks per channel, about 1/r^2 of the input
    assert saved_elems == 2 * 16 * (-(-56 // r))**2
    assert saved_elems <= conv_x.numel() / r**2 * 1.3
    assert not any(t.data_ptr() == conv_x.data_ptr() for t in activations)
    out.sum().backward()
    assert conv_x.grad is not None and weight.grad is not None


def test_frozen_weight_saves_nothing():
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        out = grad_filter_conv2d(x, weight, None, padding=(1, 1))
    assert all(t is weight for t in saved)
    out.sum().backward()
    # each 4x4 block gets (sum of taps) * (4x4 ones per patch) / 16 per channel
    want = weight.sum((0, 2, 3))[None, :, None, None].expand_as(x)
    torch.testing.assert_close(x.grad, want)


def test_frozen_input_does_not_sum_the_kernel(monkeypatch):
    """Only the weight gradient wanted (a first filtered layer, whose input is
    frozen): it is the paper's, and the summed kernel (used by the input
    gradient alone) is not computed."""
    summed = []
    kernel = grad_filter_conv.GridConv.kernel
    monkeypatch.setattr(grad_filter_conv.GridConv, 'kernel',
                        lambda self, w: summed.append(w) or kernel(self, w))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    out = grad_filter_conv2d(x, weight, None, padding=(1, 1))
    (grad_w, ) = torch.autograd.grad(out, weight, grad_out)
    assert summed == []
    want = paper_reference(x, weight.detach(), grad_out, 4, 1)[1]
    torch.testing.assert_close(grad_w, want, rtol=1e-12, atol=1e-12)
    x.requires_grad_()
    out = grad_filter_conv2d(x, weight, None, padding=(1, 1))
    torch.autograd.grad(out, (x, weight), grad_out)
    assert len(summed) == 1


def test_no_grad_is_plain_conv(monkeypatch):
    calls = []
    monkeypatch.setattr(GradFilterConv2dFunction, 'apply',
                        lambda *a: calls.append(a))
    x = torch.randn(1, 3, 8, 8)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.no_grad():
        out = grad_filter_conv2d(x, weight, None, padding=(1, 1))
    frozen = grad_filter_conv2d(x, weight.detach(), None, padding=(1, 1))
    assert calls == []
    assert not out.requires_grad and not frozen.requires_grad
    assert torch.equal(out, F.conv2d(x, weight, None, 1, 1))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float32(device, dtype):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 31, 33, device=device)
    weight = torch.randn(8, 8, 3, 3, device=device) * 0.1
    bias = torch.randn(8, device=device)
    grad_out = torch.randn(1, 8, 31, 33, device=device)

    def grads(dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, weight, bias)]
        out = grad_filter_conv2d(*leaves, padding=(1, 1), radius=(4, 4))
        assert out.dtype == dt
        assert torch.equal(out, F.conv2d(*leaves, padding=1))
        return torch.autograd.grad(out, leaves, grad_out.to(dt))

    for low, ref in zip(grads(dtype), grads(torch.float32)):
        assert low.dtype == dtype and torch.isfinite(low).all()
        rel = (low.float() - ref).norm() / ref.norm()
        assert rel < 2e-2


def test_batch_size_one_and_map_smaller_than_patch():
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = grad_filter_conv2d(x, weight, None, padding=(1, 1), radius=(8, 8))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # one patch covers the whole map: a single mean gradient, a single block
    g = grad_out.mean((2, 3))
    torch.testing.assert_close(
        weight.grad, (g.T @ x.sum((2, 3)))[:, :, None, None].expand(3, 2, 3, 3))
    want_x = (g @ weight.sum((2, 3)))[:, :, None, None].expand_as(x)
    torch.testing.assert_close(x.grad, want_x)


@pytest.mark.parametrize('device', DEVICES)
def test_fp16_patch_sums_do_not_overflow(device):
    """Patch sums exceed fp16's range before the gradients themselves do."""
    x = torch.full((1, 2, 16, 16), 0.01, device=device)
    weight = torch.full((2, 2, 3, 3), 0.01, device=device)
    grad_out = torch.full((1, 2, 16, 16), 2000.0, device=device)

    def grads(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight)]
        out = grad_filter_conv2d(*leaves, padding=1, radius=8)
        return torch.autograd.grad(out, leaves, grad_out.to(dtype))

    # a patch sums 64 gradients of 2000: 128000 > 65504, fp16's largest value
    for half, full in zip(grads(torch.float16), grads(torch.float32)):
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        torch.testing.assert_close(half.float(), full, rtol=1e-2, atol=1e-2)


def test_autocast_runs_in_autocast_dtype():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = grad_filter_conv2d(x, weight, None, padding=1, radius=2)
        want = F.conv2d(x, weight, None, padding=1)
    assert out.dtype == want.dtype == torch.bfloat16
    assert torch.equal(out, want)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def loop_broadcast(grid, block, size):
    """Each pixel gets its block's grid cell over the block's pixel count."""
    out = torch.zeros(*grid.shape[:2], *size, dtype=grid.dtype)
    for h in range(size[0]):
        for w in range(size[1]):
            i, j = h // block[0], w // block[1]
            if i < grid.shape[2] and j < grid.shape[3]:
                count = (min(size[0] - i * block[0], block[0]) *
                         min(size[1] - j * block[1], block[1]))
                out[:, :, h, w] = grid[:, :, i, j] / count
    return out


@pytest.mark.parametrize('size,block', [((16, 16), (4, 4)), ((17, 23), (3, 6)),
                                        ((3, 5), (8, 8)), ((10, 9), (4, 2)),
                                        ((12, 16), (1, 4))])
@pytest.mark.parametrize('grid_delta', [0, -1, 1])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_reference_broadcast_matches_loops(size, block, grid_delta, dtype):
    cells = [max(-(-n // b) + grid_delta, 1) for n, b in zip(size, block)]
    grid = torch.randn(2, 3, *cells, dtype=torch.float64)
    got = reference.broadcast_blocks(grid, block, size, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, loop_broadcast(grid, block, size).to(dtype))


@pytest.mark.parametrize('size,block', [((16, 16), (4, 4)), ((17, 23), (3, 6)),
                                        ((3, 5), (8, 8)), ((16, 24), (2, 8)),
                                        ((12, 8), (1, 4))])
def test_reference_pooling_matches_loops(size, block):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    sums = reference.block_reduce(x, block, mean=False, dtype=x.dtype)
    means = reference.block_reduce(x, block, mean=True, dtype=x.dtype)
    for i in range(sums.shape[2]):
        for j in range(sums.shape[3]):
            tile = x[:, :, i * block[0]:(i + 1) * block[0],
                     j * block[1]:(j + 1) * block[1]]
            torch.testing.assert_close(sums[:, :, i, j], tile.sum((2, 3)))
            torch.testing.assert_close(means[:, :, i, j], tile.mean((2, 3)))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('kwargs', [
    dict(padding=1),
    dict(padding=(1, 8), dilation=(1, 8), radius=4),
    dict(stride=2, padding=1, radius=(2, 8), groups=4),
])
@pytest.mark.parametrize('x_grad', [True, False])
def test_empty_batch_matches_exact_autograd(device, kwargs, x_grad):
    """No samples, no patches: an empty output and gradients as
    ``F.conv2d``'s (empty for the input, zero for weight and bias)."""
    kwargs = dict(kwargs)
    radius = kwargs.pop('radius', 4)
    groups = kwargs.get('groups', 1)
    x = torch.randn(0, 8, 16, 16, dtype=torch.float64, device=device)
    weight = torch.randn(6 * groups, 8 // groups, 3, 3, dtype=torch.float64,
                         device=device)
    bias = torch.randn(6 * groups, dtype=torch.float64, device=device)

    def grads(conv, **extra):
        leaves = [x.clone().requires_grad_(x_grad),
                  weight.clone().requires_grad_(),
                  bias.clone().requires_grad_()]
        out = conv(*leaves, **kwargs, **extra)
        wanted = [t for t in leaves if t.requires_grad]
        return out, torch.autograd.grad(out.square().sum(), wanted)

    exact_out, exact = grads(F.conv2d)
    filt_out, filt = grads(grad_filter_conv2d, radius=radius)
    assert filt_out.shape == exact_out.shape and filt_out.numel() == 0
    for got, want in zip(filt, exact):
        assert got.shape == want.shape and torch.equal(got, want)


def test_backends_implement_the_interface():
    for module in (reference, cpu_kernels, triton_kernels):
        assert isinstance(module, backend.Backend), module.__name__
    # what no fused backend takes (here an integer tensor) takes the reference
    assert backend.select(torch.zeros(1, 1, 4, 4, dtype=torch.int64)) is (
        reference)
