"""make_lean: the loss and gradients of the step without it, less kept for
backward; what it does not know is left as it is, with the reason."""
import copy
import os.path as osp
import re
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from mmgradfilt import GradFilterConv2d
from mmgradfilt.benchmark import step
from mmgradfilt.benchmark.memory import SavedTensorMeter
from mmgradfilt.hooks import recipe_from_config
from mmgradfilt.memory import FilteredBatchNorm2d, LeanReLU
from mmgradfilt.ops import grad_filter_conv
from mmgradfilt.surgery import SurgeryRecord, eval_norms, make_lean

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', 'configs')
SEG_CONFIG = ('demo_seg/deeplabv3_r18-tiny-d8_filt5L_1xb8-300_'
              'digits-shift-64x64.py')
CLS_CONFIG = 'resnet/resnet18_filt-last2-r4_1xb128-50e_cifar10-user1.py'
SEG_HEAD = ('decode_head.image_pool.1', 'decode_head.bottleneck',
            *(f'decode_head.aspp_modules.{i}' for i in range(4)))


@pytest.fixture(autouse=True, scope='module')
def flush_denormals():
    """Random weights with frozen BatchNorms make denormals, which slow CPU
    kernels many times and change no result here."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _build(config: str, size: int, loss_decode: Optional[dict] = None):
    """The config, its model (random weights, the data preprocessor padding
    to ``size``, ``loss_decode`` replacing the decode head's if given) and
    its GradientFilterHook's recipe."""
    cfg = Config.fromfile(osp.join(CONFIG_ROOT, config))
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    if model_cfg.data_preprocessor.get('size') is not None:
        model_cfg.data_preprocessor.size = (size, size)
    if loss_decode is not None:
        model_cfg.decode_head.loss_decode = loss_decode
    torch.manual_seed(0)
    model = step.build_model(cfg, model_cfg)
    return cfg, model, recipe_from_config(cfg)


def _pair(config: str, size: int, filter_norm: bool = False,
          loss_decode: Optional[dict] = None):
    """``(batch maker, plain model, lean model, lean report)``: the config's
    hook with ``lean_memory=False`` and ``True``."""
    cfg, model, recipe = _build(config, size, loss_decode)
    plain, lean = model, copy.deepcopy(model)
    recipe.replace(lean_memory=False, filter_norm=False).apply(plain)
    report = recipe.replace(lean_memory=True,
                            filter_norm=filter_norm).apply(lean).text()
    return (lambda n: step.synthetic_batch(cfg, n, (size, size))), plain, \
        lean, report


def _train_step(model: nn.Module, batch: dict, dtype=torch.float32):
    """Loss, log variables, trained parameters' gradients and saved bytes of
    one training forward and backward (the same dropout draws every time)."""
    model = model.to(dtype).train()
    data = model.data_preprocessor(copy.deepcopy(batch), training=True)
    data['inputs'] = data['inputs'].to(dtype)
    torch.manual_seed(1)
    with SavedTensorMeter(model) as meter:
        loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), log_vars, grads, meter.total_bytes


def _assert_same_step(plain, lean, tol=None):
    """Loss, logged values and gradients equal, or close within ``tol``
    (relative to each tensor's largest value)."""
    for name, value in plain[1].items():
        assert float(lean[1][name].detach()) == pytest.approx(
            float(value.detach()), rel=tol or 0, abs=1e-12), name
    assert plain[2].keys() == lean[2].keys()
    for name, grad in plain[2].items():
        if tol is None:
            assert torch.equal(lean[2][name], grad), name
        else:
            torch.testing.assert_close(lean[2][name], grad, rtol=tol,
                                       atol=tol * float(grad.abs().max()),
                                       msg=name)


def _duplicate_saves(model: nn.Module, run) -> list:
    """Shapes of the tensors autograd keeps twice while ``run()`` runs: equal
    contents in two different storages (one storage kept by several ops is
    kept once)."""
    params = {t.untyped_storage().data_ptr()
              for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved.setdefault(key, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    tensors = list(saved.values())
    return [tuple(a.shape) for i, a in enumerate(tensors) for b in tensors[i + 1:]
            if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)]


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12),
                                        (torch.float32, 1e-5)])
def test_seg_step_same_as_without_lean(dtype, tol):
    batch, plain, lean, report = _pair(SEG_CONFIG, 64)
    data = batch(4)
    plain_step = _train_step(plain, data, dtype)
    lean_step = _train_step(lean, data, dtype)
    # the banded loss upsamples and sums in another order: rounding only
    _assert_same_step(plain_step, lean_step, tol)
    assert lean_step[3] < plain_step[3] / 3
    for path in SEG_HEAD:
        assert type(lean.get_submodule(path).activate) is LeanReLU
    assert 'loss_by_feat' in vars(lean.decode_head)
    assert 'Lean memory: 18 of 18 part(s) lean:' in report
    assert re.search(r'\nloss +decode_head +installed +banded cross-entropy',
                     report)
    # the same parameters, keys and values
    assert plain.state_dict().keys() == lean.state_dict().keys()


def test_cls_step_same_as_without_lean():
    batch, plain, lean, report = _pair(CLS_CONFIG, 32)
    data = batch(4)
    plain_step = _train_step(plain, data)
    lean_step = _train_step(lean, data)
    _assert_same_step(plain_step, lean_step)  # bit for bit: only masks
    assert lean_step[3] < plain_step[3]
    for block in ('layer4.0', 'layer4.1'):
        assert type(lean.backbone.get_submodule(block).relu) is LeanReLU
    assert 'Lean memory: 9 of 9 part(s) lean:' in report


def test_lean_step_saves_no_storage_twice(monkeypatch):
    batch, plain, lean, _ = _pair(SEG_CONFIG, 64)
    data = batch(2)

    def forward(model):
        data_in = model.train().data_preprocessor(copy.deepcopy(data), True)
        return lambda: model(**data_in, mode='loss')

    assert _duplicate_saves(lean, forward(lean)) == []
    # the check sees copies: the four ASPP branches (same input, all radius 2)
    # each keep a pooled input of their own when convs do not share them
    monkeypatch.setattr(grad_filter_conv, 'shared_pool',
                        lambda x, block, pool: pool(x, block))
    assert _duplicate_saves(lean, forward(lean)) == [(2, 128, 4, 4)] * 6


def test_unsupported_loss_left_as_it_is():
    batch, plain, lean, _ = _pair(SEG_CONFIG, 64,
                                  loss_decode=dict(type='DiceLoss'))
    records = make_lean(lean)  # again: the records of the lean model
    assert SurgeryRecord('loss', 'decode_head', 'skipped',
                         'loss_decode DiceLoss is not supported') in records
    assert 'loss_by_feat' not in vars(lean.decode_head)
    # the activations are lean already; the step is the same bit for bit
    assert {r.status for r in records if r.part == 'activation'} == {
        'unchanged'}
    data = batch(2)
    _assert_same_step(_train_step(plain, data), _train_step(lean, data))


class _Mixed(nn.Module):
    """An activation of each kind that make_lean reports."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.gelu = nn.GELU()
        self.hooked = nn.LeakyReLU()
        self.hooked.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        return F.relu(self.hooked(self.gelu(self.relu(self.conv(x)))))


def test_records_say_what_is_lean_and_why_not():
    model = _Mixed()
    records = make_lean(model)
    assert records == [
        SurgeryRecord('activation', '', 'skipped',
                      'F.relu() in _Mixed.forward: a functional call cannot '
                      'be swapped'),
        SurgeryRecord('activation', 'relu', 'installed', 'ReLU -> 1-bit mask'),
        SurgeryRecord('activation', 'gelu', 'skipped',
                      'GELU has no 1-bit backward'),
        SurgeryRecord('activation', 'hooked', 'skipped',
                      'LeakyReLU has module hooks, which a swap would drop'),
    ]
    assert type(model.relu) is LeanReLU and model.relu.inplace
    assert type(model.hooked) is nn.LeakyReLU
    assert make_lean(model)[1] == SurgeryRecord(
        'activation', 'relu', 'unchanged', 'LeanReLU: 1-bit mask')
    with pytest.raises(TypeError, match="filter_norm must be a bool, got 'no'"):
        make_lean(model, filter_norm='no')


def test_filter_norm_swaps_the_norms_behind_filtered_convs():
    model = nn.Sequential(GradFilterConv2d(3, 8, 3, radius=2),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    records = make_lean(copy.deepcopy(model))
    filtered = copy.deepcopy(model)
    weight = filtered[1].weight
    assert make_lean(filtered, filter_norm=True) == records + [
        SurgeryRecord('norm', '1', 'installed',
                      'BatchNorm2d -> patch statistics (radius 2, after 0)',
                      (2, 2), '0')]
    assert isinstance(filtered[1], FilteredBatchNorm2d)
    assert filtered[1].weight is weight  # an optimizer built before holds it

    x = torch.randn(2, 3, 10, 10)
    saved = []
    for lean in (model, filtered):
        make_lean(lean)
        with SavedTensorMeter(lean) as meter:
            out = lean(x)
        out.sum().backward()
        saved.append(meter.total_bytes)
    assert saved[1] < saved[0]


def test_filter_norm_records_match_the_seg_model():
    batch, plain, lean, _ = _pair(SEG_CONFIG, 64, filter_norm=True)
    norms = [r for r in make_lean(lean, filter_norm=True) if r.part == 'norm']
    # every BatchNorm, lean or not, but the frozen ones in eval mode: they
    # keep nothing to filter, and are no misses
    frozen = set(eval_norms(lean))
    assert frozen and not frozen & {r.path for r in norms}
    assert len(norms) + len(frozen) == 28
    for record in norms:
        assert isinstance(lean.get_submodule(record.path),
                          FilteredBatchNorm2d) == (record.status != 'skipped')
    # the reverted SyncBNs (_BatchNormXd) after the five filtered convs
    assert sorted(r.path for r in norms if r.status != 'skipped') == sorted(
        path[:-len('conv')] + 'bn' for path in
        ('decode_head.bottleneck.conv',
         *(f'decode_head.aspp_modules.{i}.conv' for i in range(4))))
    exact = copy.deepcopy(plain)
    make_lean(exact)
    data = batch(2)
    step = _train_step(lean, data)
    assert torch.isfinite(step[0])
    assert step[3] < _train_step(exact, data)[3]


def test_filter_norm_on_the_cls_model_in_eval_mode():
    # norm_eval=True: the trained blocks' BatchNorms run on running
    # statistics with a trained affine
    # 128x128: 4x4 maps in layer4, one 4x4 patch each
    batch, plain, lean, _ = _pair(CLS_CONFIG, 128, filter_norm=True)
    paths = [p for p, m in lean.named_modules()
             if isinstance(m, FilteredBatchNorm2d)]
    assert paths == [f'backbone.layer4.{p}' for p in
                     ('0.bn1', '0.bn2', '0.downsample.1', '1.bn1', '1.bn2')]
    nodes = []
    for path in paths:
        lean.get_submodule(path).register_forward_hook(
            lambda m, a, out: nodes.append((m.training, out.grad_fn.name())))
    exact = copy.deepcopy(plain)
    make_lean(exact)
    data = batch(4)
    step, exact_step = _train_step(lean, data), _train_step(exact, data)
    assert set(nodes) == {(False, 'FilteredBatchNormFunctionBackward')}
    assert step[3] < exact_step[3] / 2
    # the same loss; only the BNs' weight gradients differ
    assert torch.equal(step[0], exact_step[0])
    norm_weights = {f'{path}.weight' for path in paths}
    for name, grad in exact_step[2].items():
        if name in norm_weights:
            assert not torch.equal(step[2][name], grad), name
        else:
            torch.testing.assert_close(step[2][name], grad, msg=name)
