import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgradfilt.layers import GradFilterConv2d
from mmgradfilt.memory.norm import FilteredBatchNorm2d, filtered_batch_norm

# (N, C, H, W), radius: full patches, partial last patches on both axes,
# unequal radii, and a patch larger than the map
CASES = [((2, 3, 8, 8), (2, 2)), ((2, 3, 7, 10), (3, 4)),
         ((3, 2, 5, 6), (2, 3)), ((2, 2, 3, 3), (4, 4)), ((2, 3, 6, 6), (1, 1))]


def patches(h, w, radius):
    """Row and column slices of every patch, tiled from the top-left."""
    return [(slice(i, i + radius[0]), slice(j, j + radius[1]))
            for i in range(0, h, radius[0]) for j in range(0, w, radius[1])]


def patch_loop_bn(x, gamma, g, radius, eps):
    """``dx, dgamma, dbeta`` of the filtered BN, straight from the equations,
    one patch at a time."""
    n, c, h, w = x.shape
    m = n * h * w
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    invstd = 1 / torch.sqrt(var + eps)
    xhat = (x - mean) * invstd
    dbeta = g.sum((0, 2, 3))
    dgamma = torch.zeros(c, dtype=x.dtype)
    for rows, cols in patches(h, w, radius):
        g_p = g[:, :, rows, cols].mean((2, 3))
        dgamma += (g_p * xhat[:, :, rows, cols].sum((2, 3))).sum(0)
    dx = torch.empty_like(x)
    for rows, cols in patches(h, w, radius):
        g_p = g[:, :, rows, cols].mean((2, 3), keepdim=True)
        x_p = xhat[:, :, rows, cols].mean((2, 3), keepdim=True)
        dx[:, :, rows, cols] = (gamma.view(1, -1, 1, 1) * invstd) * (
            g_p - dbeta.view(1, -1, 1, 1) / m -
            x_p * dgamma.view(1, -1, 1, 1) / m)
    return dx, dgamma, dbeta


def patch_constant(grid, size, radius):
    """A map whose every patch holds one value of ``grid``."""
    full = grid.repeat_interleave(radius[0], 2).repeat_interleave(radius[1], 3)
    return full[..., :size[0], :size[1]].contiguous()


def leaves(shape, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    gamma = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(shape[1], dtype=torch.float64).requires_grad_()
    return x, gamma, beta


def filtered_grads(x, gamma, beta, g, radius, eps=1e-5):
    out = filtered_batch_norm(x, gamma, beta, None, None, 0.1, eps, radius)
    return torch.autograd.grad(out, (x, gamma, beta), g)


def exact_grads(x, gamma, beta, g, eps=1e-5):
    out = F.batch_norm(x, None, None, gamma, beta, True, 0.1, eps)
    return torch.autograd.grad(out, (x, gamma, beta), g)


@pytest.mark.parametrize('shape,radius', CASES)
def test_matches_patch_loop(shape, radius):
    x, gamma, beta = leaves(shape)
    g = torch.randn(shape, dtype=torch.float64)
    dx, dgamma, dbeta = filtered_grads(x, gamma, beta, g, radius)
    want_dx, want_dgamma, want_dbeta = patch_loop_bn(x.detach(), gamma.detach(),
                                                     g, radius, 1e-5)
    torch.testing.assert_close(dx, want_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dgamma, want_dgamma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dbeta, want_dbeta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape,radius', CASES)
def test_against_exact_bn(shape, radius):
    x, gamma, beta = leaves(shape, seed=1)
    g = torch.randn(shape, dtype=torch.float64)
    dx, dgamma, dbeta = filtered_grads(x, gamma, beta, g, radius)
    exact_dx, exact_dgamma, exact_dbeta = exact_grads(x, gamma, beta, g)
    torch.testing.assert_close(dbeta, exact_dbeta, rtol=1e-12, atol=1e-12)
    # what differs is dgamma, and in dx's patch means only the term
    # xhat_P * dgamma / M: filter_norm=False's conv would see the rest
    m = shape[0] * shape[2] * shape[3]
    n, c, h, w = shape
    xhat = F.batch_norm(x.detach(), None, None, None, None, True, 0.1, 1e-5)
    invstd = 1 / torch.sqrt(x.detach().var((0, 2, 3), unbiased=False) + 1e-5)
    for rows, cols in patches(h, w, radius):
        x_p = xhat[:, :, rows, cols].mean((2, 3))
        shift = gamma.detach() * invstd * x_p * (exact_dgamma - dgamma) / m
        torch.testing.assert_close(
            exact_dx[:, :, rows, cols].mean((2, 3)),
            dx[:, :, rows, cols].mean((2, 3)) - shift, rtol=1e-9, atol=1e-12)
    # a patch-constant output gradient loses nothing to the filter
    grid = torch.randn(n, c, -(-h // radius[0]), -(-w // radius[1]),
                       dtype=torch.float64)
    g = patch_constant(grid, (h, w), radius)
    got = filtered_grads(x, gamma, beta, g, radius)
    want = exact_grads(x, gamma, beta, g)
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-10, atol=1e-12)
    # dx itself then has patch means equal to the exact ones
    for rows, cols in patches(h, w, radius):
        torch.testing.assert_close(got[0][:, :, rows, cols].mean((2, 3)),
                                   want[0][:, :, rows, cols].mean((2, 3)),
                                   rtol=1e-9, atol=1e-12)


def eval_leaves(shape, seed):
    """Input, affine parameters and running statistics (not the batch's)."""
    x, gamma, beta = leaves(shape, seed)
    mean = torch.randn(shape[1], dtype=torch.float64)
    var = torch.rand(shape[1], dtype=torch.float64) * 3 + 0.5
    return x, gamma, beta, mean, var


def eval_patch_loop_bn(x, gamma, mean, var, g, radius, eps):
    """``dx, dgamma, dbeta`` of the filtered eval-mode BN from the
    equations, one patch at a time."""
    n, c, h, w = x.shape
    invstd = 1 / torch.sqrt(var + eps)
    xhat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    dgamma = torch.zeros(c, dtype=x.dtype)
    for rows, cols in patches(h, w, radius):
        g_p = g[:, :, rows, cols].mean((2, 3))
        dgamma += (g_p * xhat[:, :, rows, cols].sum((2, 3))).sum(0)
    dx = g * (gamma * invstd).view(1, -1, 1, 1)
    return dx, dgamma, g.sum((0, 2, 3))


def eval_grads(fn, x, gamma, beta, mean, var, g):
    out = fn(x, gamma, beta, mean, var)
    return torch.autograd.grad(out, (x, gamma, beta), g)


def filtered_eval(radius, eps=1e-5):
    return lambda x, w, b, m, v: filtered_batch_norm(
        x, w, b, m, v, 0.1, eps, radius, training=False)


def exact_eval(x, w, b, m, v):
    return F.batch_norm(x, m, v, w, b, False, 0.1, 1e-5)


@pytest.mark.parametrize('shape,radius', CASES)
def test_eval_mode_matches_patch_loop_and_exact_bn(shape, radius):
    x, gamma, beta, mean, var = eval_leaves(shape, seed=8)
    g = torch.randn(shape, dtype=torch.float64)
    out = filtered_eval(radius)(x, gamma, beta, mean, var)
    assert torch.equal(out, exact_eval(x, gamma, beta, mean, var))
    got = eval_grads(filtered_eval(radius), x, gamma, beta, mean, var, g)
    want = eval_patch_loop_bn(x.detach(), gamma.detach(), mean, var, g,
                              radius, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # against autograd: dx and dbeta exact, dgamma from pooled xhat
    exact = eval_grads(exact_eval, x, gamma, beta, mean, var, g)
    torch.testing.assert_close(got[0], exact[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[2], exact[2], rtol=1e-12, atol=1e-12)
    if radius != (1, 1):
        assert not torch.allclose(got[1], exact[1])
    # a patch-constant output gradient: all exact
    n, c, h, w = shape
    grid = torch.randn(n, c, -(-h // radius[0]), -(-w // radius[1]),
                       dtype=torch.float64)
    g = patch_constant(grid, (h, w), radius)
    got = eval_grads(filtered_eval(radius), x, gamma, beta, mean, var, g)
    exact = eval_grads(exact_eval, x, gamma, beta, mean, var, g)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_eval_mode_needs_running_stats():
    x, gamma, beta = leaves((2, 3, 4, 4))
    with pytest.raises(ValueError, match='running_mean and running_var'):
        filtered_batch_norm(x, gamma, beta, None, None, 0.1, 1e-5, 2,
                            training=False)


@pytest.mark.parametrize('train_weight,pooled', [(True, True), (False, False)])
def test_eval_mode_saves_pooled_input_only_for_the_weight(train_weight,
                                                          pooled):
    torch.manual_seed(9)
    shape, r = (2, 8, 32, 30), 4
    x = torch.randn(shape, requires_grad=True)
    gamma = torch.ones(8, requires_grad=train_weight)
    beta = torch.zeros(8, requires_grad=True)
    saved = []

    def pack(t):
        if t is not gamma:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = filtered_batch_norm(x, gamma, beta, torch.zeros(8),
                                  torch.ones(8), 0.1, 1e-5, r,
                                  training=False)
    # invstd, and X_P when dgamma needs it: dx = gamma * invstd * g does not
    n_pooled = 2 * 8 * (32 // r) * (-(-30 // r))
    assert sorted(t.numel() for t in saved) == (
        [8, n_pooled] if pooled else [8])
    out.backward(torch.randn(shape))
    assert x.grad is not None and beta.grad is not None
    assert (gamma.grad is not None) == train_weight


def test_eval_mode_module_keeps_running_stats_and_conv_grads():
    """conv -> FilteredBN in eval mode with gradient g gives the conv exactly
    the gradients of conv -> exact eval BN with the same g; the BN's bias
    gradient is exact and its running statistics are left alone."""
    torch.manual_seed(10)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    conv = GradFilterConv2d(3, 4, 3, padding=1, radius=(2, 3)).double()
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    g = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    grads, outs = [], []
    for layer in (FilteredBatchNorm2d.from_bn(bn, (2, 3)), bn):
        xin = x.clone().requires_grad_()
        out = layer(conv(xin))
        outs.append(out)
        out.backward(g)
        grads.append([t.grad.clone() for t in
                      (xin, conv.weight, conv.bias, bn.weight, bn.bias)])
        for t in (conv.weight, conv.bias, bn.weight, bn.bias):
            t.grad = None
    assert outs[0].grad_fn.name() == 'FilteredBatchNormFunctionBackward'
    assert torch.equal(outs[0], outs[1])
    for got, want in zip(grads[0][:3] + grads[0][4:],
                         grads[1][:3] + grads[1][4:]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(grads[0][3], grads[1][3])  # dgamma
    for key, value in bn.state_dict().items():
        assert torch.equal(state[key], value), key


def test_forward_and_running_stats_identical():
    torch.manual_seed(2)
    x = torch.randn(4, 5, 9, 11) * 3 + 2
    for momentum in (0.1, None):
        plain = nn.BatchNorm2d(5, momentum=momentum)
        filt = FilteredBatchNorm2d(5, momentum=momentum, radius=2)
        filt.load_state_dict(plain.state_dict())
        conv = GradFilterConv2d(5, 5, 1, radius=2)
        for _ in range(3):
            inp = conv(x)
            out = filt(inp)
            assert out.grad_fn.name() == 'FilteredBatchNormFunctionBackward'
            assert torch.equal(out, plain(inp))
        for key, value in plain.state_dict().items():
            assert torch.equal(filt.state_dict()[key], value), key


def test_plain_bn_where_nothing_is_filtered():
    torch.manual_seed(3)
    conv = GradFilterConv2d(3, 4, 3, padding=1, radius=2)
    bn = FilteredBatchNorm2d(4, radius=2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert bn(conv(x)).grad_fn is None
    # eval mode, frozen: dx = gamma * invstd * g, nothing to filter
    bn.eval().requires_grad_(False)
    out = bn(conv(x))
    assert out.grad_fn.name() != 'FilteredBatchNormFunctionBackward'
    # no running statistics: batch statistics, filtered, in eval mode too
    free = FilteredBatchNorm2d(4, track_running_stats=False, radius=2).eval()
    assert free(conv(x)).grad_fn.name() == 'FilteredBatchNormFunctionBackward'


def test_exact_bn_when_input_is_not_from_a_filtered_conv():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    bn = FilteredBatchNorm2d(3, radius=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for source in (x, GradFilterConv2d(3, 3, 1, radius=3)(x),
                       nn.Conv2d(3, 3, 1)(x)):
            out = bn(source)
            assert out.grad_fn.name() != 'FilteredBatchNormFunctionBackward'
    # once per layer
    assert len(caught) == 1
    assert 'a leaf' in str(caught[0].message)
    assert 'runs as an exact BatchNorm2d' in str(caught[0].message)


def test_filtered_conv_sees_the_bn_gradient_it_expects():
    """conv -> FilteredBN with gradient g gives the conv exactly the gradients
    of conv -> exact BN with g averaged on the conv's patches."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    conv = GradFilterConv2d(3, 4, 3, padding=1, radius=(2, 3)).double()
    bn = nn.BatchNorm2d(4).double()
    g = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    g_avg = patch_constant(F.avg_pool2d(g, (2, 3), ceil_mode=True), (9, 7),
                           (2, 3))
    grads = []
    for layer, grad in ((FilteredBatchNorm2d.from_bn(bn, (2, 3)), g),
                        (bn, g_avg)):
        xin = x.clone().requires_grad_()
        layer(conv(xin)).backward(grad)
        grads.append([t.grad.clone() for t in
                      (xin, conv.weight, conv.bias, bn.weight, bn.bias)])
        for t in (conv.weight, conv.bias, bn.weight, bn.bias):
            t.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_saves_pooled_input_only():
    torch.manual_seed(6)
    shape, r = (2, 8, 32, 30), 4
    x = torch.randn(shape, requires_grad=True)
    gamma = torch.ones(8, requires_grad=True)
    beta = torch.zeros(8, requires_grad=True)
    saved = []

    def pack(t):
        if t is not gamma:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = filtered_batch_norm(x, gamma, beta, None, None, 0.1, 1e-5, r)
    pooled = 2 * 8 * (32 // r) * (-(-30 // r))
    assert sorted(t.numel() for t in saved) == [8, pooled]
    saved_bytes = sum(t.untyped_storage().nbytes() for t in saved)
    assert saved_bytes == (pooled + 8) * 4
    assert saved_bytes < x.numel() * 4 / r**2 * 1.1
    out.sum().backward()
