import copyreg
import hashlib
import io
import json
import os.path as osp
import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.dist import barrier, get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop
from mmengine.structures import BaseDataElement

from ..cache import FeatureStore, check_storage, check_writable
from ..datasets.views import SkippedBatch, dataset_fingerprint, with_views
from ..frontier import Capture, Frontier, find_frontier
from ..report import MB, format_table

NAME = 'FrozenFeatureCacheHook'


@dataclass
class _Pass:
    """Counts of one pass over the data (an epoch)."""
    hits: int = 0  # samples whose frontier was read
    misses: int = 0  # samples computed (and stored when they fit)
    unloaded: int = 0  # samples served without loading (of the hits)


def _tensor_from_numpy(array, dtype=None):
    tensor = torch.from_numpy(array)
    return tensor if dtype is None else tensor.to(getattr(torch, dtype))


def _reduce_tensor(tensor: torch.Tensor):
    # torch pickles a tensor through torch.save: unpickling a data sample
    # takes 0.3 ms that way, 0.03 ms as a numpy array
    try:
        array = tensor.numpy()
    except (TypeError, RuntimeError):  # no numpy dtype, grad, not on CPU
        return tensor.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    if (array.size >= 1024 and array.dtype.kind in 'iu'
            and array.dtype.itemsize > 1 and array.min() >= 0
            and array.max() <= 255):  # a label map in int64: 8x less
        return _tensor_from_numpy, (array.astype(np.uint8),
                                    str(tensor.dtype).split('.')[-1])
    return _tensor_from_numpy, (array, )


class _Pickler(pickle.Pickler):
    dispatch_table = copyreg.dispatch_table.copy()
    dispatch_table[torch.Tensor] = _reduce_tensor


@dataclass
class _Held:
    """What a cached sample's batch needs besides its frontier: its packed
    data sample (pickled, zlib-compressed when over 1 KiB: label maps shrink
    many times) and its input's shape and dtype (the input is replaced by a
    placeholder: the replay does not read it)."""
    blob: bytes
    compressed: bool
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, data_sample: Any, inputs: torch.Tensor) -> '_Held':
        buffer = io.BytesIO()
        _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(data_sample)
        blob = buffer.getvalue()
        compressed = len(blob) > 1024
        if compressed:
            blob = zlib.compress(blob, 1)
        return cls(blob, compressed, tuple(inputs.shape), inputs.dtype)

    def item(self) -> dict:
        """The sample as loading gives it, with a placeholder input."""
        blob = zlib.decompress(self.blob) if self.compressed else self.blob
        return dict(
            inputs=torch.zeros((), dtype=self.dtype).expand(self.shape),
            data_samples=pickle.loads(blob))


@dataclass
class _Step:
    """What the next training step does."""
    indices: List[int]
    tensors: Optional[List[torch.Tensor]] = None  # replay these
    missing: List[int] = field(default_factory=list)  # or capture, store these
    capture: Optional[Capture] = None
    unloaded: bool = False  # the batch came without loading
    # data samples of this batch to hold once their entry is valid
    held: Dict[int, _Held] = field(default_factory=dict)


@HOOKS.register_module()
class FrozenFeatureCacheHook(Hook):
    """Train from stored outputs of the frozen part instead of recomputing
    them.

    At the first training iteration the hook finds the *frontier* of the
    model as trained (:func:`mmgradfilt.frontier.find_frontier`: the tensors
    the frozen part hands to the trained part) on that real batch. A step
    whose samples all have a valid entry in the store runs from the stored
    frontier tensors and skips the frozen part upstream of it; any other step
    runs the whole model, and the missing samples' frontier tensors are
    stored after it. The training pipeline's randomness is seeded by
    ``(seed, sample, view)`` (:func:`mmgradfilt.datasets.views.with_views`),
    so a stored entry is the output of the same augmented sample. Validation
    and testing run the whole model; checkpoints do not change.

    The store (:class:`mmgradfilt.cache.FeatureStore`) is kept under
    ``<cache_dir>/frozen_feature_cache`` and keyed on the frozen part's
    weights and structure, the frontier, the training dataset (its config
    with the pipeline, its files), the data preprocessor's config, ``dtype``,
    ``views`` and ``seed``: anything else rebuilds it, with a log line. A run
    killed and started again reuses the entries it completed.

    A cached sample is not even loaded: the hook keeps in RAM each stored
    sample's packed data sample (labels, metainfo: taken before the data
    preprocessor changes them) and its input's shape, and the loader yields
    a batch whose samples all have both as a stub that the hook fills with
    them and a placeholder input (the replay does not read it). A sample not
    held (a resumed run, the other rank's entry) is loaded as usual and held
    from then on. Loading is not skipped when the batch does not have the
    ``inputs`` / ``data_samples`` form of MMEngine's packing transforms, or
    when a ``GradientFilterHook`` measures gradient fidelity (it runs the
    whole model on the batch).

    Args:
        views (int): Augmented views stored per sample; each pass over the
            data draws one of them per sample. With a deterministic pipeline
            ``views=1`` is exact. Defaults to 1.
        dtype (str): Storage dtype: 'float16', 'float32' (exact) or 'int8'
            (per-channel scales). Defaults to 'float16'.
        max_memory_mb (float, optional): Entries kept in RAM up to this size,
            the rest read from memory-mapped files. Defaults to None: a
            quarter of the available memory.
        cache_dir (str, optional): Folder of the store. Defaults to None: the
            run's ``work_dir``.
        max_disk_mb (float, optional): Bound of the store on disk; entries
            beyond it are computed as without the hook. Defaults to None: no
            bound.
        seed (int): Seed of the views. Defaults to 0.
    """

    # after GradientFilterHook ('VERY_HIGH'): the model is frozen then
    priority = 'HIGH'

    def __init__(self,
                 views: int = 1,
                 dtype: str = 'float16',
                 max_memory_mb: Optional[float] = None,
                 cache_dir: Optional[str] = None,
                 max_disk_mb: Optional[float] = None,
                 seed: int = 0) -> None:
        for name, value in (('views', views), ('seed', seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f'{NAME}: {name} must be an int, got '
                                f'{value!r}')
        if views < 1:
            raise ValueError(f'{NAME}: views must be a positive int, got '
                             f'{views!r}')
        if seed < 0:
            raise ValueError(f'{NAME}: seed must be >= 0, got {seed!r}')
        try:
            check_storage(dtype, max_memory_mb, max_disk_mb)
        except (TypeError, ValueError) as err:
            raise type(err)(f'{NAME}: {err}') from None
        if cache_dir is not None:
            if not isinstance(cache_dir, str):
                raise TypeError(f'{NAME}: cache_dir must be a str or None, '
                                f'got {cache_dir!r}')
            _check_writable(cache_dir)
        self.views = views
        self.dtype = dtype
        self.max_memory_mb = max_memory_mb
        self.cache_dir = cache_dir
        self.max_disk_mb = max_disk_mb
        self.seed = seed
        self.enabled = True
        self.frontier: Optional[Frontier] = None
        self.store: Optional[FeatureStore] = None
        self.root: Optional[str] = None
        self._dataset = None
        self._train_step = None
        self._step: Optional[_Step] = None
        self._pass = _Pass()
        self._total = _Pass()
        self._frozen_seconds = 0.0  # of the samples computed
        self._iters_in_pass = 0
        # skip the loading of cached samples (set on the first batch)
        self._skip = False
        self._collate = None  # the loader's own collate_fn
        self._held: Dict[int, _Held] = {}
        self._held_bytes = 0

    def before_run(self, runner) -> None:
        """Check that the cache folder (default: the work_dir) can be
        written."""
        self.root = osp.join(self.cache_dir or runner.work_dir,
                             'frozen_feature_cache')
        _check_writable(self.root)

    def before_train(self, runner) -> None:
        """Serve the training data as views and run the training steps
        through the cache."""
        model = _unwrap(runner.model)
        trains = [p.requires_grad for p in model.parameters()]
        if all(trains) or not any(trains):
            self._disable(runner, 'nothing is frozen' if all(trains) else
                          'nothing trains')
            return
        loop = runner.train_loop
        self._dataset = loop.dataloader.dataset
        self._collate = loop.dataloader.collate_fn
        loop.dataloader = with_views(loop.dataloader, self.views, self.seed,
                                     self._is_cached)
        if hasattr(loop, 'dataloader_iterator'):  # IterBasedTrainLoop
            loop.dataloader_iterator = type(loop.dataloader_iterator)(
                loop.dataloader)
        self._train_step = runner.model.train_step
        runner.model.train_step = self._cached_train_step

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        """Find the frontier and open the store (first iteration); decide
        whether this step reads or computes the frontier."""
        if not self.enabled:
            return
        if self.frontier is None:
            self._setup(runner, data_batch)
            if not self.enabled:
                return
        unloaded = isinstance(data_batch, SkippedBatch)
        if unloaded:
            indices = list(data_batch['codes'])
            batch = self._collate([self._held[i].item() for i in indices])
            data_batch.clear()
            data_batch.update(batch)
        else:
            indices = _cache_indices(data_batch)
        missing = [i for i in indices if not self.store.contains(i)]
        if missing and unloaded:  # entries are never invalidated in a run
            raise RuntimeError(f'{NAME}: entries {missing} of a batch served '
                               'without loading are not valid')
        if missing:
            self._step = _Step(indices, missing=missing,
                               held=self._to_hold(data_batch, indices))
            return
        device = next(_unwrap(runner.model).parameters()).device
        self._step = _Step(
            indices, unloaded=unloaded,
            held={} if unloaded else self._to_hold(data_batch, indices),
            tensors=[t.to(device, non_blocking=True)
                     for t in self.store.get_batch(indices)])

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        """Store the frontier of the samples computed; log each pass over
        the data of an iteration-based loop."""
        step, self._step = self._step, None
        if step is None or (step.tensors is None and step.capture is None):
            return  # the step did not go through the cache
        if step.tensors is not None:
            self._pass.hits += len(step.indices)
            self._pass.unloaded += len(step.indices) if step.unloaded else 0
        else:
            self._pass.misses += len(step.indices)
            self._frozen_seconds += step.capture.frozen_seconds
            rows = [t.cpu() for t in step.capture.tensors]
            missing = set(step.missing)
            for j, index in enumerate(step.indices):
                if index in missing:
                    missing.discard(index)  # a code twice in one batch
                    self.store.put(index, [t[j] for t in rows])
        for index, held in step.held.items():
            if self.store.contains(index):
                self._held[index] = held
                self._held_bytes += len(held.blob)
        self._iters_in_pass += 1
        if (not isinstance(runner.train_loop, EpochBasedTrainLoop) and
                self._iters_in_pass >= len(runner.train_loop.dataloader)):
            self._log_pass(runner)

    def after_train_epoch(self, runner) -> None:
        """Log the pass: hit rate, entries, size, frozen forward saved."""
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            self._log_pass(runner)

    def after_train(self, runner) -> None:
        """Log a last partial pass and give the model its own train_step."""
        if self._iters_in_pass:
            self._log_pass(runner)
        if self._train_step is not None:
            del runner.model.train_step
            self._train_step = None

    # ------------------------------------------------------------------
    def _cached_train_step(self, data, optim_wrapper):
        step = self._step
        if step is None or not self.enabled:
            return self._train_step(data, optim_wrapper)
        if step.tensors is not None:
            with self.frontier.replay(step.tensors):
                return self._train_step(data, optim_wrapper)
        with self.frontier.capture() as capture:
            outputs = self._train_step(data, optim_wrapper)
        step.capture = capture
        return outputs

    def _is_cached(self, code: int) -> bool:
        """Whether the sample of ``code`` need not be loaded: its data
        sample is held and its entry valid (asked by the loader's sampler in
        the main process)."""
        return (self._skip and self.enabled and code in self._held
                and self.store.contains(code))

    def _to_hold(self, data_batch: dict, indices: List[int]
                 ) -> Dict[int, _Held]:
        """What to keep of the batch's samples not held yet, taken before
        the data preprocessor changes the data samples in place."""
        if not self._skip:
            return {}
        inputs = data_batch['inputs']
        held = {}
        for j, index in enumerate(indices):
            if index in self._held or index in held:
                continue
            held[index] = _Held.of(data_batch['data_samples'][j], inputs[j])
        return held

    def _skip_loading(self, runner, data_batch: dict) -> bool:
        """Whether cached samples can be served without loading: the batch
        is ``inputs`` (a tensor or a list of per-sample tensors) and
        ``data_samples``, and no hook reads the real inputs of each batch."""
        why = None
        samples = data_batch.get('data_samples')
        inputs = data_batch.get('inputs')
        if set(data_batch) != {'inputs', 'data_samples'}:
            why = f'the batch has the keys {sorted(data_batch)}'
        elif not (isinstance(samples, (list, tuple)) and all(
                isinstance(s, BaseDataElement) for s in samples)):
            why = 'its data_samples are not a list of data elements'
        elif not (isinstance(inputs, torch.Tensor) or (
                isinstance(inputs, (list, tuple))
                and all(isinstance(t, torch.Tensor) for t in inputs))):
            why = 'its inputs are not tensors'
        elif len(inputs) != len(samples):
            why = 'its inputs and data_samples differ in length'
        else:
            monitors = [type(h).__name__ for h in runner.hooks
                        if getattr(h, 'fidelity_interval', None)]
            if monitors:
                why = (f'{monitors[0]} measures gradient fidelity on the '
                       'loaded batches')
        if why is not None:
            runner.logger.info(f'{NAME}: cached samples are loaded all the '
                               f'same: {why}')
        return why is None

    def _disable(self, runner, why: str) -> None:
        self.enabled = False
        runner.logger.info(f'{NAME}: {why}: the hook does nothing')

    def _setup(self, runner, data_batch: dict) -> None:
        """Find the frontier on the first batch and open the store."""
        model = _unwrap(runner.model)
        _cache_indices(data_batch)  # the loader serves views
        data = model.data_preprocessor(data_batch, True)

        def run_loss():
            with runner.optim_wrapper.optim_context(model):
                return model.parse_losses(model(**data, mode='loss'))[0]

        frontier = find_frontier(model, run_loss,
                                 batch_size=len(data_batch['data_samples']),
                                 seed=self.seed)
        if not frontier:
            self._disable(runner, 'the loss reads no output of the frozen '
                          'part (empty frontier)')
            return
        self.frontier = frontier
        self._skip = self._skip_loading(runner, data_batch)
        capacity = len(self._dataset) * self.views
        kwargs = dict(root=self.root, key=self._key(runner, frontier),
                      specs=frontier.specs, capacity=capacity,
                      dtype=self.dtype, max_memory_mb=self.max_memory_mb,
                      max_disk_mb=self.max_disk_mb)
        if get_rank() == 0:
            self.store = FeatureStore(**kwargs)
        barrier()
        if get_rank() != 0:
            self.store = FeatureStore(**kwargs, create=False)
        store = self.store
        skipped = ', '.join(dict.fromkeys(p for p, _ in frontier.calls))
        runner.logger.info('\n'.join([
            f'{NAME}: frontier of the frozen part ({len(frontier)} '
            f'tensor(s), bytes per sample in {self.dtype}):',
            format_table(['module output', 'shape', 'bytes per sample'],
                         frontier.table(self.dtype)),
            f'Skipped when cached: {skipped}',
            f'Store: {self.root}{" (rebuilt)" if store.rebuilt else ""}: '
            f'{capacity} entries ({len(self._dataset)} samples x '
            f'{self.views} view(s)) of {store.bytes_per_entry:,} bytes, '
            f'{_mb(capacity * store.bytes_per_entry)} when full; RAM up to '
            f'{store.max_memory_mb:.0f} MB; {store.num_entries} entries '
            f'valid now']))

    def _key(self, runner, frontier: Frontier) -> Dict[str, Any]:
        """What the stored entries depend on."""
        weights, structure = hashlib.sha256(), hashlib.sha256()
        for path, module in sorted(frontier.frozen_modules.items()):
            structure.update(f'{path}:{module!r}\n'.encode())
            for name, tensor in module.state_dict().items():
                t = tensor.detach().cpu().contiguous()
                weights.update(f'{path}.{name}:{t.dtype}:{tuple(t.shape)}'
                               .encode())
                weights.update(t.reshape(-1).view(torch.uint8).numpy())
        cfg = runner.cfg
        model_cfg = cfg.get('model') or {}
        preprocessor = (model_cfg.get('data_preprocessor')
                        or cfg.get('data_preprocessor'))
        dataset = (cfg.get('train_dataloader') or {}).get('dataset')
        return dict(
            frozen_weights=weights.hexdigest(),
            frozen_modules=structure.hexdigest(),
            frontier=[[t.name, list(t.shape), str(t.dtype)]
                      for t in frontier.tensors],
            dataset=_canonical(dataset),
            dataset_files=dataset_fingerprint(self._dataset),
            data_preprocessor=_canonical(preprocessor),
            dtype=self.dtype,
            views=self.views,
            seed=self.seed)

    def _log_pass(self, runner) -> None:
        p, self._pass = self._pass, _Pass()
        self._iters_in_pass = 0
        self._total.hits += p.hits
        self._total.misses += p.misses
        if self.store is None or p.hits + p.misses == 0:
            return
        hit_rate = p.hits / (p.hits + p.misses)
        per_sample = self._frozen_seconds / max(self._total.misses, 1)
        saved = p.hits * per_sample
        store = self.store
        hub = runner.message_hub
        ram = store.ram_bytes + self._held_bytes
        for name, value in (('hit_rate', hit_rate),
                            ('entries', store.num_entries),
                            ('unloaded', p.unloaded),
                            ('ram_mb', ram / MB),
                            ('disk_mb', store.disk_bytes / MB),
                            ('saved_s', saved)):
            hub.update_scalar(f'cache/{name}', value)
        runner.logger.info(
            f'{NAME}: this pass read {p.hits} of {p.hits + p.misses} samples '
            f'from the cache (hit rate {100 * hit_rate:.1f}%), {p.unloaded} '
            f'of them without loading; '
            f'{store.num_entries} of {store.capacity} entries valid, '
            f'{_mb(ram)} in RAM ({_mb(self._held_bytes)} of it data samples '
            f'of {len(self._held)} entries), {_mb(store.disk_bytes)} on disk; '
            f'frozen forward saved '
            f'{saved:.2f} s ({1000 * per_sample:.2f} ms per sample)')


def _mb(size: float) -> str:
    return f'{size / MB:.3g} MB'


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _cache_indices(data_batch: dict) -> List[int]:
    try:
        return [int(s.metainfo['cache_index'])
                for s in data_batch['data_samples']]
    except (KeyError, TypeError, AttributeError) as exc:
        raise RuntimeError(
            f'{NAME}: the training batch has no cache_index in its data '
            'samples: the train loop\'s dataloader must be the one '
            'before_train set (with_views)') from exc


def _canonical(cfg: Any) -> str:
    """A config as sorted JSON (types and other objects by their str)."""
    if hasattr(cfg, 'to_dict'):
        cfg = cfg.to_dict()
    return json.dumps(cfg, sort_keys=True, default=str)


def _check_writable(folder: str) -> None:
    try:
        check_writable(folder)
    except ValueError as err:
        raise ValueError(f'{NAME}: {err}') from None
