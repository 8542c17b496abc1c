"""tools/benchmark.py end to end on tiny inputs (CPU)."""
import csv
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mmgradfilt.benchmark.layers import load_layer_suite
from mmgradfilt.benchmark.timing import paired_ratio, summarize

ROOT = Path(__file__).resolve().parents[2]

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


def run_tool(*args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_png(path: Path):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('text,size,layers', [
    (SEG_CONFIG, '64', {'decode_head.bottleneck.conv',
                        'decode_head.aspp_modules.1.conv'}),
    (CLS_CONFIG, '32', {'backbone.layer4.1.conv1', 'backbone.layer4.1.conv2'}),
])
def test_config_mode(tmp_path, text, size, layers):
    config = tmp_path / 'cfg.py'
    config.write_text(text)
    out = tmp_path / 'out'
    stdout = run_tool(str(config), '--input-size', size, size, '--iters', '2',
                      '--warmup', '1', '--out', str(out))
    assert 'vanilla/filtered' in stdout and 'forward ms' in stdout
    result = json.loads((out / 'benchmark.json').read_text())
    assert set(result['filtered_layers']) == layers
    van, fil = result['vanilla'], result['filtered']
    for path in layers:
        # the filter keeps less for backward and computes fewer FLOPs
        assert fil['layers'][path]['saved_bytes'] < \
            van['layers'][path]['saved_bytes']
        assert fil['layers'][path]['backward_flops'] < \
            van['layers'][path]['backward_flops']
    for key in ('forward', 'backward', 'optimizer', 'step'):
        assert fil[key]['n'] == 2 and fil[key]['median'] > 0
        # time ratios come from the steps taken in turn
        assert result['ratios'][key] == pytest.approx(statistics.median(
            v / f for v, f in zip(van[key]['samples'], fil[key]['samples'])))
    assert van['peak_bytes'] > 0 and fil['peak_bytes'] > 0
    assert result['ratios']['layer_flops'] > 1
    rows = list(csv.reader((out / 'benchmark.csv').open()))
    assert [r[0] for r in rows] == ['model', 'vanilla', 'filtered']
    check_png(out / 'benchmark.png')


def test_layer_mode(tmp_path):
    shapes = tmp_path / 'shapes.json'
    shapes.write_text(json.dumps([
        dict(name='dense', in_channels=8, out_channels=8, kernel_size=3,
             size=16),
        dict(name='depthwise', in_channels=8, out_channels=8, kernel_size=3,
             size=16, groups=8),
    ]))
    out = tmp_path / 'out'
    stdout = run_tool('--layers', str(shapes), '--radius', '2', '4',
                      '--iters', '2', '--warmup', '1', '--out', str(out))
    assert 'bwd speedup' in stdout
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
    # 3x3 taps summed and 4x4 patches: 16 * 9 times fewer products
    assert dense_r4['vanilla']['backward_flops'] > \
        100 * (dense_r4['filtered']['backward_flops'] - 2 * 8 * 16 * 16)
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
    spec = importlib.util.spec_from_file_location(
        'benchmark_tool', ROOT / 'tools' / 'benchmark.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    measured = []

    def bench_layer(shape, radius, *args):
        if measured:  # the second layer: out of memory, Ctrl-C, ...
            raise KeyboardInterrupt
        measured.append(dict(name=shape.name, radius=radius))
        return measured[-1]

    monkeypatch.setattr(tool, 'bench_layer', bench_layer)
    out = tmp_path / 'out'
    out.mkdir()
    monkeypatch.setattr(sys, 'argv', ['benchmark.py', '--layers', '--radius',
                                      '2', '4', '--out', str(out)])
    with pytest.raises(KeyboardInterrupt):
        tool.main()
    saved = json.loads((out / 'layers.json').read_text())
    assert saved['complete'] is False
    assert saved['results'] == [dict(name='dense3x3 640-128 @64', radius=2)]
    assert not (out / 'layers.json.tmp').exists()
