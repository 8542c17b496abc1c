"""Filtered convs reading one input share its pooled copy (ops/shared_pool.py)."""
import gc
import weakref

import pytest
import torch

from mmgradfilt.ops import grad_filter_conv2d, shared_pool

# (kernel, stride, padding, dilation, radius) of the convs reading one input
ASPP = [(1, 1, 0, 1, 3), (3, 1, 4, 4, 3)]  # 1x1 and a dilated 3x3, as ASPP
SAME_BLOCK = [(3, 1, 1, 1, 4), (3, 2, 1, 1, 2)]  # 4x4 blocks both
VALID_PADDING = [(3, 1, 1, 1, 3), (3, 1, 0, 1, 3)]  # grids cropped differently


def make_weights(specs, c_in, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, c_in, k, k, generator=gen, dtype=torch.float64,
                        requires_grad=True) for k, *_ in specs]


def run_convs(inputs, weights, specs):
    """Each conv on its input; returns the outputs and the storages that
    autograd saved besides the weights and their autocast copies (pointer ->
    tensor)."""
    saved = {}

    def pack(t):
        if not any(t.shape == w.shape for w in weights):
            saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [
            grad_filter_conv2d(x, w, None, s, p, d, radius=r)
            for x, w, (_, s, p, d, r) in zip(inputs, weights, specs)
        ]
    return outs, saved


def backward(outs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    torch.autograd.backward(
        outs, [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs])


@pytest.mark.parametrize('specs', [ASPP, SAME_BLOCK, VALID_PADDING],
                         ids=['aspp', 'same-block', 'valid-padding'])
def test_one_input_saves_one_pooled_tensor_same_gradients(specs):
    x = torch.randn(2, 6, 17, 19, dtype=torch.float64, requires_grad=True)
    weights = make_weights(specs, 6)
    outs, saved = run_convs([x, x], weights, specs)
    assert len(saved) == 1
    backward(outs)

    # the same convs, each on its own copy of the input: nothing shared
    copies = [x.detach().clone().requires_grad_() for _ in specs]
    apart = make_weights(specs, 6)
    outs, saved = run_convs(copies, apart, specs)
    assert len(saved) == 2
    backward(outs)
    for w, w_apart in zip(weights, apart):
        assert torch.equal(w.grad, w_apart.grad)
    assert torch.equal(x.grad, copies[0].grad + copies[1].grad)


def test_different_radius_does_not_share():
    x = torch.randn(2, 6, 16, 16, dtype=torch.float64, requires_grad=True)
    specs = [(1, 1, 0, 1, 3), (1, 1, 0, 1, 4)]
    _, saved = run_convs([x, x], make_weights(specs, 6), specs)
    assert len(saved) == 2


def test_in_place_change_in_between_does_not_share():
    base = torch.randn(2, 6, 12, 12, dtype=torch.float64, requires_grad=True)
    x = base * 1
    w1, w2 = make_weights(ASPP, 6)
    _, s1 = run_convs([x], [w1], ASPP[:1])
    x.add_(1)
    out, s2 = run_convs([x], [w2], ASPP[1:])
    assert s1.keys().isdisjoint(s2.keys())
    backward(out)
    # the second conv's gradient is that of the changed input
    fresh = (base.detach() + 1).requires_grad_()
    w_fresh = w2.detach().clone().requires_grad_()
    out, _ = run_convs([fresh], [w_fresh], ASPP[1:])
    backward(out)
    assert torch.equal(w2.grad, w_fresh.grad)


def test_autocast_dtype_does_not_share():
    x = torch.randn(2, 6, 12, 12, requires_grad=True)
    specs = [(1, 1, 0, 1, 3)] * 2
    w1, w2 = (w.detach().float().requires_grad_()
              for w in make_weights(specs, 6))
    _, s1 = run_convs([x], [w1], specs[:1])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, s2 = run_convs([x], [w2], specs[1:])
    (p1, ), (p2, ) = s1.values(), s2.values()
    assert p1.dtype == torch.float32 and p2.dtype == torch.bfloat16


def test_views_at_different_offsets_do_not_share():
    full = torch.randn(2, 6, 13, 12, dtype=torch.float64, requires_grad=True)
    top, bottom = full[:, :, :12], full[:, :, 1:]
    specs = [(1, 1, 0, 1, 3)] * 2
    _, saved = run_convs([top, bottom], make_weights(specs, 6), specs)
    assert len(saved) == 2


def test_pooled_tensor_freed_after_backward():
    entries = set(shared_pool._cache)
    x = torch.randn(2, 6, 12, 12, dtype=torch.float64, requires_grad=True)
    outs, saved = run_convs([x, x], make_weights(ASPP, 6), ASPP)
    refs = [weakref.ref(t) for t in saved.values()]
    saved.clear()
    assert all(ref() is not None for ref in refs)
    backward(outs)
    del outs
    gc.collect()
    # x, which the test still holds, keeps neither the tensor nor its entry
    assert all(ref() is None for ref in refs)
    assert set(shared_pool._cache) <= entries


def test_nothing_cached_without_gradients():
    entries = dict(shared_pool._cache)
    x = torch.randn(2, 6, 12, 12)
    weight = torch.randn(5, 6, 1, 1, requires_grad=True)
    with torch.no_grad():
        grad_filter_conv2d(x, weight, radius=3)
    out = grad_filter_conv2d(x, weight.detach(), radius=3)
    assert shared_pool._cache == entries and not out.requires_grad


def test_inference_tensor_input_pools_without_the_cache():
    entries = dict(shared_pool._cache)
    with torch.inference_mode():
        x = torch.randn(2, 6, 12, 12)
    weight = torch.randn(5, 6, 1, 1, requires_grad=True)
    outs = [grad_filter_conv2d(x, weight, radius=3) for _ in range(2)]
    assert shared_pool._cache == entries
    backward(outs)
    assert weight.grad is not None
