"""The planner's pieces: candidate layers of real models, the selection rule
on costs worked out by hand, the config it writes, and the one call
(:func:`plan_budget`): its refusals before measuring, a budget no plan
meets, a plan that measures over budget."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from mmgradfilt.analysis import plan as plan_mod
from mmgradfilt.analysis import planner
from mmgradfilt.analysis.plan import (Budget, Layer, PrefixCosts, choose_plan,
                                      fit_radii, freeze_rules, min_figures,
                                      plan_config, trace_layers)
from mmgradfilt.analysis.planner import (PlanError, choose_measured,
                                         measure_prefixes, plan_budget)
from mmgradfilt.benchmark.step import build_model, synthetic_batch
from mmgradfilt.hooks import GradientFilterHook
from mmgradfilt.report import MB
from mmgradfilt.surgery import GradientFilterRecipe

ROOT = Path(__file__).resolve().parents[2]
SEG = (ROOT / 'configs' / 'demo_seg' /
       'deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64.py')
CLS = (ROOT / 'configs' / 'demo_cls' /
       'resnet18_filt-last2-r2_1xb32-5e_digits-user1.py')


def candidates(config: Path, size, radii=(2, 4, 8)):
    cfg = Config.fromfile(str(config))
    model = build_model(cfg).train()
    data = model.data_preprocessor(synthetic_batch(cfg, 2, size), True)
    layers, classifier, skipped = trace_layers(
        model, lambda: model(**data, mode='loss'))
    fit_radii(layers, radii)
    return model, layers, classifier, skipped


def trained_params(model, layers, classifier):
    model = copy.deepcopy(model)
    hook = GradientFilterHook(
        freeze_layers=freeze_rules(model, layers, classifier))
    hook.apply(model)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_deeplabv3_candidates():
    pytest.importorskip('mmseg')
    model, layers, classifier, skipped = candidates(SEG, (64, 64),
                                                    (2, 4, 8, 16))
    assert classifier == 'decode_head.conv_seg'
    assert skipped == []
    paths = [layer.path for layer in layers]
    # last of the forward pass first: the head's bottleneck after the ASPP
    # branches, which run after the image pool; then the backbone backwards
    assert paths[:10] == [
        'decode_head.bottleneck.conv',
        *(f'decode_head.aspp_modules.{i}.conv' for i in (3, 2, 1, 0)),
        'decode_head.image_pool.1.conv', 'backbone.layer4.1.conv2',
        'backbone.layer4.1.conv1', 'backbone.layer4.0.downsample.0',
        'backbone.layer4.0.conv2'
    ]
    assert paths[-1] == 'backbone.stem.0'
    assert len(paths) == 28  # every conv but the classifier
    by_path = {layer.path: layer for layer in layers}
    assert by_path['decode_head.bottleneck.conv'].norm == \
        'decode_head.bottleneck.bn'
    assert by_path['backbone.layer4.0.downsample.0'].norm == \
        'backbone.layer4.0.downsample.1'
    assert by_path['backbone.stem.3'].norm == 'backbone.stem.4'
    # d8 at 64x64: 8x8 maps take radii up to 8; the pooled branch is 1x1;
    # the stem's 32x32 output takes 16 too
    assert by_path['decode_head.aspp_modules.3.conv'].radii == [(2, 2),
                                                              (4, 4),
                                                              (8, 8)]
    assert by_path['decode_head.image_pool.1.conv'].radii == []
    assert by_path['backbone.stem.0'].radii == [(2, 2), (4, 4), (8, 8),
                                               (16, 16)]
    assert by_path['backbone.stem.0'].out_shape == (2, 8, 32, 32)

    # the last 5: the paper's enc5L layers, with their BatchNorms
    assert trained_params(model, layers[:5], classifier) == {
        'decode_head.conv_seg.weight', 'decode_head.conv_seg.bias',
        *(f'decode_head.{m}.{p}'
          for m in ['bottleneck.conv', 'bottleneck.bn',
                    *(f'aspp_modules.{i}.{k}' for i in range(4)
                      for k in ('conv', 'bn'))]
          for p in ('weight', 'bias') if not (m.endswith('conv')
                                               and p == 'bias'))}
    assert freeze_rules(model, layers[:5], classifier) == [
        'backbone', 'decode_head', '~decode_head.conv_seg',
        '~decode_head.aspp_modules', '~decode_head.bottleneck']
    assert trained_params(model, [], classifier) == {
        'decode_head.conv_seg.weight', 'decode_head.conv_seg.bias'}


def test_resnet18_candidates():
    pytest.importorskip('mmpretrain')
    model, layers, classifier, _ = candidates(CLS, (64, 64))
    assert classifier == 'head.fc'
    assert [layer.path for layer in layers[:6]] == [
        'backbone.layer4.1.conv2', 'backbone.layer4.1.conv1',
        'backbone.layer4.0.downsample.0', 'backbone.layer4.0.conv2',
        'backbone.layer4.0.conv1', 'backbone.layer3.1.conv2'
    ]
    assert layers[-1].path == 'backbone.conv1'  # the stem
    assert len(layers) == 20
    by_path = {layer.path: layer for layer in layers}
    # 64x64 in: 2x2 maps in layer4, 4x4 in layer3, 8x8 in layer2
    assert by_path['backbone.layer4.1.conv2'].radii == [(2, 2)]
    assert by_path['backbone.layer3.1.conv2'].radii == [(2, 2), (4, 4)]
    assert by_path['backbone.layer2.1.conv2'].radii == [(2, 2), (4, 4),
                                                        (8, 8)]
    assert by_path['backbone.layer4.1.conv1'].norm == 'backbone.layer4.1.bn1'
    assert trained_params(model, layers[:3], classifier) == {
        'head.fc.weight', 'head.fc.bias',
        *(f'backbone.{m}.{p}' for m in (
            'layer4.1.conv2', 'layer4.1.conv1', 'layer4.0.downsample.0')
          for p in ('weight', )),
        *(f'backbone.{m}.{p}' for m in (
            'layer4.1.bn2', 'layer4.1.bn1', 'layer4.0.downsample.1')
          for p in ('weight', 'bias'))}
    # the whole last block trains: one rule for it
    assert '~backbone.layer4.1' in freeze_rules(model, layers[:3], classifier)


class LateRegistered(nn.Module):
    """Registers ``b`` before ``a`` but runs ``a`` first; an auxiliary
    head runs last."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                                  nn.Conv2d(4, 2, 1))
        self.auxiliary_head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.b(self.a(x))
        return self.head(x), self.auxiliary_head(x)


def test_forward_order_not_registration_order():
    model = LateRegistered()
    layers, classifier, skipped = trace_layers(
        model, lambda: model(torch.randn(1, 3, 6, 6)))
    assert [layer.path for layer in layers] == ['head.0', 'b', 'a']
    assert classifier == 'head.2'
    assert layers[0].norm == 'head.1' and layers[1].norm is None
    assert skipped == ['auxiliary_head (auxiliary head)']


def hand_costs():
    """Three layers, A last; B and C read one input (as ASPP branches do),
    freed only when both are filtered. Saved bytes, FLOPs and peaks are
    made-up round numbers."""
    a, b, c = (Layer(p, None, (1, ), (1, 1, 8, 8), radii) for p, radii in
               (('A', [(2, 2)]), ('B', [(2, 2), (4, 4)]), ('C', [(2, 2)])))
    r2, r4 = (2, 2), (4, 4)
    # (bytes, choice that keeps it, layers): A keeps 15 vanilla, 2 at r2;
    # B 20 vanilla, 4 at r2, 1 at r4; C 3 at r2, and vanilla the 20 it
    # reads with B
    sa = [(15, None, {'A'}), (2, r2, {'A'})]
    sb = [(4, r2, {'B'}), (1, r4, {'B'})]
    flops = {'A': {None: 100, r2: 10}, 'B': {None: 200, r2: 40, r4: 20},
             'C': {None: 200, r2: 30}}
    # the filtered steps (each layer at its largest radius) save 17, 28
    # and 71 and peak as much lower: a peak that moves with the saved bytes
    prefixes = [
        PrefixCosts(0, 10, 100, 0, 10),
        PrefixCosts(1, 30, 120, 100, 15, sa, filtered_saved_bytes=17,
                    filtered_peak_bytes=107),
        PrefixCosts(2, 60, 150, 300, 25, sa + sb + [(20, None, {'B'})],
                    filtered_saved_bytes=28, filtered_peak_bytes=118),
        PrefixCosts(3, 100, 190, 500, 65,
                    sa + sb + [(20, None, {'B', 'C'}), (3, r2, {'C'})],
                    filtered_saved_bytes=71, filtered_peak_bytes=161),
    ]
    for p in prefixes:
        p.storages = [(n, r, frozenset(s)) for n, r, s in p.storages]
        p.layer_flops = {k: flops[k] for k in 'ABC'[:p.trained]}
    cosines = {'A': {r2: 0.9}, 'B': {r2: 0.8, r4: 0.4}, 'C': {r2: 0.6}}
    return prefixes, [a, b, c], cosines


def radii_of(plan):
    return {p: r and r[0] for p, r in plan.radii.items()}


@pytest.mark.parametrize('budget,min_cos,radii,saved,flops,peak', [
    # 3 layers need 100 - (15 - 2) - (20 - 4 - 3) = 74 at least: over 40;
    # 2 layers fit only both filtered: 60 - 13 - 16 = 31
    (Budget(40), 0.5, {'A': 2, 'B': 2}, 31, 300 - 90 - 160, 150 - 29),
    # B at r4 saves more (28) but its cosine 0.4 is lower: r2 still
    (Budget(40), 0.3, {'A': 2, 'B': 2}, 31, 50, 121),
    # 2 layers, three plans fit: A alone filtered (47) has the best mean
    # cosine, (0.9 + 1) / 2
    (Budget(50), 0.5, {'A': 2, 'B': None}, 47, 210, 137),
    # 3 layers fit only all filtered: B alone frees nothing (B and C share)
    (Budget(80), 0.5, {'A': 2, 'B': 2, 'C': 2}, 74, 80, 164),
    # ... but its 80 backward FLOPs are over 60
    (Budget(80, None, 60), 0.5, {'A': 2, 'B': 2}, 31, 50, 121),
    # ... and its predicted peak 190 - 26 over 150: two vanilla layers peak
    # at 150 exactly
    (Budget(80, 150), 0.5, {'A': None, 'B': None}, 60, 300, 150),
    # C's cosine below the least: only vanilla for it, so 3 layers no
    # longer fit, and 2 vanilla ones do
    (Budget(80), 0.7, {'A': None, 'B': None}, 60, 300, 150),
    # B's too: 2 layers do not fit (A alone filtered saves 47), 1 vanilla
    # does
    (Budget(40), 0.85, {'A': None}, 30, 100, 120),
])
def test_selection_rule(budget, min_cos, radii, saved, flops, peak):
    prefixes, layers, cosines = hand_costs()
    chosen, front = choose_plan(prefixes, layers, cosines, budget, min_cos)
    assert radii_of(chosen) == radii
    assert (chosen.saved_bytes, chosen.backward_flops,
            chosen.peak_bytes) == (saved, flops, peak)
    assert [p.trained for p in front] == [0, 1, 2, 3]


def test_front_and_smallest():
    prefixes, layers, cosines = hand_costs()
    chosen, front = choose_plan(prefixes, layers, cosines, Budget(40), 0.5)
    # over budget, a row is its prefix's smallest plan
    assert radii_of(front[3]) == {'A': 2, 'B': 2, 'C': 2}
    assert not front[3].fits(Budget(40))
    assert front[2].mean_cosine == pytest.approx(0.85)
    assert front[0].saved_bytes == 10 and front[0].mean_cosine == 1
    # the least saved of 3 layers, every radius allowed: B at r4
    assert min_figures(prefixes[3], layers).saved_bytes == 100 - 13 - 19 + 3
    # a peak that filtering does not move (it falls before the saved
    # tensors are all alive) stays; one that moves less, moves in step
    prefixes[2].filtered_peak_bytes = 150
    assert choose_plan(prefixes, layers, cosines, Budget(40),
                       0.5)[0].peak_bytes == 150
    prefixes[2].filtered_peak_bytes = 134  # half the saving's 32
    assert choose_plan(prefixes, layers, cosines, Budget(40),
                       0.5)[0].peak_bytes == round(150 - 16 * 29 / 32)
    # not even the classifier alone fits
    assert choose_plan(prefixes, layers, cosines, Budget(5), 0.5)[0] is None


def test_pooled_input_shared_at_one_radius():
    # B and C read one input (20 while either is vanilla); filtered convs of
    # one radius pool it once (5 at r2, 2 at r4), of two radii once each
    r2, r4 = (2, 2), (4, 4)
    both = frozenset('BC')
    prefix = PrefixCosts(2, 30, 0, 0, 10,
                         [(20, None, both), (5, r2, both), (2, r4, both)],
                         {p: {None: 0, r2: 0, r4: 0} for p in 'BC'})
    options = {p: [(None, 1.0), (r2, 1.0), (r4, 1.0)] for p in 'BC'}
    deltas = {(dict(s[3])['B'], dict(s[3])['C']): s[0] for s in
              plan_mod._group_options(prefix, ['B', 'C'], options)}
    assert deltas[None, None] == 0
    assert deltas[r2, r2] == 5 - 20
    assert deltas[r2, r4] == 5 + 2 - 20
    assert deltas[r2, None] == 5
    assert deltas[r4, r4] == 2 - 20


def test_large_groups_choose_one_radius(monkeypatch):
    # above the limit, B and C (sharing their input) take one choice
    # together: all vanilla or both at r2 (C has no r4)
    monkeypatch.setattr(plan_mod, 'MAX_GROUP_OPTIONS', 1)
    prefixes, layers, cosines = hand_costs()
    plans = plan_mod.prefix_plans(prefixes[3], layers, cosines, -1)
    pairs = {(p.radii['B'], p.radii['C']) for p in plans}
    assert pairs <= {(None, None), ((2, 2), (2, 2))}


def test_written_config_replaces_the_hook(tmp_path):
    pytest.importorskip('mmpretrain')
    base = Config.fromfile(str(CLS))
    assert [h['type'] for h in base.custom_hooks] == [
        'PretrainedCheckHook', 'GradientFilterHook']
    hook = dict(type='GradientFilterHook',
                filter_install=[dict(path='backbone.layer4.1.conv2',
                                     radius=2),
                                dict(path='backbone.layer4.1.conv1',
                                     radius=[2, 4])],
                freeze_layers=['backbone', '~backbone.layer4.1'])
    path = tmp_path / 'config.py'
    path.write_text(plan_config(str(CLS), hook, True, ['# a comment']))
    cfg = Config.fromfile(str(path))
    assert [h['type'] for h in cfg.custom_hooks] == [
        'PretrainedCheckHook', 'GradientFilterHook']
    assert cfg.custom_hooks[1].to_dict() == hook
    assert cfg.model == base.model  # the rest is the base's

    # a base without custom_hooks
    path.write_text(plan_config(str(SEG), hook, False))
    cfg = Config.fromfile(str(path))
    assert [h.to_dict() for h in cfg.custom_hooks] == [hook]


def test_predicted_peak_never_below_the_classifier_alone():
    # prefix 2's filtered step peaks at 118, below the classifier alone's
    # measured 125: both filtered (29 of 32 freed) would interpolate to 121
    prefixes, layers, cosines = hand_costs()
    prefixes[2].least_peak_bytes = 125
    chosen, front = choose_plan(prefixes, layers, cosines, Budget(40), 0.5)
    assert radii_of(chosen) == {'A': 2, 'B': 2}
    assert chosen.peak_bytes == 125
    assert min_figures(prefixes[2], layers).peak_bytes == 125
    # a prediction above the bound is left as it is
    assert prefixes[2].peak_at(0) == 150


def test_every_prefix_keeps_the_classifier_alone_as_least_peak(monkeypatch):
    # peaks made up: longer prefixes measured below the classifier alone
    peaks = [100, 80, 90]

    def measure_prefix(model, recipe, layers, k, *args):
        return PrefixCosts(k, 10 * (k + 1), peaks[k], 0)

    monkeypatch.setattr(planner, 'measure_prefix', measure_prefix)
    layers = [Layer(p, None, (1, ), (1, 1, 8, 8), []) for p in 'AB']
    calls = []
    prefixes, stop = measure_prefixes(
        None, layers, lambda plan_layers: None, Config(dict(optim_wrapper={})),
        {}, torch.device('cpu'), Budget(25), lambda: calls.append(1))
    assert [p.trained for p in prefixes] == [0, 1] and stop.trained == 2
    assert len(calls) == 3
    assert prefixes[0].least_peak_bytes is None
    assert prefixes[1].least_peak_bytes == stop.least_peak_bytes == 100
    assert min_figures(prefixes[1], layers).peak_bytes == 100


def test_plan_measured_over_budget_gives_way():
    # A filtered predicts 30 - 15 + 2 = 17 <= 20, but measures 25% more:
    # refused; the next choice is made under 20 * 17 / 21.25 = 16, which
    # only the classifier alone (10, measured 12.5) meets
    layers = [Layer('A', None, (1, ), (1, 1, 8, 8), [(2, 2)])]
    prefixes = [
        PrefixCosts(0, 10, 100, 0),
        PrefixCosts(1, 30, 120, 100, 15,
                    [(15, None, frozenset('A')), (2, (2, 2), frozenset('A'))],
                    {'A': {None: 100, (2, 2): 10}})]
    measured = []

    def measure(plan):
        measured.append(plan.saved_bytes)
        return dict(saved_bytes=1.25 * plan.saved_bytes,
                    peak_bytes=plan.peak_bytes)

    chosen, figures, rejected = choose_measured(
        prefixes, layers, {'A': {(2, 2): 0.9}}, Budget(20), 0.5, measure)
    assert measured == [17, 10]
    assert chosen.trained == 0 and figures['saved_bytes'] == 12.5
    assert [(p.trained, p.radii) for p, _ in rejected] == [(1, {'A': (2, 2)})]


def demo_config(data_root, **changes) -> Config:
    cfg = Config.fromfile(str(SEG))
    cfg.merge_from_dict({'train_dataloader.dataset.data_root': str(data_root),
                         **changes})
    return cfg


@pytest.fixture
def no_measure(monkeypatch):
    """Measuring anything fails the test."""

    def measured(*_, **__):
        raise AssertionError('measured before the input was checked')

    monkeypatch.setattr(planner, 'measure_prefix', measured)
    monkeypatch.setattr(planner, 'layer_cosines', measured)


def refusal(cfg: Config, **kwargs) -> str:
    with pytest.raises(PlanError) as error:
        plan_budget(cfg, Budget(MB), **kwargs)
    return str(error.value)


def test_bad_inputs_refused_before_measuring(tmp_path, digits_shift_weights,
                                             no_measure):
    pytest.importorskip('mmseg')
    data_root, checkpoint = digits_shift_weights
    no_model = tmp_path / 'no_model.py'
    no_model.write_text('x = 1\n')
    assert refusal(Config.fromfile(str(no_model))) == \
        f'{no_model} has no model: nothing to plan'

    missing = tmp_path / 'nope.pth'
    message = refusal(demo_config(data_root), checkpoint=str(missing))
    assert f'"{missing}" (set by --checkpoint or load_from)' in message

    # the demo's own load_from, not written yet: the command that writes it
    calib = tmp_path / 'deeplabv3_r18-tiny-d8_calib_1xb8-1k_digits-64x64'
    message = refusal(demo_config(
        data_root, load_from=str(calib / 'iter_1000.pth')))
    assert 'make demo' in message

    message = refusal(demo_config(tmp_path / 'no_data'),
                      checkpoint=str(checkpoint))
    assert message.startswith('training data: ')
    assert message.endswith('(or pass --synthetic-data)')

    no_size = demo_config(data_root, crop_size=None)
    no_size.model.data_preprocessor.size = None
    message = refusal(no_size, checkpoint=str(checkpoint))
    assert 'names no training size' in message
    assert message.endswith('give --input-size H W')

    # the paper's config without its VOC data (MMSeg asserts the ann_file)
    if not (ROOT / 'data' / 'VOCdevkit').exists():
        voc = (ROOT / 'configs' / 'deeplabv3' /
               'deeplabv3_r18-d8_filt5L_4xb2-20k_voc12aug-512x512.py')
        cfg = Config.fromfile(str(voc))
        cfg.load_from = None
        assert refusal(cfg).startswith('training data: ')


def test_budget_no_plan_meets(digits_shift_weights):
    pytest.importorskip('mmseg')
    data_root, checkpoint = digits_shift_weights
    with pytest.raises(PlanError) as error:
        plan_budget(demo_config(data_root), Budget(0.001 * MB), batch_size=2,
                    checkpoint=str(checkpoint))
    message = str(error.value)
    assert message.startswith(
        'no plan fits the budget: not even the classifier alone fits; the '
        'smallest plan, the classifier alone, needs ')
    # the smallest figures, as numbers
    saved = float(message.split('needs ')[1].split(' MB')[0])
    assert saved > 0.001
    assert 'MB peak' in message and 'backward GFLOPs' in message


@pytest.mark.parametrize('args,kept', [
    (dict(), {}),
    (dict(lean_memory=True, norm_eval=True), {}),
    (dict(lean_memory=False), dict(lean_memory=False)),
    (dict(filter_norm=False, norm_eval=False),
     dict(norm_eval=False, filter_norm=False)),
])
def test_plans_keep_the_configs_own_settings(args, kept):
    # the written config's hook repeats those that are not the defaults;
    # filters and freezing are the plan's
    recipe = GradientFilterRecipe(
        filter_install=[dict(path='a', radius=2)], freeze_layers=['b'], **args)
    assert planner.kept_settings(recipe) == kept
