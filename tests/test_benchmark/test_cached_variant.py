"""The benchmark's ``cached`` variant: the lean step trained from stored
frontier tensors, the frozen part upstream not run."""
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.config import utils as cfg_utils

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


@pytest.fixture(autouse=True, scope='module')
def fast_cpu():
    """Read the OpenMMLab metafiles once; one thread (changes no result)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg_utils, '_get_cfg_metainfo',
                   functools.lru_cache(cfg_utils._get_cfg_metainfo))
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


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
