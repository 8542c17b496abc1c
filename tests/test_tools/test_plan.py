"""tools/plan.py: the demo plan at half of vanilla enc5L's saved bytes,
the config it writes (builds, trains a step, fits its budget), every bad
argument refused and the planner's refusals as the tool's exit message."""
import csv
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mmgradfilt.analysis import planner
from mmgradfilt.benchmark.step import (VANILLA, build_model, measure_step,
                                       prepare_step, synthetic_batch)
from mmgradfilt.hooks import recipe_from_config
from mmgradfilt.report import MB

pytest.importorskip('mmseg')

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'plan.py'
DEMO = ROOT / 'configs' / 'demo_seg'
FULL = DEMO / 'deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64.py'
ENC5L = DEMO / 'deeplabv3_r18-tiny-d8_enc5L_1xb8-300_digits-shift-64x64.py'
BATCH = 2
CPU = torch.device('cpu')


def data_option(root) -> str:
    return f'train_dataloader.dataset.data_root={root}'


def vanilla_enc5l_saved() -> int:
    """Bytes the benchmark's vanilla enc5L step saves for backward (the
    config's freezing, PyTorch's backward, nothing of mmgradfilt)."""
    cfg = Config.fromfile(str(ENC5L))
    step = VANILLA.prepare(build_model(cfg), recipe_from_config(cfg),
                           cfg.optim_wrapper,
                           synthetic_batch(cfg, BATCH, (64, 64)), CPU)
    return measure_step(step, CPU).saved_bytes


def test_demo_plan_at_half_of_enc5l(tmp_path, digits_shift_weights):
    data_root, checkpoint = digits_shift_weights
    budget = vanilla_enc5l_saved() / 2
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, str(TOOL), str(FULL),
         '--max-saved-mb', f'{budget / MB:.4f}', '--batch-size', str(BATCH),
         '--batches', '1', '--radius', '2', '4', '--max-layers', '7',
         '--checkpoint', str(checkpoint), '--out', str(out),
         '--cfg-options', data_option(data_root)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'elapsed' in proc.stdout  # the progress bar
    assert 'deepest trained' in proc.stdout and 'chosen: ' in proc.stdout

    plan = json.loads((out / 'plan.json').read_text())
    chosen = plan['chosen']
    assert chosen['trained_convs'] >= 5  # as many as enc5L, or more
    measured, predicted = chosen['measured'], chosen['predicted']
    assert measured['saved_bytes'] <= budget
    assert abs(predicted['saved_bytes'] - measured['saved_bytes']) <= \
        0.1 * measured['saved_bytes']
    for layer in chosen['layers']:
        if layer['radius']:
            assert layer['weight_cos'] >= 0.5
    assert [p['trained_convs'] for p in plan['front']] == list(
        range(len(plan['front'])))
    rows = list(csv.DictReader((out / 'plan.csv').open()))
    assert [r['mark'] for r in rows].count('*') == 1
    assert float(rows[0]['saved_predicted_MB']) > 0
    assert (out / 'plan.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # the written config: builds, one GradientFilterHook (the plan's), the
    # checkpoint and batch it was planned with
    cfg = Config.fromfile(str(out / 'config.py'))
    hooks = [h for h in cfg.custom_hooks
             if h['type'] == 'GradientFilterHook']
    assert len(hooks) == 1
    assert [dict(h) for h in hooks[0].filter_install] == \
        chosen['filter_install']
    assert cfg.load_from == str(checkpoint)
    assert cfg.train_dataloader.batch_size == BATCH
    # ... trains a step within its budget
    step = prepare_step(build_model(cfg), recipe_from_config(cfg),
                        cfg.optim_wrapper,
                        synthetic_batch(cfg, BATCH, (64, 64)), CPU)
    trained = {n: p.detach().clone()
               for n, p in step.model.named_parameters() if p.requires_grad}
    assert measure_step(step, CPU).saved_bytes <= budget
    moved = [n for n, p in step.model.named_parameters()
             if n in trained and not torch.equal(p, trained[n])]
    assert 'decode_head.conv_seg.weight' in moved
    assert any(n.startswith('decode_head.aspp_modules') for n in moved)


def run_main(monkeypatch, *args):
    """The tool's exit code or message, run in this process as
    ``python tools/plan.py ARGS`` runs it; measuring anything fails."""
    monkeypatch.setattr(sys, 'argv', ['plan.py', *map(str, args)])

    def measured(*_, **__):
        raise AssertionError('measured before the input was checked')

    monkeypatch.setattr(planner, 'measure_prefix', measured)
    monkeypatch.setattr(planner, 'layer_cosines', measured)
    with pytest.raises(SystemExit) as error:
        runpy.run_path(str(TOOL), run_name='__main__')
    return error.value.code


@pytest.mark.parametrize('args,message', [
    (['--max-saved-mb', '-1'], "--max-saved-mb must be a positive number, "
     "got '-1'"),
    (['--max-saved-mb', 'abc'], "--max-saved-mb must be a number, got 'abc'"),
    (['--max-saved-mb', 'nan'], "--max-saved-mb must be a positive number, "
     "got 'nan'"),
    (['--max-saved-mb', '1', '--max-peak-mb', '0'],
     "--max-peak-mb must be a positive number, got '0'"),
    (['--max-saved-mb', '1', '--max-backward-gflops', '-2'],
     "--max-backward-gflops must be a positive number, got '-2'"),
    (['--max-saved-mb', '1', '--radius', '2', '0'],
     '--radius values must be >= 1, got 0'),
    (['--max-saved-mb', '1', '--batches', '0'], '--batches must be >= 1, '
     'got 0'),
    (['--max-saved-mb', '1', '--max-layers', '0'], '--max-layers must be >= '
     '1, got 0'),
    (['--max-saved-mb', '1', '--min-cosine', '2'],
     '--min-cosine must be in [-1, 1], got 2.0'),
])
def test_bad_arguments(args, message, monkeypatch, capsys):
    code = run_main(monkeypatch, FULL, *args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_refusal_is_the_exit_message(tmp_path, monkeypatch):
    # the planner's refusals (tests/test_analysis/test_planner.py) end the
    # tool with their message, nothing measured
    no_model = tmp_path / 'no_model.py'
    no_model.write_text('x = 1\n')
    assert run_main(monkeypatch, no_model, '--max-saved-mb', 1) == \
        f'{no_model} has no model: nothing to plan'
