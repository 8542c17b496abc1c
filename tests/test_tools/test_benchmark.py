"""tools/benchmark.py end to end on tiny inputs (CPU)."""
import csv
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from mmgradfilt.benchmark import layers as layers_module
from mmgradfilt.benchmark.layers import load_layer_suite
from mmgradfilt.benchmark.memory import (KINDS, STEP_PHASES, SavedTensorMeter,
                                         peak_phase, step_peaks)
from mmgradfilt.benchmark.tables import peak_notes
from mmgradfilt.benchmark.step import step_size, train_input_size
from mmgradfilt.benchmark.timing import paired_ratio, summarize

ROOT = Path(__file__).resolve().parents[2]
DEMO = (ROOT / 'configs' / 'demo_seg' /
        'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py')
# what third-party code printed on every run (deprecations, the profiler and
# CUDA probing on a CPU machine): none of it is the tool's to say
NOISE = ('pkg_resources', 'USDT', 'gpuGetDeviceCount', 'Warning')

SEG_CONFIG = """
_base_ = ['mmseg::deeplabv3/deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['mmgradfilt'], allow_failed_imports=False)
custom_hooks = [dict(
    type='GradientFilterHook',
    filter_install=[dict(path='decode_head.bottleneck', radius=2),
                    dict(path='decode_head.aspp_modules.1', radius=2)],
    freeze_layers=['backbone', 'auxiliary_head', 'decode_head',
                   '~decode_head.bottleneck', '~decode_head.aspp_modules',
                   '~decode_head.conv_seg'])]
"""

CLS_CONFIG = """
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
custom_imports = dict(imports=['mmgradfilt'], allow_failed_imports=False)
custom_hooks = [dict(
    type='GradientFilterHook',
    filter_install=[dict(path='backbone.layer4.1', radius=2)],
    freeze_layers=['backbone', '~backbone.layer4.1'])]
"""


def run_tool(*args, cwd=ROOT):
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_csv(path: Path):
    """Rows of a CSV file as dicts, the numeric columns (their names end in
    a unit) as floats; an empty cell is None."""
    rows = list(csv.DictReader(path.open()))
    for row in rows:
        for key, value in row.items():
            if key.endswith(('_ms', '_MB', '_GFLOPs', '_x')):
                row[key] = None if value == '' else float(value)
    return rows


def check_png(path: Path):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('text,size,layers,options', [
    (SEG_CONFIG, '64', {'decode_head.bottleneck.conv',
                        'decode_head.aspp_modules.1.conv'}, []),
    # the exact lean step, and the one with filtered norms on top
    (CLS_CONFIG, '32', {'backbone.layer4.1.conv1', 'backbone.layer4.1.conv2'},
     ['--filter-norm', '--cfg-options', 'custom_hooks.0.filter_norm=False']),
])
def test_config_mode(tmp_path, text, size, layers, options):
    config = tmp_path / 'cfg.py'
    config.write_text(text)
    out = tmp_path / 'out'
    stdout = run_tool(str(config), '--input-size', size, size,
                      '--batch-size', '2', '--iters', '2', '--warmup', '1',
                      '--out', str(out), *options).stdout
    filter_norm = '--filter-norm' in options
    result = json.loads((out / 'benchmark.json').read_text())
    settings = [v['settings'] for v in result['variants']]
    assert settings[:2] == [None, dict(lean_memory=False, filter_norm=False)]
    assert settings[2]['lean_memory'] is True
    # --filter-norm adds the hook with filter_norm=True where the config's
    # lean step does not have it already
    extra = filter_norm and not settings[2]['filter_norm']
    assert extra == bool(options)
    # the cached step is measured where the frozen part is a function of
    # the sample: not with the seg config's frozen auxiliary head (dropout)
    cached = text is CLS_CONFIG
    assert ('filtered+lean+cache not measured: auxiliary_head.dropout: '
            'active dropout' in stdout) == (not cached)
    keys = ['vanilla', 'filtered', 'lean', *(['lean_norm'] * extra),
            *(['cached'] * cached)]
    labels = ['vanilla', 'filtered', 'filtered+lean',
              *(['filtered+lean+norm'] * extra),
              *(['filtered+lean+cache'] * cached)]
    assert [v['key'] for v in result['variants']] == keys
    assert [v['label'] for v in result['variants']] == labels
    if extra:
        assert settings[3] == dict(lean_memory=True, filter_norm=True)
    assert 'forward ms' in stdout and 'step vs filtered' in stdout
    assert 'Where the memory goes' in stdout and 'peak loss MB' in stdout
    assert f'{size}x{size} (--input-size), batch 2 (--batch-size)' in stdout
    assert set(result['filtered_layers']) == layers
    van, fil = result['vanilla'], result['filtered']
    for path in layers:
        # the filter keeps less for backward and computes fewer FLOPs
        assert fil['layers'][path]['saved_bytes'] < \
            van['layers'][path]['saved_bytes']
        assert fil['layers'][path]['backward_flops'] < \
            van['layers'][path]['backward_flops']
    for key in keys:
        res = result[key]
        assert sum(res['saved_by_kind'].values()) == res['saved_bytes']
        assert res['peak_bytes'] == max(
            p for p in res['phase_peak_bytes'].values() if p is not None)
        assert res['peak_phase'] in STEP_PHASES
        # a line under the tables says where each model's peak is
        label = labels[keys.index(key)]
        assert f"{label}: peak {res['peak_bytes'] / 2**20:.1f} MB in the " \
            f"{res['peak_phase']}" in stdout
    # the lean step keeps less: 1-bit ReLU masks (and the banded loss)
    lean = result['lean']
    assert lean['saved_by_kind']['activation'] < \
        fil['saved_by_kind']['activation'] / 8
    assert lean['saved_bytes'] < fil['saved_bytes']
    for key in keys[1:]:
        ratios = result['ratios'][key]
        for time in ('forward', 'backward', 'optimizer', 'step'):
            assert result[key][time]['n'] == 2
            assert result[key][time]['median'] > 0
            # time ratios come from the steps taken in turn
            assert ratios[time] == pytest.approx(statistics.median(
                v / f for v, f in zip(van[time]['samples'],
                                      result[key][time]['samples'])))
        assert ratios['saved'] == pytest.approx(
            van['saved_bytes'] / result[key]['saved_bytes'])
    assert result['ratios']['lean']['step_vs_filtered'] == pytest.approx(
        statistics.median(a / b for a, b in zip(lean['step']['samples'],
                                                fil['step']['samples'])))
    rows = {row['layer']: row for row in read_csv(out / 'benchmark.csv')}
    assert list(rows) == ['whole model', *result['filtered_layers'],
                          'filtered layers (sum)']
    whole, total = rows['whole model'], rows['filtered layers (sum)']
    assert whole['step_speedup_x'] == pytest.approx(
        result['ratios']['filtered']['step'])
    assert whole['step_lean_speedup_x'] == pytest.approx(
        result['ratios']['lean']['step'])
    assert whole['step_lean_vs_filtered_x'] == pytest.approx(
        result['ratios']['lean']['step_vs_filtered'])
    assert whole['backward_vanilla_ms'] == pytest.approx(
        van['backward']['median'])
    assert whole['peak_filtered_MB'] == pytest.approx(
        fil['peak_bytes'] / 2**20)
    for key in keys:
        res = result[key]
        assert whole[f'peak_{key}_MB'] == pytest.approx(
            res['peak_bytes'] / 2**20)
        assert whole[f'peak_phase_{key}'] == res['peak_phase']
        assert whole[f'peak_trained_forward_{key}_MB'] == pytest.approx(
            res['phase_peak_bytes']['trained forward'] / 2**20)
        assert sum(whole[f'saved_{kind}_{key}_MB'] for kind in KINDS) == \
            pytest.approx(res['saved_bytes'] / 2**20)
    for key in keys[2:]:
        assert whole[f'saved_{key}_MB'] == pytest.approx(
            result[key]['saved_bytes'] / 2**20)
        assert whole[f'saved_{key}_ratio_x'] == pytest.approx(
            result['ratios'][key]['saved'])
    assert whole['saved_filtered_MB'] == pytest.approx(
        fil['saved_bytes'] / 2**20)
    assert total['backward_flops_ratio_x'] > 1
    for path in layers:  # measured per step, not per layer
        assert rows[path]['step_vanilla_ms'] is None
        assert rows[path]['saved_lean_MB'] is None
        assert rows[path]['saved_filtered_MB'] == pytest.approx(
            fil['layers'][path]['saved_bytes'] / 2**20)
    check_png(out / 'benchmark.png')


def test_layer_mode(tmp_path):
    shapes = tmp_path / 'shapes.json'
    shapes.write_text(json.dumps([
        dict(name='dense', in_channels=8, out_channels=8, kernel_size=3,
             size=16),
        dict(name='depthwise', in_channels=8, out_channels=8, kernel_size=3,
             size=16, groups=8),
    ]))
    stdout = run_tool('--layers', str(shapes), '--radius', '2', '4',
                      '--iters', '2', '--warmup', '1', cwd=tmp_path).stdout
    assert 'bwd speedup' in stdout
    assert 'vanilla:  nn.Conv2d, PyTorch\'s backward' in stdout  # the legend
    # the file's own folder, not the built-in suite's
    out = tmp_path / 'work_dirs' / 'benchmark' / 'layers_shapes'
    assert not (tmp_path / 'work_dirs' / 'benchmark' / 'layers').exists()
    saved = json.loads((out / 'layers.json').read_text())
    assert saved['complete'] is True
    results = saved['results']
    assert [(r['name'], r['radius']) for r in results] == [
        ('dense', 2), ('dense', 4), ('depthwise', 2), ('depthwise', 4)]
    dense_r4 = results[1]
    van, fil = dense_r4['vanilla'], dense_r4['filtered']
    assert dense_r4['backward_speedup'] == pytest.approx(statistics.median(
        v / f for v, f in zip(van['backward']['samples'],
                              fil['backward']['samples'])))
    assert dense_r4['forward_speedup'] == pytest.approx(statistics.median(
        v / f for v, f in zip(van['forward']['samples'],
                              fil['forward']['samples'])))
    # 3x3 taps summed and 4x4 patches: 16 * 9 times fewer products
    assert dense_r4['vanilla']['backward_flops'] > \
        100 * (dense_r4['filtered']['backward_flops'] - 2 * 8 * 16 * 16)
    table = read_csv(out / 'layers.csv')
    assert [(r['layer'], r['radius']) for r in table] == [
        ('dense', '2'), ('dense', '4'), ('depthwise', '2'), ('depthwise', '4')]
    assert table[1]['backward_speedup_x'] == pytest.approx(
        dense_r4['backward_speedup'])
    assert table[1]['forward_filtered_ms'] == pytest.approx(
        fil['forward']['median'])
    check_png(out / 'layers.png')


def test_missing_config_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'benchmark.py'),
         str(tmp_path / 'nope.py')],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert f'config file {tmp_path / "nope.py"} not found' in proc.stderr


def test_config_without_hook_is_refused(tmp_path):
    config = tmp_path / 'cfg.py'
    config.write_text(
        "_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert 'must have exactly one GradientFilterHook' in proc.stderr


def test_paired_ratio_cancels_a_slow_spell():
    # filtered runs take half the time of the vanilla run before them; the
    # machine slows down 3x between the 4th vanilla and filtered runs
    vanilla = [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    filtered = [0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5]
    van, fil = summarize(vanilla), summarize(filtered)
    assert van['median'] / fil['median'] == pytest.approx(2 / 3)
    assert paired_ratio(van, fil) == pytest.approx(2.0)
    assert paired_ratio(fil, van) == pytest.approx(0.5)
    with pytest.raises(ValueError, match='same runs'):
        paired_ratio(van, summarize(filtered[:4]))


@pytest.mark.parametrize('entry,message', [
    (dict(name='a', in_channels=8, out_channels=8, kernel=3, size=16),
     "unexpected keyword argument 'kernel'"),
    (dict(name='a', in_channels=8, out_channels=8, kernel_size=3),
     "missing 1 required positional argument: 'size'"),
    (dict(name='a', in_channels=0, out_channels=8, kernel_size=3, size=16),
     'in_channels must be a positive integer, got 0'),
    (dict(name='a', in_channels=8, out_channels=8, kernel_size=3, size=16,
          stride=1.5), 'stride must be a positive integer, got 1.5'),
    (dict(name='a', in_channels=8, out_channels=6, kernel_size=3, size=16,
          groups=4), 'groups (4) must divide in_channels (8) and '
     'out_channels (6)'),
])
def test_layer_file_errors_name_the_layer(tmp_path, entry, message):
    good = dict(name='ok', in_channels=4, out_channels=4, kernel_size=1, size=8)
    path = tmp_path / 'shapes.json'
    path.write_text(json.dumps([good, entry]))
    with pytest.raises(ValueError) as info:
        load_layer_suite(str(path))
    assert f'{path}, layer 1 ' in str(info.value)
    assert message in str(info.value)


def test_bad_layer_file_stops_before_measuring(tmp_path):
    path = tmp_path / 'shapes.json'
    path.write_text(json.dumps({'name': 'not a list'}))
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--layers',
         str(path), '--out', str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert 'expected a non-empty JSON list of layers' in proc.stderr
    assert not (out / 'layers.json').exists()


def test_layer_results_survive_a_crash(tmp_path, monkeypatch):
    measured = []

    def bench_layer(shape, radius, *args):
        if measured:  # the second layer: out of memory, Ctrl-C, ...
            raise KeyboardInterrupt
        measured.append(dict(name=shape.name, radius=radius))
        return measured[-1]

    monkeypatch.setattr(layers_module, 'bench_layer', bench_layer)
    path = tmp_path / 'layers.json'
    with pytest.raises(KeyboardInterrupt):
        layers_module.bench_layers(
            load_layer_suite(None), [2, 4], 2, torch.device('cpu'),
            torch.float32, 1, 0, str(path), dict(device='cpu'))
    saved = json.loads(path.read_text())
    assert saved['complete'] is False
    assert saved['env'] == dict(device='cpu')
    assert saved['results'] == [dict(name='dense3x3 640-128 @64', radius=2)]
    assert not (tmp_path / 'layers.json.tmp').exists()


def test_demo_config_at_its_own_size(tmp_path):
    # the tool's defaults are the config's training size and batch, as the
    # config says them (its crop_size; no crop in its pipeline)
    pytest.importorskip('mmseg')
    cfg = Config.fromfile(str(DEMO))
    assert not any(t['type'] in ('RandomCrop', 'RandomResizedCrop', 'Resize')
                   for t in cfg.train_dataloader.dataset.pipeline)
    size, batch = list(cfg.crop_size), cfg.train_dataloader.batch_size
    out = tmp_path / 'out'
    proc = run_tool(str(DEMO), '--iters', '1', '--warmup', '0', '--out',
                    str(out))
    result = json.loads((out / 'benchmark.json').read_text())
    assert result['input_size'] == size
    assert result['env']['batch_size'] == batch
    assert (f'{size[0]}x{size[1]} (config: crop_size), batch {batch} '
            '(config: train_dataloader.batch_size)') in proc.stdout
    # a legend under the tables says what the columns are
    legend = proc.stdout.split('filtered layers (sum)')[1]
    assert 'the config\'s model with the config\'s freezing and no gradient ' \
        'filter (PyTorch\'s backward)' in legend
    assert 'filtered+lean: ' in legend and 'lean_memory=True' in legend
    assert 'above 1 the model is faster' in legend
    # only what the tool has to say
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise


@pytest.mark.parametrize('pipeline,expected', [
    # as MMSeg's VOC: a random rescale, then a crop, (h, w)
    ([dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0)),
      dict(type='RandomCrop', crop_size=(512, 256))],
     ((512, 256), 'train pipeline RandomCrop crop_size')),
    # CIFAR upsampled for an ImageNet model: the last fixed size wins;
    # mmcv's Resize scale is (w, h)
    ([dict(type='RandomCrop', crop_size=32, padding=4),
      dict(type='Resize', scale=(320, 240))],
     ((240, 320), 'train pipeline Resize scale')),
    ([dict(type='mmpretrain.RandomResizedCrop', scale=224),
      dict(type='Resize', scale=(512, 512), keep_ratio=True)],
     ((224, 224), 'train pipeline RandomResizedCrop scale')),
    ([dict(type='PackInputs')], None),
])
def test_train_input_size_from_the_pipeline(pipeline, expected):
    # inside a dataset wrapper, as the user-split configs have it
    cfg = Config(dict(train_dataloader=dict(dataset=dict(
        type='UserSplitDataset', dataset=dict(pipeline=pipeline)))))
    assert train_input_size(cfg) == expected


def test_train_input_size_elsewhere():
    model = dict(data_preprocessor=dict(size=(48, 40)))
    assert train_input_size(Config(dict(model=model))) == (
        (48, 40), 'model.data_preprocessor.size')
    assert train_input_size(Config(dict(crop_size=(32, 24), model=model))) \
        == ((32, 24), 'crop_size')


def test_no_size_in_the_config_asks_for_one(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text('train_dataloader = dict(batch_size=4, dataset=dict('
                    "pipeline=[dict(type='PackInputs')]))\n")
    cfg = Config.fromfile(str(path))
    with pytest.raises(ValueError, match='cfg.py names no training size.*'
                       'give --input-size H W'):
        step_size(cfg)
    assert step_size(cfg, [8, 8]) == (
        (8, 8), 4, '8x8 (--input-size), batch 4 (config: '
        'train_dataloader.batch_size)')
    assert step_size(cfg, [8, 8], 2)[1:] == (
        2, '8x8 (--input-size), batch 2 (--batch-size)')
    del cfg.train_dataloader.batch_size
    with pytest.raises(ValueError, match='cfg.py has no train_dataloader.'
                       'batch_size: give --batch-size N'):
        step_size(cfg, [8, 8])


def test_help_shows_the_defaults():
    proc = run_tool('--help')
    text = ' '.join(proc.stdout.split())
    assert "default: the config's training size" in text
    assert "default: the config's train_dataloader.batch_size" in text
    assert '(default: 10)' in text and '(default: 3)' in text


class _Head(nn.Module):
    """A trained linear head with a loss method, as MMPretrain's heads."""

    def __init__(self, loss_temp: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.nll = nn.NLLLoss()
        self.loss_temp = loss_temp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))

    def _get_loss(self, scores: torch.Tensor,
                  target: torch.Tensor) -> torch.Tensor:
        logp = scores.log_softmax(1)
        if self.loss_temp:  # a big temporary, freed before the loss returns
            logp = logp + torch.zeros(self.loss_temp).sum()
        return self.nll(logp, target)


class _Toy(nn.Module):
    """A frozen conv block (optionally with a big temporary in its
    forward), a trained conv-BN-ReLU and a functional op, then the head."""

    def __init__(self, frozen_temp: int = 0, loss_temp: int = 0) -> None:
        super().__init__()
        self.frozen = nn.Conv2d(2, 2, 3, padding=1)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()
        self.head = _Head(loss_temp)
        self.frozen_temp = frozen_temp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
            if self.frozen_temp:
                x = x + torch.zeros(self.frozen_temp).sum()
        x = self.relu(self.bn(self.conv(x)))
        x = torch.exp(x)[:, :, :2, :2]  # a functional op: "other"
        return self.head(x)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.head._get_loss(self(x), target)


def test_saved_bytes_by_kind_add_up():
    model = _Toy()
    x, target = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    parts = dict(conv=model.conv, bn=model.bn, relu=model.relu)
    with SavedTensorMeter(model, parts) as meter:
        model.loss(x, target)
    kinds = meter.kind_bytes
    assert set(kinds) == set(KINDS)
    assert sum(kinds.values()) == meter.total_bytes
    # nothing shared between these modules: each kind is its module's bytes
    assert kinds['conv'] == meter.module_bytes['conv'] == x.numel() * 4
    assert kinds['norm'] == meter.module_bytes['bn'] > 0
    assert kinds['activation'] == meter.module_bytes['relu'] == 2 * 2 * 16 * 4
    # exp's output, and the fc's input (flattening the slice copies it):
    # modules of no kind of their own, outside the loss
    assert kinds['other'] == 2 * 2 * 16 * 4 + 2 * 8 * 4
    # log_softmax's output, and the NLLLoss module's target inside the loss
    assert kinds['loss'] >= 2 * 3 * 4 + target.numel() * 8
    assert meter.total_bytes == sum(kinds.values())
    # by storage, each once, with the given modules that saved it ('' for
    # none of them: exp, the head)
    savers = list(meter.savers.values())
    assert sum(nbytes for nbytes, _ in savers) == meter.total_bytes
    assert set().union(*(names for _, names in savers)) == {
        'conv', 'bn', 'relu', ''}
    for name in parts:
        assert sum(nbytes for nbytes, names in savers if name in names) == \
            meter.module_bytes[name]


def test_loss_methods_are_given_back():
    model = _Toy()
    lean = functools.partial(_Head._get_loss, model.head)
    other = _Toy()
    other.head._get_loss = lean  # an instance attribute, as the lean loss
    for m in (model, other):
        before = vars(m.head).get('_get_loss')
        with SavedTensorMeter(m):
            assert vars(m.head)['_get_loss'] is not before
        assert vars(m.head).get('_get_loss') is before
    # no global module hook is left behind
    from torch.nn.modules import module
    assert not module._global_forward_pre_hooks
    assert not module._global_forward_hooks


def _toy_peaks(**temps):
    model = _Toy(**temps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    held = {}
    phases = [('forward', lambda: held.update(loss=model.loss(x, target))),
              ('backward', lambda: held.pop('loss').backward()),
              ('optimizer', optimizer.step)]
    return step_peaks(model, phases, torch.device('cpu'))


@pytest.mark.parametrize('temps,phase', [
    (dict(), None),
    (dict(frozen_temp=4 * 2**20), 'frozen forward'),
    (dict(loss_temp=4 * 2**20), 'loss'),
])
def test_peak_phase(temps, phase):
    peak, peaks = _toy_peaks(**temps)
    assert set(peaks) == set(STEP_PHASES)
    assert peak == max(peaks.values())
    if phase is None:  # small temporaries: no 16 MB anywhere
        assert peak < 2**20
        return
    assert peak_phase(peaks) == phase
    assert 16 * 2**20 <= peak < 17 * 2**20
    for other in STEP_PHASES:
        if other != phase:
            assert peaks[other] < 2**20


def _fake_result(phase):
    kinds = dict.fromkeys(KINDS, 0)
    kinds['norm'] = 3 * 2**20
    res = dict(saved_bytes=3 * 2**20, saved_by_kind=kinds,
               peak_bytes=10 * 2**20, peak_phase=phase)
    return dict(variants=[dict(key='vanilla', label='vanilla')], vanilla=res)


def test_frozen_forward_peak_names_gradient_accumulation():
    line, hint = peak_notes(_fake_result('frozen forward'))
    assert line == ('vanilla: peak 10.0 MB in the frozen forward; most saved '
                    'by norm modules (3.0 of 3.0 MB)')
    assert hint.startswith('The peak of vanilla is in the frozen layers')
    assert 'accumulative_counts' in hint
    (line, ) = peak_notes(_fake_result('loss'))
    assert 'in the loss' in line and 'accumulative_counts' not in line
