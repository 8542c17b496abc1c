"""The fidelity definition: the configured model against the all-exact model,
checked in float64 against autograd of both models built by hand."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel

from mmgradfilt.analysis.fidelity import (at_radii, configured_models,
                                          cosine, gradient_fidelity,
                                          measure_fidelity, relative_error)
from mmgradfilt.analysis.plan import Layer
from mmgradfilt.analysis.quality import layer_cosines
from mmgradfilt.layers import GradFilterConv2d
from mmgradfilt.memory import FilteredBatchNorm2d
from mmgradfilt.surgery import GradientFilterRecipe


class ConvBNConv(BaseModel):
    """1x1 conv -> BatchNorm -> ReLU -> dropout -> 3x3 conv -> BatchNorm ->
    3x3 conv, float64; the loss weighs the output by a fixed field."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Dropout(0.3), nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)).double()
        self.register_buffer('target', torch.randn(2, 2, 8, 8).double())

    def forward(self, inputs, data_samples=None, mode='loss'):
        return dict(loss=(self.body(inputs) * self.target).sum())


def smooth(*shape):
    return F.avg_pool2d(torch.randn(*shape, dtype=torch.float64), 3, 1, 1)


RECIPE = GradientFilterRecipe(
    filter_install=[dict(path='body.0', radius=2),
                    dict(path='body.4', radius=2)],
    freeze_layers=['body.6'], lean_memory=True, filter_norm=True)


def grads(model, batch, seed):
    """Weight gradients of the filtered layers and the input gradient of
    body.4, by plain autograd."""
    torch.manual_seed(seed)
    x4 = []
    handle = model.body[4].register_forward_hook(
        lambda m, a, o: x4.append(a[0]))
    loss = model(batch['inputs'])['loss']
    handle.remove()
    params = [model.body[0].weight, model.body[1].weight,
              model.body[4].weight, model.body[5].weight]
    return torch.autograd.grad(loss, params + x4)


def test_against_autograd_of_the_exact_model():
    torch.manual_seed(0)
    model = ConvBNConv().train()
    batch = dict(inputs=smooth(2, 3, 8, 8))
    exact, models = configured_models(model, {None: RECIPE})
    configured = models[None]
    assert isinstance(configured.body[1], FilteredBatchNorm2d)
    assert isinstance(configured.body[5], FilteredBatchNorm2d)
    # one set of weights, frozen as the recipe says
    assert exact.body[0].weight is configured.body[0].weight
    assert exact.body[6].weight is configured.body[6].weight
    assert not configured.body[6].weight.requires_grad
    assert type(exact.body[0]) is nn.Conv2d
    assert type(exact.body[1]) is nn.BatchNorm2d

    torch.manual_seed(7)
    rng = torch.get_rng_state()
    mean = configured.body[1].running_mean.clone()
    rows = {r['layer']: r for r in gradient_fidelity(configured, exact,
                                                     batch, own=True)}
    # nothing changed: random state, running statistics, .grad
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(configured.body[1].running_mean, mean)
    assert all(p.grad is None for p in configured.parameters())
    assert list(rows) == ['body.0', 'body.1', 'body.4', 'body.5']

    # by hand, with the same dropout mask (seed 7 for both)
    want = grads(copy.deepcopy(exact), batch, 7)
    got = grads(copy.deepcopy(configured), batch, 7)
    for i, path in enumerate(['body.0', 'body.1', 'body.4', 'body.5']):
        assert rows[path]['weight_cos'] == pytest.approx(
            cosine(got[i], want[i]), abs=1e-12), path
        assert rows[path]['weight_rel_error'] == pytest.approx(
            relative_error(got[i], want[i]), abs=1e-12), path
    assert rows['body.4']['input_cos'] == pytest.approx(
        cosine(got[4], want[4]), abs=1e-12)
    # the 1x1 conv behind a BatchNorm filtered at its radius: its output
    # gradient is patch-constant, so its own filter loses nothing ...
    assert rows['body.0']['own_weight_cos'] == pytest.approx(1, abs=1e-12)
    # ... but against the exact model it is not exact
    assert rows['body.0']['weight_cos'] < 0.999
    for row in rows.values():
        assert -1 <= row['weight_cos'] < 1 - 1e-6
    # the data needs no gradient; the BN's bias gradient is exact only where
    # its output gradient is
    assert rows['body.0']['input_cos'] is None
    assert rows['body.1']['input_cos'] is not None


def test_radius_one_is_exact_and_dropout_is_replayed():
    # radius 1 filters nothing: every figure 1 only if both passes draw the
    # same dropout mask
    torch.manual_seed(0)
    model = ConvBNConv().train()
    exact, models = configured_models(model, at_radii(RECIPE, [1, 2]))
    batches = [dict(inputs=smooth(2, 3, 8, 8)) for _ in range(2)]
    calls = []
    results = measure_fidelity(models, exact, batches,
                               progress=lambda: calls.append(1))
    assert len(calls) == 2
    assert set(results) == {(1, 1), (2, 2)}
    for row in results[1, 1]:
        assert row['batches'] == 2
        assert row['weight_cos'] == pytest.approx(1, abs=1e-12), row['layer']
        assert row['weight_rel_error'] == pytest.approx(0, abs=1e-10)
    assert all(row['weight_cos'] < 1 - 1e-6 for row in results[2, 2])
    assert [r['radius'] for r in results[2, 2]] == [(2, 2)] * 4


def test_exact_model_keeps_the_freezing_only():
    torch.manual_seed(0)
    model = ConvBNConv()
    exact, models = configured_models(model, {None: RECIPE})
    assert not any(isinstance(m, (GradFilterConv2d, FilteredBatchNorm2d))
                   for m in exact.modules())
    assert not exact.body[6].weight.requires_grad
    # the frozen conv is not reported
    rows = gradient_fidelity(models[None], exact,
                             dict(inputs=smooth(2, 3, 8, 8)))
    assert 'body.6' not in {r['layer'] for r in rows}
    # the model given is left without surgery
    assert type(model.body[0]) is nn.Conv2d


def test_planner_quality_is_the_same_measure():
    # the planner's layer_cosines filters every candidate at each radius:
    # the tool's figures at that radius, on the same batches
    torch.manual_seed(0)
    model = ConvBNConv().train()
    batches = [dict(inputs=smooth(2, 3, 8, 8)) for _ in range(2)]
    layers = [Layer(path, norm, (), (2, 4, 8, 8), [(1, 1), (2, 2)])
              for path, norm in (('body.4', 'body.5'), ('body.0', 'body.1'))]
    torch.manual_seed(3)
    cosines = layer_cosines(model, RECIPE.replace(filter_install=()), layers,
                            batches)
    torch.manual_seed(3)
    exact, models = configured_models(model, at_radii(RECIPE, [1, 2]))
    rows = measure_fidelity(models, exact, batches)
    assert set(cosines) == {'body.0', 'body.4'}
    for radius in ((1, 1), (2, 2)):
        for row in rows[radius]:
            if row['kind'] == 'conv':
                assert cosines[row['layer']][radius] == pytest.approx(
                    row['weight_cos'], abs=1e-12)
    assert cosines['body.0'][1, 1] == pytest.approx(1, abs=1e-12)
    assert cosines['body.0'][2, 2] < 0.999
