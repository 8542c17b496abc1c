"""Gradient fidelity: ``mmgradfilt.analysis.fidelity`` and
tools/grad_fidelity.py on the demo config."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmengine.model import BaseModel

from mmgradfilt.analysis.fidelity import (CONV_NORM_METRICS, METRICS,
                                          NORM_METRICS, GradientRecorder,
                                          cosine, layer_fidelity,
                                          measure_fidelity, relative_error)
from mmgradfilt.layers import GradFilterConv2d

ROOT = Path(__file__).resolve().parents[2]
FILT = (ROOT / 'configs' / 'demo_seg' /
        'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py')
CALIB = 'deeplabv3_r18-tiny-d8_calib_1xb8-1k_digits-64x64'
# what third-party code printed on every run (deprecations, the profiler and
# CUDA probing on a CPU machine): none of it is the tools' to say
NOISE = ('pkg_resources', 'USDT', 'gpuGetDeviceCount', 'Warning')


def smooth_field(*shape: int, width: int = 9) -> torch.Tensor:
    """Noise averaged over ``width``-pixel windows (wrapping round): a
    feature-map-like field, correlated over a few pixels."""
    noise = torch.randn(*shape, dtype=torch.float64)
    pad = (width // 2, ) * 4
    return F.avg_pool2d(F.pad(noise, pad, mode='circular'), width, 1)


def filtered_conv(dilation: int, radius: int) -> GradFilterConv2d:
    conv = nn.Conv2d(8, 6, 3, padding=dilation, dilation=dilation,
                     bias=False).double()
    return GradFilterConv2d.from_conv(conv, radius)


def test_cosine_and_relative_error():
    a = torch.tensor([3.0, 4.0])
    assert cosine(a, 2 * a) == pytest.approx(1)
    assert cosine(a, torch.tensor([-4.0, 3.0])) == pytest.approx(0)
    assert relative_error(torch.tensor([3.0, 5.0]), a) == pytest.approx(0.2)


def test_exact_where_the_filter_loses_nothing():
    # dilation a multiple of the patch and an output gradient constant on
    # patches: the grid computation is exact (DESIGN: dilated convs)
    torch.manual_seed(0)
    layer = filtered_conv(dilation=8, radius=4)
    x = torch.randn(2, 8, 32, 32, dtype=torch.float64)
    patches = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    grad_out = patches.repeat_interleave(4, 2).repeat_interleave(4, 3)
    result = layer_fidelity(layer, x, grad_out)
    assert result['weight_rel_error'] < 1e-10
    assert result['weight_cos'] == pytest.approx(1, abs=1e-12)
    # sharing one value between taps 8 pixels apart loses that
    assert result['shared_weight_cos'] < 0.9


@pytest.mark.parametrize('dilation,radius', [(8, 4), (12, 4), (8, 2)])
def test_dilated_weight_grad_keeps_its_taps(dilation, radius):
    # on fields correlated over a few pixels, the per-tap grid weight
    # gradient stays close to the exact one; the paper's tap-shared one,
    # whose taps lie further apart than that, is nearly orthogonal to it
    torch.manual_seed(0)
    layer = filtered_conv(dilation, radius)
    x, grad_out = smooth_field(2, 8, 32, 32), smooth_field(2, 6, 32, 32)
    result = layer_fidelity(layer, x, grad_out)
    assert result['weight_cos'] > 0.95
    assert result['shared_weight_cos'] < 0.5
    assert 0 < result['input_cos'] < 1


def test_undilated_conv_has_no_shared_variant():
    torch.manual_seed(0)
    layer = filtered_conv(dilation=1, radius=4)
    result = layer_fidelity(layer, smooth_field(2, 8, 32, 32),
                            smooth_field(2, 6, 32, 32))
    assert result['shared_weight_cos'] is None
    assert 0.5 < result['weight_cos'] < 1


def test_recorder_keeps_input_and_output_grad_of_trained_layers():
    torch.manual_seed(0)
    trained = GradFilterConv2d(3, 4, 3, padding=1, radius=2)
    frozen = GradFilterConv2d(4, 4, 3, padding=1, radius=2)
    frozen.requires_grad_(False)
    # the frozen layer comes last: its input needs a gradient, so it is
    # recorded too; a frozen first layer's output needs none
    first_frozen = GradFilterConv2d(3, 3, 1, radius=2).requires_grad_(False)
    model = nn.Sequential(first_frozen, trained, frozen)
    x = torch.randn(1, 3, 8, 8)
    with GradientRecorder(model) as recorder:
        out = model(x)
        grad = torch.randn_like(out)
        out.backward(grad)
    assert set(recorder.records) == {'1', '2'}
    assert torch.equal(recorder.records['2']['grad_out'], grad)
    assert recorder.records['1']['input_grad'] is False
    assert recorder.records['2']['input_grad'] is True
    # hooks are gone after the block
    model(x).sum().backward()
    assert all(not layer._forward_hooks for layer in model)


class TwoBranchModel(BaseModel):
    """An MMEngine model whose loss uses one of its two filtered convs."""

    def __init__(self):
        super().__init__()
        self.used = GradFilterConv2d(3, 4, 3, padding=2, dilation=2, radius=2)
        self.unused = GradFilterConv2d(3, 4, 3, padding=1, radius=2)

    def forward(self, inputs, data_samples=None, mode='loss'):
        self.unused(inputs)
        return dict(loss=self.used(inputs).pow(2).mean())


def test_measure_fidelity_per_layer_and_radius():
    torch.manual_seed(0)
    model = TwoBranchModel()
    batches = [dict(inputs=torch.randn(2, 3, 16, 16)) for _ in range(3)]
    calls = []
    rows = measure_fidelity(model, batches, radii=[2, 4],
                            progress=lambda: calls.append(1))
    assert len(calls) == 3
    # the unused conv got no output gradient: nothing to compare
    assert [(r['layer'], r['radius']) for r in rows] == [('used', (2, 2)),
                                                         ('used', (4, 4))]
    assert all(r['batches'] == 3 for r in rows)
    # the input is data: no input gradient in training, none reported
    assert all(r['input_cos'] is None for r in rows)
    # taps 2 pixels apart fall in different 2x2 patches (a shared variant to
    # compare) and are summed on the 4x4 grid (none)
    assert rows[0]['shared_weight_cos'] is not None
    assert rows[1]['shared_weight_cos'] is None
    assert all(p.grad is None for p in model.parameters())


class ConvBNModel(BaseModel):
    """filtered conv -> BatchNorm -> ReLU -> filtered conv, in float64."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            GradFilterConv2d(3, 4, 3, padding=1, radius=2), nn.BatchNorm2d(4),
            nn.ReLU(), GradFilterConv2d(4, 2, 3, padding=1, radius=2)).double()

    def forward(self, inputs, data_samples=None, mode='loss'):
        return dict(loss=self.body(inputs).pow(2).mean())


def conv_bn_rows(eval_norm: bool, filter_norm: bool = True):
    torch.manual_seed(0)
    model = ConvBNModel()
    batches = [dict(inputs=smooth_field(2, 3, 12, 10, width=3))
               for _ in range(2)]
    if eval_norm:
        # running statistics of these batches, as under norm_eval=True
        model.body[1].momentum = None
        with torch.no_grad():
            for batch in batches:
                model.body[:2](batch['inputs'])
        model.body[1].eval()
    return measure_fidelity(model, batches, radii=[1, 2],
                            filter_norm=filter_norm)


@pytest.mark.parametrize('eval_norm', [False, True])
def test_measure_fidelity_with_filter_norm(eval_norm):
    rows = {(r['layer'], r['radius'][0]): r for r in conv_bn_rows(eval_norm)}
    plain = {(r['layer'], r['radius'][0]): r
             for r in conv_bn_rows(eval_norm, filter_norm=False)}
    # the same measure of the conv with the exact BN as without filter_norm
    assert rows.keys() == plain.keys()
    for key, row in rows.items():
        for metric in METRICS:
            want = plain[key][metric]
            assert row[metric] == (None if want is None else pytest.approx(
                want, rel=1e-12)), (key, metric)
        assert all(plain[key][m] is None
                   for m in CONV_NORM_METRICS + NORM_METRICS)
    # the last conv feeds no BatchNorm
    for radius in (1, 2):
        last = rows['body.3', radius]
        assert last['norm'] is None
        assert all(last[m] is None for m in CONV_NORM_METRICS + NORM_METRICS)
    first = rows['body.0', 2]
    assert first['norm'] == 'body.1'
    assert first['norm_stats'] == ('running' if eval_norm else 'batch')
    # the data needs no gradient
    assert first['filter_norm_input_cos'] is None
    # radius 1 filters nothing: BN and conv exact
    exact = rows['body.0', 1]
    for metric in ('weight_cos', 'filter_norm_weight_cos', 'norm_weight_cos',
                   'norm_weight_ratio', 'norm_bias_cos', 'norm_bias_ratio'):
        assert exact[metric] == pytest.approx(1, abs=1e-12), metric
    # radius 2: dbeta exact, dgamma from patch means
    assert first['norm_bias_cos'] == pytest.approx(1, abs=1e-12)
    assert first['norm_bias_ratio'] == pytest.approx(1, abs=1e-12)
    assert 0 < first['norm_weight_cos'] < 1 - 1e-6
    if eval_norm:
        # eval-mode dx is exact: the conv sees what the exact BN gives it
        assert first['filter_norm_weight_cos'] == pytest.approx(
            first['weight_cos'], rel=1e-12)
    else:
        assert first['filter_norm_weight_cos'] != pytest.approx(
            first['weight_cos'], rel=1e-9)
        assert 0 < first['filter_norm_weight_cos'] < 1


def run_tool(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'grad_fidelity.py'), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


def demo_inputs(tmp_path):
    """A tiny digits dataset, random weights of the demo model in a
    checkpoint, and the options that point the tool at both."""
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from mmgradfilt.datasets import make_digits_seg
    data_root = tmp_path / 'digits_seg'
    make_digits_seg(str(data_root), splits=dict(shift_train=('target', 4)))
    init_default_scope('mmseg')
    model = MODELS.build(Config.fromfile(str(FILT)).model)
    checkpoint = tmp_path / 'weights.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    options = ['--cfg-options', f'train_dataloader.dataset.data_root={data_root}',
               'train_dataloader.batch_size=2']
    return data_root, checkpoint, options


def test_tool_on_demo_config(tmp_path):
    data_root, checkpoint, options = demo_inputs(tmp_path)
    out = tmp_path / 'out'
    proc = run_tool(str(FILT), '--checkpoint', str(checkpoint), '--batches',
                    '2', '--radius', '2', '4', '--out', str(out), *options)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'dW cos (taps shared)' in proc.stdout
    assert 'exact: PyTorch\'s conv backward' in proc.stdout  # the legend
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    saved = json.loads((out / 'fidelity.json').read_text())
    rows = {(row['layer'], row['radius'][0]): row for row in saved['layers']}
    names = {'decode_head.bottleneck.conv',
             *(f'decode_head.aspp_modules.{i}.conv' for i in range(4))}
    assert set(rows) == {(name, r) for name in names for r in (2, 4)}
    for (name, radius), row in rows.items():
        assert row['batches'] == 2
        assert -1 <= row['weight_cos'] <= 1
        # taps in different patches (a grid dilation of 1 or more) only
        dilated = round(row['dilation'][0] / radius) >= 1
        assert (row['shared_weight_cos'] is not None) == dilated, name
    # dilation 2: taps in different 2x2 patches, in the same 4x4 patch
    assert rows['decode_head.aspp_modules.1.conv', 4]['shared_weight_cos'] \
        is None
    # the frozen backbone feeds the ASPP: no input gradient to compare
    assert rows['decode_head.aspp_modules.1.conv', 2]['input_cos'] is None
    assert rows['decode_head.bottleneck.conv', 2]['input_cos'] is not None
    table = list(csv.DictReader((out / 'fidelity.csv').open()))
    assert len(table) == 10
    for row in table:  # numbers, empty where not computed
        assert -1 <= float(row['weight_cos']) <= 1
        assert row['input_cos'] == '' or float(row['input_cos']) <= 1
    assert (out / 'fidelity.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    missing = tmp_path / 'nope.pth'
    proc = run_tool(str(FILT), '--checkpoint', str(missing), *options)
    assert proc.returncode != 0
    assert f'"{missing}" (set by --checkpoint or load_from)' in proc.stderr
    assert 'checkpoints/README.md' in proc.stderr

    # without load_from the config's own init runs: its pretrained backbone
    backbone = tmp_path / 'backbone.pth'
    proc = run_tool(str(FILT), *options, 'load_from=None',
                    'model.backbone.init_cfg.type=Pretrained',
                    f'model.backbone.init_cfg.checkpoint={backbone}')
    assert proc.returncode != 0
    assert f'"{backbone}" (set by init_cfg of backbone)' in proc.stderr

    no_data = tmp_path / 'no_data'
    proc = run_tool(str(FILT), '--checkpoint', str(checkpoint), '--cfg-options',
                    f'train_dataloader.dataset.data_root={no_data}')
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[-1].startswith('training data: ')
    assert 'tools/dataset_converters/digits_seg.py' in proc.stderr


def test_tool_filter_norm_on_demo_config(tmp_path):
    _, checkpoint, options = demo_inputs(tmp_path)
    out = tmp_path / 'out'
    proc = run_tool(str(FILT), '--checkpoint', str(checkpoint), '--batches',
                    '1', '--filter-norm', '--out', str(out), *options)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'dgamma cos' in proc.stdout and 'dW cos, +norm' in proc.stdout
    assert '+norm: the same conv behind a filtered BatchNorm' in proc.stdout
    saved = json.loads((out / 'fidelity.json').read_text())
    assert saved['filter_norm'] is True
    for row in saved['layers']:
        # each filtered ConvModule's own BN, in training mode
        assert row['norm'] == row['layer'][:-len('conv')] + 'bn'
        assert row['norm_stats'] == 'batch'
        assert row['norm_bias_cos'] == pytest.approx(1, abs=1e-6)
        assert -1 <= row['filter_norm_weight_cos'] <= 1
    conv_csv = list(csv.DictReader((out / 'fidelity.csv').open()))
    assert len(conv_csv) == 5 and 'filter_norm_weight_cos' in conv_csv[0]
    norm_csv = list(csv.DictReader((out / 'norm_fidelity.csv').open()))
    assert [row['norm'] for row in norm_csv] == [
        row['norm'] for row in saved['layers']]
    assert all(-1 <= float(row['norm_weight_cos']) <= 1 for row in norm_csv)


def test_missing_demo_checkpoint_names_the_command(tmp_path):
    pytest.importorskip('mmseg')
    missing = tmp_path / CALIB / 'iter_1000.pth'
    proc = run_tool(str(FILT), '--cfg-options', f'load_from={missing}')
    assert proc.returncode != 0
    assert (f'"{missing}" (set by --checkpoint or load_from), written by '
            f'`make demo` or `python tools/train.py configs/demo_seg/'
            f'{CALIB}.py`') in proc.stderr
