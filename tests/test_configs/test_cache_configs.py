"""The demos' cached configs: the filtered config plus FrozenFeatureCacheHook,
and the step ``make demo`` measures for the segmentation one."""
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmgradfilt.benchmark.cached import CACHED
from mmgradfilt.benchmark.step import LEAN, build_model, measure_step
from mmgradfilt.hooks import recipe_from_config

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
SEG = CONFIGS / 'demo_seg'
FILT5L = SEG / 'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py'
FILT5L_CACHE = (SEG /
                'deeplabv3_r18-tiny-d8_filt5L-cache_1xb8-300_digits-shift-64x64.py')
CLS = CONFIGS / 'demo_cls'
CACHE_HOOK = dict(type='FrozenFeatureCacheHook', views=1, dtype='float16')


def test_cached_configs_add_the_hook_to_their_parent():
    for child, parent in (
            (FILT5L_CACHE, FILT5L),
            (CLS / 'resnet18_filt-last2-r2-cache_1xb32-5e_digits-user1.py',
             CLS / 'resnet18_filt-last2-r2_1xb32-5e_digits-user1.py')):
        cfg, base = Config.fromfile(str(child)), Config.fromfile(str(parent))
        assert cfg.custom_hooks[:-1] == base.custom_hooks
        assert cfg.custom_hooks[-1] == CACHE_HOOK
        assert cfg.model == base.model and cfg.train_cfg == base.train_cfg


def test_seg_cache_config_trains_and_its_step_keeps_less(
        tmp_path, digits_shift_weights):
    data_root, weights = digits_shift_weights
    cfg = Config.fromfile(str(FILT5L_CACHE))
    cfg.merge_from_dict({'train_dataloader.dataset.data_root': str(data_root),
                         'train_dataloader.batch_size': 2,
                         'train_cfg.max_iters': 4, 'train_cfg.val_interval': 100,
                         'load_from': str(weights),
                         'work_dir': str(tmp_path / 'run'),
                         'param_scheduler': [],
                         'default_hooks.checkpoint.interval': 100})
    # training only: the demo's validation data is not made here
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    runner = Runner.from_cfg(cfg)
    runner.train()
    cache = [h for h in runner.hooks
             if type(h).__name__ == 'FrozenFeatureCacheHook'][0]
    # 4 iterations of 2 over the 4 samples: each stored once, then read
    assert cache.store is not None and cache.store.num_entries == 4
    # the demo's memory columns: the cached step keeps no more for backward
    # than filt5L + lean, in total and by convs
    cpu = torch.device('cpu')
    model = build_model(cfg)
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    figures = []
    for variant in (LEAN, CACHED):
        step = variant.prepare(model, recipe_from_config(cfg),
                               cfg.optim_wrapper, batch, cpu)
        step.run()
        measured = measure_step(step, cpu)
        figures.append((measured.saved_bytes,
                        measured.saved_by_kind['conv']))
    (lean_saved, lean_convs), (cached_saved, cached_convs) = figures
    assert 0 < cached_saved <= lean_saved and 0 < cached_convs <= lean_convs
