"""Mixed precision: MMEngine's AmpOptimWrapper with filtered layers."""
import pytest
import torch
import torch.nn.functional as F
from mmengine.optim import build_optim_wrapper

from mmgradfilt import GradFilterConv2d

DEVICES = [
    pytest.param('cpu', 'bfloat16', id='cpu-bf16'),
    *(pytest.param('cuda', dtype, id=f'cuda-{dtype}', marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs CUDA'))
      for dtype in ('float16', 'bfloat16')),
]


def _deeplabv3(request, device, filtered):
    """The tiny MMSeg model, its loss on a dataset batch, a conv of the recipe."""
    pytest.importorskip('mmseg')
    model = request.getfixturevalue('build_seg_model')(filtered).to(device)
    batch = request.getfixturevalue('seg_batch')

    def loss_fn():
        data = model.data_preprocessor(batch, True)
        return model.parse_losses(model(**data, mode='loss'))[0]

    return model, loss_fn, model.decode_head.aspp_modules[1].conv


def _resnet18(request, device, filtered):
    """torchvision's ResNet-18, cross-entropy on a fixed batch."""
    model = request.getfixturevalue('build_resnet18')(filtered).to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 3, 64, 64, generator=gen).to(device)
    labels = torch.randint(0, 10, (4,), generator=gen).to(device)
    return model, lambda: F.cross_entropy(model(inputs), labels), \
        model.layer4[0].conv1


def _amp_errors(model, loss_fn, conv, dtype):
    """Relative error of each AMP gradient against the fp32 one; one step."""
    model.train()
    loss_fn().backward()
    fp32 = {n: p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None}
    model.zero_grad(set_to_none=True)
    optim_wrapper = build_optim_wrapper(model, dict(
        type='AmpOptimWrapper', dtype=dtype,
        optimizer=dict(type='SGD', lr=0.01)))
    out_dtypes = []
    conv.register_forward_hook(lambda m, i, out: out_dtypes.append(out.dtype))
    with optim_wrapper.optim_context(model):
        loss = loss_fn()
    optim_wrapper.backward(loss)
    optim_wrapper.loss_scaler.unscale_(optim_wrapper.optimizer)
    assert out_dtypes == [getattr(torch, dtype)]  # the conv ran in it
    errors = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad
            assert grad.dtype == torch.float32, name
            assert torch.isfinite(grad).all(), name
            errors[name] = float((grad - fp32[name]).norm() /
                                 fp32[name].norm())
    before = conv.weight.detach().clone()
    optim_wrapper.step()
    assert torch.isfinite(conv.weight).all()
    assert not torch.equal(conv.weight, before)
    return errors


@pytest.mark.parametrize('build', [_deeplabv3, _resnet18],
                         ids=['deeplabv3', 'resnet18'])
@pytest.mark.parametrize('device,dtype', DEVICES)
def test_amp_gradients_as_close_to_fp32_as_vanilla(build, device, dtype,
                                                   request, monkeypatch):
    if device == 'cpu':
        # MMEngine 0.10 builds AmpOptimWrapper only with an accelerator;
        # autocast and its loss scaler themselves run on CPU
        monkeypatch.setattr('mmengine.optim.optimizer.amp_optimizer_wrapper.'
                            'is_cuda_available', lambda: True)
    filtered = build(request, device, True)
    assert isinstance(filtered[2], GradFilterConv2d)
    errors = _amp_errors(*filtered, dtype)
    # the same model with PyTorch's convs and the same layers frozen
    vanilla = _amp_errors(*build(request, device, False), dtype)
    assert set(errors) == set(vanilla)
    for name, error in errors.items():
        # autocast alone costs the vanilla model ``vanilla[name]``
        assert error < max(2 * vanilla[name], 0.05), (name, error,
                                                      vanilla[name])
