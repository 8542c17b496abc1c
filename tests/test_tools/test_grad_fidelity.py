"""Gradient fidelity: a conv's own error (``layer_fidelity``), what is
reported, and tools/grad_fidelity.py on the demo config (the definition
itself is checked against autograd in tests/test_analysis/test_fidelity.py)."""
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

from mmgradfilt.analysis.fidelity import (configured_models, cosine,
                                          layer_fidelity, measure_fidelity,
                                          relative_error)
from mmgradfilt.layers import GradFilterConv2d
from mmgradfilt.surgery import GradientFilterRecipe

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


class TwoBranchModel(BaseModel):
    """An MMEngine model whose loss uses one of its two convs."""

    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.unused = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, inputs, data_samples=None, mode='loss'):
        self.unused(inputs)
        return dict(loss=self.used(inputs).pow(2).mean())


def test_measure_fidelity_per_layer_and_radius():
    torch.manual_seed(0)
    model = TwoBranchModel()
    exact, models = configured_models(model, {
        r: GradientFilterRecipe(filter_install=[
            dict(path='used', radius=r), dict(path='unused', radius=r)])
        for r in (2, 4)})
    batches = [dict(inputs=torch.randn(2, 3, 16, 16)) for _ in range(3)]
    calls = []
    results = measure_fidelity(models, exact, batches, own=True,
                               progress=lambda: calls.append(1))
    assert len(calls) == 3
    # the unused conv got no gradient from the loss: nothing to compare
    rows = [row for r in (2, 4) for row in results[r]]
    assert [(r['layer'], r['radius']) for r in rows] == [('used', (2, 2)),
                                                         ('used', (4, 4))]
    assert all(r['batches'] == 3 for r in rows)
    # the input is data: no input gradient in training, none reported
    assert all(r['input_cos'] is None for r in rows)
    # the loss reads the conv's output directly: its output gradient is the
    # exact one, so its own error is all there is
    for row in rows:
        assert row['own_weight_cos'] == pytest.approx(row['weight_cos'],
                                                      abs=1e-6)
    # taps 2 pixels apart fall in different 2x2 patches (a shared variant to
    # compare) and are summed on the 4x4 grid (none)
    assert rows[0]['shared_weight_cos'] is not None
    assert rows[1]['shared_weight_cos'] is None
    assert all(p.grad is None for p in model.parameters())


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
    assert 'own dW cos (taps shared)' in proc.stdout
    assert 'dgamma cos' in proc.stdout  # filter_norm is on by default
    assert 'exact: the same model with every approximation off' in \
        proc.stdout  # the legend
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    saved = json.loads((out / 'fidelity.json').read_text())
    assert saved['recipe']['lean_memory'] is True
    rows = {(row['layer'], row['radius'][0]): row for row in saved['layers']}
    convs = {'decode_head.bottleneck.conv',
             *(f'decode_head.aspp_modules.{i}.conv' for i in range(4))}
    # each filtered ConvModule's own BatchNorm is filtered too
    norms = {name[:-len('conv')] + 'bn' for name in convs}
    assert set(rows) == {(name, r) for name in convs | norms for r in (2, 4)}
    for (name, radius), row in rows.items():
        assert row['batches'] == 2
        assert row['kind'] == ('conv' if name in convs else 'norm')
        # against the exact model, none is exact, not even the convs whose
        # own filter loses nothing behind a BatchNorm filtered at r=2
        assert -1 <= row['weight_cos'] < 0.9999, (name, radius)
        if name in norms:
            continue
        # taps in different patches (a grid dilation of 1 or more) only
        dilated = round(row['dilation'][0] / radius) >= 1
        assert (row['shared_weight_cos'] is not None) == dilated, name
    # the 1x1 conv behind a BatchNorm filtered at r=2 gets a patch-constant
    # output gradient: its own error is nil, its fidelity is not
    aspp0 = rows['decode_head.aspp_modules.0.conv', 2]
    assert aspp0['own_weight_cos'] == pytest.approx(1, abs=1e-5)
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
    norm_table = list(csv.DictReader((out / 'norm_fidelity.csv').open()))
    assert {row['layer'] for row in norm_table} == norms
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


def test_tool_with_exact_batchnorms(tmp_path):
    _, checkpoint, options = demo_inputs(tmp_path)
    out = tmp_path / 'out'
    proc = run_tool(str(FILT), '--checkpoint', str(checkpoint), '--batches',
                    '1', '--out', str(out), *options,
                    'custom_hooks.0.filter_norm=False')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'dgamma cos' not in proc.stdout
    assert not (out / 'norm_fidelity.csv').exists()
    saved = json.loads((out / 'fidelity.json').read_text())
    assert saved['recipe']['filter_norm'] is False
    rows = {row['layer']: row for row in saved['layers']}
    assert len(rows) == 5 and all(r['kind'] == 'conv' for r in rows.values())
    # the last filtered conv's output gradient comes exact from the loss:
    # its own error is its fidelity; the ASPP's come through its filtered
    # input gradient
    last = rows['decode_head.bottleneck.conv']
    assert last['own_weight_cos'] == pytest.approx(last['weight_cos'],
                                                   abs=1e-4)
    aspp = rows['decode_head.aspp_modules.2.conv']
    assert aspp['own_weight_cos'] != pytest.approx(aspp['weight_cos'],
                                                   abs=1e-4)

    # --filter-norm puts the filtered BatchNorms back
    proc = run_tool(str(FILT), '--checkpoint', str(checkpoint), '--batches',
                    '1', '--filter-norm', '--out', str(out), *options,
                    'custom_hooks.0.filter_norm=False')
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / 'fidelity.json').read_text())
    assert sum(r['kind'] == 'norm' for r in saved['layers']) == 5


def test_missing_demo_checkpoint_names_the_command(tmp_path):
    pytest.importorskip('mmseg')
    missing = tmp_path / CALIB / 'iter_1000.pth'
    proc = run_tool(str(FILT), '--cfg-options', f'load_from={missing}')
    assert proc.returncode != 0
    assert (f'"{missing}" (set by --checkpoint or load_from), written by '
            f'`make demo` or `python tools/train.py configs/demo_seg/'
            f'{CALIB}.py`') in proc.stderr
