"""tools/seg_demo.py's cached row: the config it trains and the step it
measures."""
import importlib.util
from pathlib import Path

from mmengine.config import Config
from mmengine.runner import Runner

ROOT = Path(__file__).resolve().parents[2]


def seg_demo():
    spec = importlib.util.spec_from_file_location(
        'seg_demo', ROOT / 'tools' / 'seg_demo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cache_row_trains_filt5l_with_the_cache_hook(tmp_path, monkeypatch,
                                                     digits_shift_weights):
    demo = seg_demo()
    monkeypatch.chdir(ROOT)  # the demo runs from the repository root
    path = demo.cache_config(str(tmp_path / 'run'))
    cfg = Config.fromfile(path)
    filt5l = Config.fromfile(demo.config(demo.FILT5L))
    # filt5L's own hooks, then the cache with the hook's defaults named
    assert cfg.custom_hooks[:-1] == filt5l.custom_hooks
    assert cfg.custom_hooks[-1] == dict(type='FrozenFeatureCacheHook',
                                        views=1, dtype='float16')
    assert cfg.model == filt5l.model and cfg.train_cfg == filt5l.train_cfg
    # a few iterations through the Runner: the hook finds the frontier and
    # stores the entries
    data_root, weights = digits_shift_weights
    cfg.merge_from_dict({'train_dataloader.dataset.data_root': str(data_root),
                         'train_dataloader.batch_size': 2,
                         'train_cfg.max_iters': 4, 'train_cfg.val_interval': 100,
                         'load_from': str(weights),
                         'work_dir': str(tmp_path / 'run'),
                         'param_scheduler': [],
                         'default_hooks.checkpoint.interval': 100})
    runner = Runner.from_cfg(cfg)
    runner.train()
    cache = [h for h in runner.hooks
             if type(h).__name__ == 'FrozenFeatureCacheHook'][0]
    assert cache.store is not None and cache.store.num_entries == 4
    # the memory columns: the cached step keeps no more than filt5L + lean
    lean = demo.step_memory(path, str(data_root), True)
    cached = demo.step_memory(path, str(data_root), True, cached=True)
    assert 0 < cached[0] <= lean[0] and cached[1] <= lean[1]
