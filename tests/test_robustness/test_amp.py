"""Mixed precision: MMEngine's AmpOptimWrapper with filtered layers."""
import pytest
import torch

pytest.importorskip('mmseg')

CASES = [
    pytest.param('cpu', 'bfloat16', id='cpu-bf16'),
    *(pytest.param('cuda', dtype, id=f'cuda-{dtype}', marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs CUDA'))
      for dtype in ('float16', 'bfloat16')),
]


def _loss(model, batch):
    torch.manual_seed(1)  # the same dropout mask in both runs
    data = model.data_preprocessor(batch, True)
    return model.parse_losses(model(**data, mode='loss'))[0]


def _grads(model):
    return {n: p.grad.float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize('device,dtype', CASES)
def test_amp_gradients_close_to_fp32(device, dtype, build_seg_model,
                                     seg_batch, monkeypatch):
    from mmengine.optim import build_optim_wrapper
    if device == 'cpu':
        # MMEngine 0.10 builds AmpOptimWrapper only with an accelerator;
        # autocast and its loss scaler themselves run on CPU
        monkeypatch.setattr('mmengine.optim.optimizer.amp_optimizer_wrapper.'
                            'is_cuda_available', lambda: True)
    model = build_seg_model().to(device)
    model.train()
    _loss(model, seg_batch).backward()
    fp32 = _grads(model)
    model.zero_grad(set_to_none=True)

    optim_wrapper = build_optim_wrapper(model, dict(
        type='AmpOptimWrapper', dtype=dtype,
        optimizer=dict(type='SGD', lr=0.01)))
    conv = model.decode_head.aspp_modules[1].conv
    out_dtypes = []
    conv.register_forward_hook(lambda m, i, out: out_dtypes.append(out.dtype))
    with optim_wrapper.optim_context(model):
        loss = _loss(model, seg_batch)
    optim_wrapper.backward(loss)
    optim_wrapper.loss_scaler.unscale_(optim_wrapper.optimizer)
    amp = _grads(model)

    assert out_dtypes == [getattr(torch, dtype)]  # the filtered conv ran in it
    assert set(amp) == set(fp32)
    assert not any(n.startswith('backbone.') for n in amp)  # frozen
    for name, grad in amp.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        ref = fp32[name]
        cos = torch.nn.functional.cosine_similarity(grad.flatten(),
                                                    ref.flatten(), dim=0)
        err = (grad - ref).norm() / ref.norm()
        assert cos > 0.99 and err < 0.15, (name, cos, err)
    before = conv.weight.detach().clone()
    optim_wrapper.step()
    assert torch.isfinite(conv.weight).all()
    assert not torch.equal(conv.weight, before)
