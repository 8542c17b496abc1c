"""The benchmark's ``cached`` variant: the lean step trained from stored
frontier tensors, the frozen part upstream not run."""
import csv
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mmgradfilt.benchmark.cached import CACHED, CachedStep, NotCacheable
from mmgradfilt.benchmark.step import (LEAN, build_model, build_variants,
                                       measure_step, prepare_step, step_size,
                                       synthetic_batch)
from mmgradfilt.surgery import GradientFilterRecipe

ROOT = Path(__file__).resolve().parents[2]
SEG = str(ROOT / 'configs' / 'demo_seg' /
          'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py')
CLS = str(ROOT / 'configs' / 'demo_cls' /
          'resnet18_filt-last2-r2_1xb32-5e_digits-user1.py')
CPU = torch.device('cpu')


class CachedFloat32(CachedStep):
    dtype = 'float32'


CACHED32 = dataclasses.replace(CACHED, key='cached32', step=CachedFloat32)


pytestmark = pytest.mark.usefixtures('fast_cpu')


def steps_for(config, variants, batch_size=2):
    """The variants' steps on one synthetic batch of the config's size,
    from one build of its model (the same weights)."""
    cfg = Config.fromfile(config)
    size = step_size(cfg)[0]
    batch = synthetic_batch(cfg, batch_size, size)
    return build_variants(cfg, CPU, size, batch, variants)[0]


def one_step(step):
    """Loss and the trained parameters' gradients of one forward and
    backward, with the random draws seeded."""
    torch.manual_seed(0)
    step.forward()
    loss = step.loss.detach().clone()
    step.backward()
    grads = {n: p.grad.clone() for n, p in step.model.named_parameters()
             if p.requires_grad}
    return loss, grads


@pytest.mark.parametrize('config', [SEG, CLS])
def test_cached_step_trains_as_the_lean_step(config):
    steps = steps_for(config, (LEAN, CACHED, CACHED32))
    lean_loss, lean_grads = one_step(steps['lean'])
    # float32 entries: the same loss and gradients as the whole forward
    loss, grads = one_step(steps['cached32'])
    torch.testing.assert_close(loss, lean_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == lean_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, lean_grads[name], rtol=1e-5,
                                   atol=1e-7, msg=name)
    # float16 entries (the hook's default): what the step reads is the
    # frontier rounded to float16, and the loss moves by that rounding only
    cached = steps['cached']
    assert cached.store.dtype == 'float16'
    read = cached.read()
    captured = steps['cached32'].read()
    assert any(not torch.equal(r, c) for r, c in zip(read, captured))
    for r, c in zip(read, captured):
        assert torch.equal(r, c.half().float())
    loss16, _ = one_step(cached)
    torch.testing.assert_close(loss16, lean_loss, rtol=2e-3, atol=1e-4)


def skipped_modules(step, paths):
    """The modules under ``paths`` of the step's model."""
    return [m for path in paths for m in step.model.get_submodule(path).modules()]


@pytest.mark.parametrize('config', [SEG, CLS])
def test_cached_step_skips_the_frozen_part(config, monkeypatch):
    steps = steps_for(config, (LEAN, CACHED))
    paths = steps['cached'].cache_info()['skipped']
    assert paths
    # count the real forwards (the class's method: a replay overrides the
    # instance's forward, and module hooks would still fire) of every kind
    # of module the cache skips
    ran = set()

    def counting(forward):

        def wrapper(module, *args, **kwargs):
            ran.add(id(module))
            return forward(module, *args, **kwargs)

        return wrapper

    # the classes whose forward those modules run (defined there, not
    # inherited), each patched once
    owners = {next(c for c in type(m).__mro__ if 'forward' in vars(c))
              for m in skipped_modules(steps['lean'], paths)}
    for cls in owners:
        monkeypatch.setattr(cls, 'forward', counting(vars(cls)['forward']))
    calls = {}
    for key, step in steps.items():
        ran.clear()
        step.forward()
        step.backward()
        calls[key] = set(ran)
    lean = {id(m) for m in skipped_modules(steps['lean'], paths)}
    cached = {id(m) for m in skipped_modules(steps['cached'], paths)}
    # the whole forward runs every module of the skipped part; the cached
    # one none of them, and still trained modules of the same kinds
    assert lean <= calls['lean']
    assert not cached & calls['cached']
    assert any(p.requires_grad for m in steps['cached'].model.modules()
               if id(m) in calls['cached'] for p in m.parameters())


@pytest.mark.parametrize('config', [SEG, CLS])
def test_cached_step_saves_no_more_and_its_peak_leaves_the_frozen_forward(
        config):
    steps = steps_for(config, (LEAN, CACHED))
    lean = measure_step(steps['lean'], CPU)
    cached = measure_step(steps['cached'], CPU)
    assert 0 < cached.saved_bytes <= lean.saved_bytes
    frozen = 'frozen forward'
    assert (cached.phase_peak_bytes[frozen] <
            lean.phase_peak_bytes[frozen])
    info = steps['cached'].cache_info()
    assert info['cache_dtype'] == 'float16'
    assert info['cache_bytes_per_sample'] == sum(
        t['bytes_per_sample'] for t in info['frontier'])
    assert info['cache_bytes_per_sample'] == \
        steps['cached'].frontier.bytes_per_sample('float16')
    assert info['cache_read']['n'] >= 2  # one read per forward


def test_nothing_frozen_is_not_cacheable():
    cfg = Config.fromfile(SEG)
    size = step_size(cfg)[0]
    with pytest.raises(NotCacheable, match='no trained|empty frontier'):
        prepare_step(build_model(cfg), GradientFilterRecipe(),
                     cfg.optim_wrapper, synthetic_batch(cfg, 2, size), CPU,
                     CachedStep)


def run_tool(*args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tool_reports_the_cached_step(tmp_path):
    out = tmp_path / 'out'
    stdout = run_tool(SEG, '--batch-size', '2', '--iters', '2', '--warmup',
                      '0', '--out', str(out))
    result = json.loads((out / 'benchmark.json').read_text())
    assert [v['key'] for v in result['variants']][-1] == 'cached'
    cached, lean = result['cached'], result['lean']
    # the tiny DeepLabV3: backbone[3] (128x8x8) and the image pool (32x1x1)
    assert cached['cache_dtype'] == 'float16'
    assert cached['cache_bytes_per_sample'] == (128 * 8 * 8 + 32) * 2
    assert cached['skipped'] == ['backbone', 'decode_head.image_pool']
    assert cached['saved_bytes'] <= lean['saved_bytes']
    ratios = result['ratios']['cached']
    assert ratios['speedup_vs_lean'] == pytest.approx(statistics.median(
        a / b for a, b in zip(lean['step']['samples'],
                              cached['step']['samples'])))
    assert 'filtered+lean+cache' in stdout and 'speedup vs lean' in stdout
    assert 'reads backbone[3] 128x8x8, decode_head.image_pool 32x1x1 from ' \
        'the store, 16.1 KiB per sample in float16' in stdout
    legend = stdout.split('filtered layers (sum)')[1]
    assert 'filtered+lean+cache: filtered+lean with FrozenFeatureCacheHook' \
        in legend
    assert 'FeatureStore' not in stdout  # its temporary folder says nothing
    with (out / 'benchmark.csv').open() as f:
        whole = next(csv.DictReader(f))
    assert float(whole['cache_per_sample_cached_MB']) == pytest.approx(
        cached['cache_bytes_per_sample'] / 2**20, abs=1e-4)
    assert float(whole['step_cached_speedup_vs_lean_x']) == pytest.approx(
        ratios['speedup_vs_lean'], abs=0.01)
    assert (out / 'benchmark.png').read_bytes()[:4] == b'\x89PNG'
    # --no-cache leaves it out
    run_tool(SEG, '--batch-size', '2', '--iters', '1', '--warmup', '0',
             '--out', str(out), '--no-cache')
    result = json.loads((out / 'benchmark.json').read_text())
    assert 'cached' not in result
    assert [v['key'] for v in result['variants']] == [
        'vanilla', 'filtered', 'lean']
