"""FrozenFeatureCacheHook through MMEngine's Runner on the offline digits
data: the same training, the frozen part skipped once cached.

Run as a script, this file is the worker ``torchrun`` starts on each rank of
the distributed test.
"""
import copy
import os
import os.path as osp
import socket
import subprocess
import sys
import uuid

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from mmgradfilt import FrozenFeatureCacheHook

CONFIG_ROOT = osp.join(osp.dirname(__file__), '..', '..', '..', 'configs')
SEG_DEMO = 'demo_seg/deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py'
CLS_DEMO = 'demo_cls/resnet18_filt-last2-r2_1xb32-5e_digits-user1.py'
CLS_FULL = 'demo_cls/resnet18_full_1xb32-5e_digits-user1.py'
EXACT = dict(type='FrozenFeatureCacheHook', views=1, dtype='float32')


pytestmark = pytest.mark.usefixtures('fast_cpu')


@pytest.fixture(scope='module')
def digits_seg_root(tmp_path_factory):
    pytest.importorskip('mmseg', reason='needs MMSegmentation')
    from mmgradfilt.datasets import make_digits_seg
    root = str(tmp_path_factory.mktemp('digits_seg'))
    make_digits_seg(root, seed=0, size=64,
                    splits=dict(shift_train=('target', 8)))
    return root


class Recorder(Hook):
    """Each training iteration's loss and how often the module at ``path``
    really ran in it."""
    priority = 'LOWEST'

    def __init__(self, path):
        self.path = path
        self.losses, self.runs = [], []
        self._count = 0

    def before_train(self, runner):
        model = runner.model
        model = model.module if is_model_wrapper(model) else model
        model.get_submodule(self.path).register_forward_pre_hook(self._seen)

    def _seen(self, *args):
        self._count += 1

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._count = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.losses.append(outputs['loss'].item())
        self.runs.append(self._count)


class Killed(Exception):
    pass


class Killer(Hook):
    """Stops the run after ``iters`` iterations, as a killed process."""
    priority = 'LOWEST'

    def __init__(self, iters):
        self.iters = iters

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.iters:
            raise Killed


def seg_cfg(root, work_dir, max_iters=4):
    """The seg demo's filt5L on 8 samples, batch 4: 2 iterations a pass."""
    cfg = Config.fromfile(osp.join(CONFIG_ROOT, SEG_DEMO))
    cfg.train_dataloader.dataset.data_root = root
    cfg.train_dataloader.dataset.indices = 8
    cfg.train_dataloader.batch_size = 4
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                         val_interval=1000)
    cfg.param_scheduler = []
    return _common(cfg, work_dir)


def cls_cfg(work_dir, config=CLS_DEMO, epochs=2):
    """The cls demo on 8 digits, batch 4, deterministic pipeline: 2
    iterations an epoch."""
    cfg = Config.fromfile(osp.join(CONFIG_ROOT, config))
    dataset = cfg.train_dataloader.dataset.dataset  # no user split: 8 images
    dataset.indices = 8
    dataset.pipeline = [dict(type='PackInputs')]
    cfg.train_dataloader.dataset = dataset
    cfg.train_dataloader.batch_size = 4
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs, val_interval=1000)
    cfg.param_scheduler = []
    return _common(cfg, work_dir)


def _common(cfg, work_dir):
    cfg.load_from = None
    cfg.resume = False
    cfg.work_dir = str(work_dir)
    # one logger (and log file) per name: a new one each run
    cfg.experiment_name = f'cache_{uuid.uuid4().hex}'
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1000)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.randomness = dict(seed=0)
    return cfg


def train(cfg, *hooks, path='backbone.layer1'):
    """Train with more hooks (configs or objects); return the runner and
    its Recorder."""
    cfg = copy.deepcopy(cfg)
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
        h for h in hooks if isinstance(h, dict)]
    runner = Runner.from_cfg(cfg)
    recorder = Recorder(path)
    for hook in [h for h in hooks if not isinstance(h, dict)] + [recorder]:
        runner.register_hook(hook)
    runner.train()
    return runner, recorder


def cache_hook(runner):
    return next(h for h in runner.hooks
                if isinstance(h, FrozenFeatureCacheHook))


def log_of(runner):
    return open(osp.join(runner.log_dir, f'{runner.timestamp}.log')).read()


def assert_same_training(runner, recorder, ref_runner, ref_recorder):
    assert recorder.losses == pytest.approx(ref_recorder.losses, rel=1e-6,
                                            abs=1e-7)
    ref = ref_runner.model.state_dict()
    for name, value in runner.model.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


def counting_loads(monkeypatch):
    """The sample indices the training pipeline runs on, in order."""
    from mmengine.dataset import BaseDataset
    loads = []
    prepare = BaseDataset.prepare_data

    def counted(self, idx):
        loads.append(idx)
        return prepare(self, idx)

    monkeypatch.setattr(BaseDataset, 'prepare_data', counted)
    return loads


def test_seg_demo_trains_exactly_as_without_and_skips_the_backbone(
        digits_seg_root, tmp_path, monkeypatch):
    loads = counting_loads(monkeypatch)
    cfg = seg_cfg(digits_seg_root, tmp_path / 'ref')
    ref_runner, ref = train(cfg)
    assert len(loads) == 16
    loads.clear()
    cfg = seg_cfg(digits_seg_root, tmp_path / 'cached')
    runner, rec = train(cfg, dict(EXACT))
    assert_same_training(runner, rec, ref_runner, ref)
    # pass 1 computes the backbone, pass 2 reads its outputs, and does not
    # even load the images
    assert ref.runs == [1, 1, 1, 1]
    assert rec.runs == [1, 1, 0, 0]
    assert sorted(loads) == list(range(8))
    hook = cache_hook(runner)
    assert names_of(hook) == ['backbone[3]', 'decode_head.image_pool']
    assert hook.store.num_entries == 8
    assert runner.message_hub.get_scalar('cache/hit_rate').current() == 1.0
    assert runner.message_hub.get_scalar('cache/entries').current() == 8
    log = log_of(runner)
    assert 'FrozenFeatureCacheHook: frontier of the frozen part' in log
    assert 'backbone[3]             128x8x8  32,768' in log
    assert 'this pass read 0 of 8 samples from the cache (hit rate 0.0%)' \
        in log
    assert ('this pass read 8 of 8 samples from the cache (hit rate 100.0%), '
            '8 of them without loading') in log
    assert runner.message_hub.get_scalar('cache/unloaded').current() == 8
    assert osp.isdir(osp.join(tmp_path, 'cached', 'frozen_feature_cache'))
    # the model's own train_step is back after training
    assert 'train_step' not in runner.model.__dict__


def names_of(hook):
    return [t.name for t in hook.frontier.tensors]


def with_validation(cfg):
    """Validate on 8 test digits after each epoch."""
    val = Config.fromfile(osp.join(CONFIG_ROOT, CLS_DEMO))
    val.val_dataloader.dataset = val.val_dataloader.dataset.dataset
    val.val_dataloader.dataset.indices = 8
    cfg.val_dataloader = val.val_dataloader
    cfg.val_evaluator = val.val_evaluator
    cfg.val_cfg = dict()
    cfg.train_cfg.val_interval = 1
    return cfg


def test_cls_demo_trains_exactly_as_without(tmp_path):
    pytest.importorskip('mmpretrain', reason='needs MMPretrain')
    ref_runner, ref = train(with_validation(cls_cfg(tmp_path / 'ref')),
                            path='backbone.layer1.0')
    runner, rec = train(with_validation(cls_cfg(tmp_path / 'cached')),
                        dict(EXACT), path='backbone.layer1.0')
    assert_same_training(runner, rec, ref_runner, ref)
    # validation ran the whole model (after each epoch) and scored the same
    assert runner.message_hub.get_scalar('val/accuracy/top1').current() == \
        ref_runner.message_hub.get_scalar('val/accuracy/top1').current()
    # the cut inside the backbone: the input of the first trained block
    assert names_of(cache_hook(runner)) == ['backbone.layer3']
    assert ref.runs == [1, 1, 1, 1] and rec.runs == [1, 1, 0, 0]
    log = log_of(runner)
    assert 'hit rate 0.0%' in log
    assert 'hit rate 100.0%), 8 of them without loading' in log


def test_cls_demo_with_a_loader_worker(tmp_path):
    """Samples skipped by the sampler in the main process, stubs made in the
    worker: the same training."""
    pytest.importorskip('mmpretrain', reason='needs MMPretrain')
    ref_runner, ref = train(cls_cfg(tmp_path / 'ref'),
                            path='backbone.layer1.0')
    cfg = cls_cfg(tmp_path / 'cached')
    cfg.train_dataloader.num_workers = 1
    runner, rec = train(cfg, dict(EXACT), path='backbone.layer1.0')
    assert_same_training(runner, rec, ref_runner, ref)
    assert rec.runs == [1, 1, 0, 0]
    assert 'hit rate 100.0%), 8 of them without loading' in log_of(runner)


def test_frozen_weight_change_rebuilds(digits_seg_root, tmp_path):
    cache = str(tmp_path / 'cache')
    cfg = seg_cfg(digits_seg_root, tmp_path / 'first', max_iters=2)
    runner, _ = train(cfg, dict(EXACT, cache_dir=cache))
    assert cache_hook(runner).store.num_entries == 8
    state = runner.model.state_dict()
    checkpoint = str(tmp_path / 'changed.pth')
    state['backbone.layer4.1.conv2.weight'] += 0.01
    torch.save(dict(state_dict=state), checkpoint)

    # the same weights again: everything read
    cfg = seg_cfg(digits_seg_root, tmp_path / 'same', max_iters=2)
    runner, rec = train(cfg, dict(EXACT, cache_dir=cache))
    assert not cache_hook(runner).store.rebuilt and rec.runs == [0, 0]

    cfg = seg_cfg(digits_seg_root, tmp_path / 'changed', max_iters=2)
    cfg.load_from = checkpoint
    runner, rec = train(cfg, dict(EXACT, cache_dir=cache))
    hook = cache_hook(runner)
    assert hook.store.rebuilt and rec.runs == [1, 1]
    assert 'rebuilding' in log_of(runner) and 'frozen_weights' in log_of(
        runner)


def test_killed_run_keeps_its_entries(digits_seg_root, tmp_path):
    cache = str(tmp_path / 'cache')
    ref_runner, ref = train(seg_cfg(digits_seg_root, tmp_path / 'ref'))
    with pytest.raises(Killed):
        train(seg_cfg(digits_seg_root, tmp_path / 'killed'),
              dict(EXACT, cache_dir=cache), Killer(1))
    runner, rec = train(seg_cfg(digits_seg_root, tmp_path / 'again'),
                        dict(EXACT, cache_dir=cache))
    # the first batch was stored before the kill: read, not computed again
    assert rec.runs == [0, 1, 0, 0]
    assert not cache_hook(runner).store.rebuilt
    assert_same_training(runner, rec, ref_runner, ref)


def test_views_of_a_random_pipeline(tmp_path):
    """Two views of the demo's random crops: two passes compute and store,
    the third reads."""
    pytest.importorskip('mmpretrain', reason='needs MMPretrain')
    cfg = cls_cfg(tmp_path, epochs=3)
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='RandomCrop', crop_size=64, padding=4),
        dict(type='PackInputs')]
    runner, rec = train(cfg, dict(EXACT, views=2), path='backbone.layer1.0')
    assert rec.runs == [1, 1, 1, 1, 0, 0]
    assert cache_hook(runner).store.num_entries == 16
    log = log_of(runner)
    assert log.count('hit rate 0.0%') == 2 and 'hit rate 100.0%' in log
    assert '16 entries (8 samples x 2 view(s))' in log


def test_full_disk_goes_on_uncached(digits_seg_root, tmp_path):
    ref_runner, ref = train(seg_cfg(digits_seg_root, tmp_path / 'ref'))
    # room for 4 of the 8 entries (32,896 bytes each in float32)
    cfg = seg_cfg(digits_seg_root, tmp_path / 'full')
    runner, rec = train(cfg, dict(EXACT, max_disk_mb=4.5 * 32896 / 2**20))
    assert_same_training(runner, rec, ref_runner, ref)
    hook = cache_hook(runner)
    assert hook.store.num_entries == 4
    # pass 2: a batch with a sample left out is computed, not half-read
    assert rec.runs[:2] == [1, 1] and 1 in rec.runs[2:]
    assert 'reached max_disk_mb' in log_of(runner)


def test_nothing_frozen_does_nothing(tmp_path):
    pytest.importorskip('mmpretrain', reason='needs MMPretrain')
    cfg = cls_cfg(tmp_path, config=CLS_FULL, epochs=1)
    runner, rec = train(cfg, dict(EXACT))
    hook = cache_hook(runner)
    assert not hook.enabled and hook.store is None
    assert ('FrozenFeatureCacheHook: nothing is frozen: the hook does '
            'nothing') in log_of(runner)
    assert rec.runs == [1, 1]


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(views=0), ValueError, 'views must be a positive int, got 0'),
    (dict(views=1.5), TypeError, 'views must be an int, got 1.5'),
    (dict(views=True), TypeError, 'views must be an int, got True'),
    (dict(dtype='float64'), ValueError, "dtype must be one of "
     "('float16', 'float32', 'int8'), got 'float64'"),
    (dict(max_memory_mb=0), ValueError, 'max_memory_mb must be > 0, got 0'),
    (dict(max_memory_mb=-5.0), ValueError, 'max_memory_mb must be > 0, got '
     '-5.0'),
    (dict(max_memory_mb='1G'), TypeError, "max_memory_mb must be a number or "
     "None, got '1G'"),
    (dict(max_disk_mb=0), ValueError, 'max_disk_mb must be > 0, got 0'),
    (dict(seed=-1), ValueError, 'seed must be >= 0, got -1'),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match='^FrozenFeatureCacheHook: ' +
                       message.replace('(', r'\(').replace(')', r'\)')):
        FrozenFeatureCacheHook(**kwargs)


def test_loading_skipped_only_for_packed_batches_nobody_else_reads():
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from mmengine.structures import BaseDataElement
    hook = FrozenFeatureCacheHook()
    samples = [BaseDataElement(), BaseDataElement()]
    runner = MagicMock(hooks=[hook])
    assert hook._skip_loading(runner, dict(inputs=torch.zeros(2, 3),
                                           data_samples=samples))
    assert hook._skip_loading(runner, dict(inputs=[torch.zeros(3)] * 2,
                                           data_samples=samples))
    runner.logger.info.assert_not_called()
    for batch, why in [
        (dict(inputs=torch.zeros(2, 3), data_samples=samples, extra=1),
         "the batch has the keys ['data_samples', 'extra', 'inputs']"),
        (dict(inputs=[torch.zeros(3)], data_samples=samples),
         'its inputs and data_samples differ in length'),
        (dict(inputs=['a', 'b'], data_samples=samples),
         'its inputs are not tensors'),
    ]:
        assert not hook._skip_loading(runner, batch)
        assert runner.logger.info.call_args[0][0] == (
            'FrozenFeatureCacheHook: cached samples are loaded all the same: '
            + why)
    # the fidelity monitor runs the whole model on the loaded batch
    runner.hooks = [SimpleNamespace(fidelity_interval=10), hook]
    assert not hook._skip_loading(runner, dict(inputs=torch.zeros(2, 3),
                                               data_samples=samples))
    assert 'measures gradient fidelity' in runner.logger.info.call_args[0][0]


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(ValueError, match="FrozenFeatureCacheHook: cache_dir "
                       f"'{blocker}/cache' cannot be written"):
        FrozenFeatureCacheHook(cache_dir=str(blocker / 'cache'))


def test_two_process_gloo_run(digits_seg_root, tmp_path):
    """Each rank stores its own samples in one store and reads the others';
    training is the same as without the hook."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_addr=127.0.0.1', f'--master_port={port}', __file__,
           digits_seg_root, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    ranks = [torch.load(osp.join(tmp_path, f'rank{r}.pt')) for r in range(2)]
    for rank in ranks:
        assert rank['cached_losses'] == pytest.approx(rank['ref_losses'],
                                                      rel=1e-6, abs=1e-7)
        assert rank['runs'][:2] == [1, 1]  # pass 1 computes
        # the last step reads: every entry was written by then, by one rank
        # or the other (the first step of pass 2 may find an entry the other
        # rank is still writing, and compute it)
        assert rank['runs'][3] == 0
        assert rank['entries'] == 8
    # each rank trained on its own samples and DDP kept the weights in step
    assert ranks[0]['ref_losses'] != ranks[1]['ref_losses']
    for name, value in ranks[0]['cached_state'].items():
        torch.testing.assert_close(value, ranks[0]['ref_state'][name],
                                   rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(value, ranks[1]['cached_state'][name]), name


def _worker(root, out):
    import torch.distributed as dist
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    result = {}
    for name, hooks in (('ref', []), ('cached', [dict(EXACT)])):
        cfg = seg_cfg(root, osp.join(out, name))
        cfg.train_dataloader.batch_size = 2  # 2 steps a pass on each rank
        cfg.experiment_name = f'ddp_{name}'
        # SyncBN needs CUDA; the frozen backbone's BNs are in eval mode anyway
        for part in (cfg.model.backbone, cfg.model.decode_head):
            part.norm_cfg = dict(type='BN', requires_grad=True)
        cfg.launcher = 'pytorch'
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel',
                                     device_ids=None)
        runner, recorder = train(cfg, *hooks)
        dist.barrier()
        result[f'{name}_losses'] = recorder.losses
        result[f'{name}_state'] = {
            n: p.detach().clone()
            for n, p in runner.model.module.named_parameters()}
        if hooks:
            result['runs'] = recorder.runs
            result['entries'] = cache_hook(runner).store.num_entries
    torch.save(result, osp.join(out, f'rank{rank}.pt'))
    dist.destroy_process_group()


if __name__ == '__main__':
    torch.set_num_threads(1)
    _worker(*sys.argv[1:])
