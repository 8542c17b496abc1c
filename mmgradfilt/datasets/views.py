"""Views: a training pipeline's randomness seeded by (seed, sample, view).

View ``v`` of sample ``idx`` is the same augmented sample every time it is
drawn, so whatever is computed from it can be stored and reused. A sample's
*code* is ``idx * views + v``; :class:`ViewSampler` draws the codes and
:class:`ViewDataset` fetches them and tags each data sample with
``cache_index=code``.

Given a predicate ``is_cached(code)``, the sampler marks each batch whose
codes are all cached (it yields ``-1 - code``), the dataset answers a marked
code with a :class:`Skipped` item without loading anything, and the loader
of :func:`with_views` collates a batch of them into a :class:`SkippedBatch`,
which the consumer (the cache hook) fills in the main process.
"""
import hashlib
import os
import os.path as osp
import random
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from mmengine.structures import BaseDataElement
from torch.utils.data import DataLoader, Dataset, Sampler


def _check_views_seed(views: int, seed: int) -> None:
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f'views must be a positive int, got {views!r}')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}')


def view_seed(seed: int, idx: int, view: int) -> int:
    """A 32-bit seed from ``(seed, idx, view)``, the same in every process."""
    return int(
        np.random.SeedSequence([seed, idx, view]).generate_state(1)[0])


@contextmanager
def _restored_rngs() -> Iterator[None]:
    """Restore ``random``, numpy's global RNG and torch's CPU RNG on exit.

    Saving and restoring numpy's state costs about 0.1 ms, seeding the three
    about 0.015 ms: a batch restores once and seeds per sample.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed ``random``, numpy's global RNG and torch's CPU RNG, and restore
    their states on exit."""
    with _restored_rngs():
        _seed_rngs(seed)
        yield


class Skipped:
    """The item :class:`ViewDataset` gives for a code the sampler marked as
    cached: nothing loaded, only the code."""
    __slots__ = ('code', )

    def __init__(self, code: int) -> None:
        self.code = code

    def __reduce__(self):
        return Skipped, (self.code, )

    def __repr__(self) -> str:
        return f'Skipped({self.code})'


class SkippedBatch(dict):
    """A batch of :class:`Skipped` items: ``{'codes': [code, ...]}``. A
    dict, so that its consumer can fill it in place with the batch loading
    would have given (MMEngine's loops hand the same dict to the hooks'
    ``before_train_iter`` and to ``train_step``)."""


class _SkipCollate:
    """The loader's ``collate_fn``, except for a batch of :class:`Skipped`
    items, which becomes a :class:`SkippedBatch`."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: List[Any]) -> Any:
        skipped = [isinstance(item, Skipped) for item in items]
        if not any(skipped):
            return self.collate_fn(items)
        if not all(skipped):
            raise RuntimeError(
                'A batch mixes skipped and loaded samples: the loader\'s '
                'batch size must be the one its ViewSampler was given')
        return SkippedBatch(codes=[item.code for item in items])


class ViewDataset(Dataset):
    """A dataset whose item ``code`` is view ``code % views`` of sample
    ``code // views``.

    The wrapped dataset's item runs with the global RNGs (``random``, numpy,
    torch CPU) seeded from ``(seed, idx, view)`` and restored afterwards, so
    a view is the same sample every time and the global streams are left as
    they were. Each data sample gets ``cache_index=code`` in its metainfo.
    The length is the wrapped dataset's: the sampler picks the codes. A
    negative item ``-1 - code`` (the sampler's mark of a cached code) is
    :class:`Skipped` ``(code)``: nothing is loaded.

    Args:
        dataset (Dataset): Dataset whose items are dicts with
            ``data_samples`` (a :class:`~mmengine.structures.BaseDataElement`
            or a list of them), as MMEngine's packing transforms give.
        views (int): Views per sample.
        seed (int): Seed of the views.
    """

    def __init__(self, dataset: Dataset, views: int, seed: int) -> None:
        _check_views_seed(views, seed)
        self.dataset = dataset
        self.views = views
        self.seed = seed
        self._seeds: Dict[int, int] = {}  # code -> view_seed, 13 us each

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # `metainfo` and the like of the wrapped dataset; `dataset` itself is
        # looked up here only before __init__ (unpickling)
        if name == 'dataset' or name.startswith('__'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, code: int) -> Any:
        with _restored_rngs():
            return self._load(int(code))

    def __getitems__(self, codes: Sequence[int]) -> List[Any]:
        """The items of ``codes`` (PyTorch's loaders fetch a batch with this
        method where it exists): the RNG states are saved and restored once
        per batch."""
        with _restored_rngs():
            return [self._load(int(code)) for code in codes]

    def _load(self, code: int) -> Any:
        if code < 0:
            return Skipped(-1 - code)
        idx, view = divmod(code, self.views)
        seed = self._seeds.get(code)
        if seed is None:
            seed = self._seeds[code] = view_seed(self.seed, idx, view)
        _seed_rngs(seed)
        data = self.dataset[idx]
        samples = data.get('data_samples') if isinstance(data, dict) else None
        elements = samples if isinstance(samples, (list, tuple)) else [samples]
        if not all(isinstance(e, BaseDataElement) for e in elements):
            raise TypeError(
                'ViewDataset tags data samples with cache_index: it needs '
                'items that are dicts with BaseDataElement data_samples, got '
                f'{type(data).__name__} with data_samples of type '
                f'{type(samples).__name__}')
        for element in elements:
            element.set_metainfo(dict(cache_index=code))
        return data


class ViewSampler(Sampler):
    """Draws one view of each index the wrapped sampler yields.

    For index ``idx`` it yields ``idx * views + v``. The ``k``-th draw of
    ``idx`` takes position ``k % views`` of a permutation of the views seeded
    by ``(seed, idx, k // views)``: every ``views`` draws of a sample use each
    view once, in an order that is the same on every run. ``k`` counts the
    draws of ``idx`` since the last epoch change, plus the epoch: one draw per
    epoch (the usual sampler) gives ``k = epoch``, so a resumed run draws the
    same views; an infinite sampler counts on. ``set_epoch`` and ``len``
    delegate to the wrapped sampler.

    With ``is_cached``, the codes are taken ``batch_size`` at a time (the
    batches the loader's batch sampler will form) and a batch whose codes
    are all cached is yielded marked, ``-1 - code`` each: its samples need
    not be loaded. The predicate runs in the main process when the loader
    asks for the batch's indices (ahead of the training step by the
    loader's prefetching).

    Args:
        sampler (Sampler): Sampler of the original indices, e.g. MMEngine's
            ``DefaultSampler`` or ``InfiniteSampler``.
        views (int): Views per sample.
        seed (int): Seed of the draws.
        is_cached (Callable[[int], bool], optional): Whether a code's sample
            need not be loaded. Defaults to None: every code is loaded.
        batch_size (int): The loader's batch size (used with
            ``is_cached``). Defaults to 1.
    """

    def __init__(self,
                 sampler: Sampler,
                 views: int,
                 seed: int,
                 is_cached: Optional[Callable[[int], bool]] = None,
                 batch_size: int = 1) -> None:
        _check_views_seed(views, seed)
        if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                or batch_size < 1):
            raise ValueError(
                f'batch_size must be a positive int, got {batch_size!r}')
        self.sampler = sampler
        self.views = views
        self.seed = seed
        self.is_cached = is_cached
        self.batch_size = batch_size
        self.epoch = 0
        self._draws: Dict[int, int] = {}

    def view_of(self, idx: int, k: int) -> int:
        """The view of the ``k``-th draw of ``idx``."""
        if self.views == 1:
            return 0
        cycle, position = divmod(k, self.views)
        order = np.random.default_rng([self.seed, idx, cycle]).permutation(
            self.views)
        return int(order[position])

    def _codes(self) -> Iterator[int]:
        for idx in self.sampler:
            idx = int(idx)
            count = self._draws.get(idx, 0)
            self._draws[idx] = count + 1
            yield idx * self.views + self.view_of(idx, self.epoch + count)

    def __iter__(self) -> Iterator[int]:
        if self.is_cached is None:
            yield from self._codes()
            return
        batch: List[int] = []
        for code in self._codes():
            batch.append(code)
            if len(batch) == self.batch_size:
                yield from self._marked(batch)
                batch = []
        yield from self._marked(batch)

    def _marked(self, batch: List[int]) -> List[int]:
        if batch and all(self.is_cached(code) for code in batch):
            return [-1 - code for code in batch]
        return batch

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and in the wrapped sampler (if it has one)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._draws.clear()
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)


def with_views(dataloader: DataLoader,
               views: int,
               seed: int,
               is_cached: Optional[Callable[[int], bool]] = None
               ) -> DataLoader:
    """A copy of ``dataloader`` that yields views (:class:`ViewDataset`,
    :class:`ViewSampler`).

    Batch size, ``drop_last``, workers, ``collate_fn``, ``worker_init_fn``,
    ``persistent_workers``, ``pin_memory``, ``generator``, ``timeout``,
    ``multiprocessing_context`` and ``prefetch_factor`` are kept. With
    ``views=1`` and a deterministic pipeline it yields the same batches in
    the same order as ``dataloader``.

    Args:
        dataloader (DataLoader): A loader built with a sampler and a batch
            size (as MMEngine's ``Runner.build_dataloader`` builds them).
        views (int): Views per sample.
        seed (int): Seed of the views and their draws.
        is_cached (Callable[[int], bool], optional): Called in the main
            process; a batch whose codes are all cached is not loaded and
            comes as a :class:`SkippedBatch` (the other batches as the
            ``collate_fn`` makes them). Defaults to None: every batch is
            loaded.

    Returns:
        DataLoader: The new loader.
    """
    _check_views_seed(views, seed)
    if dataloader.batch_size is None:
        raise ValueError(
            'with_views needs a DataLoader built with a sampler and a '
            'batch_size, got one with the batch sampler '
            f'{type(dataloader.batch_sampler).__name__}')
    extra = {}
    if dataloader.num_workers > 0:
        extra['prefetch_factor'] = dataloader.prefetch_factor
    return DataLoader(
        ViewDataset(dataloader.dataset, views, seed),
        batch_size=dataloader.batch_size,
        sampler=ViewSampler(dataloader.sampler, views, seed, is_cached,
                            dataloader.batch_size),
        num_workers=dataloader.num_workers,
        collate_fn=(dataloader.collate_fn if is_cached is None else
                    _SkipCollate(dataloader.collate_fn)),
        pin_memory=dataloader.pin_memory,
        drop_last=dataloader.drop_last,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        persistent_workers=dataloader.persistent_workers,
        **extra)


def _update(digest: 'hashlib._Hash', value: Any) -> None:
    """Feed a canonical form of ``value`` to ``digest``; a string naming a
    file adds the file's size and modification time."""
    if isinstance(value, dict):
        digest.update(b'{')
        for key in sorted(value, key=str):
            _update(digest, str(key))
            _update(digest, value[key])
        digest.update(b'}')
    elif isinstance(value, (list, tuple)):
        digest.update(b'[')
        for item in value:
            _update(digest, item)
        digest.update(b']')
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        array = np.ascontiguousarray(
            value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
            else value)
        digest.update(f'<{array.dtype}{array.shape}>'.encode())
        digest.update(array.tobytes())
    elif isinstance(value, str):
        digest.update(repr(value).encode())
        if osp.isfile(value):
            stat = os.stat(value)
            digest.update(f'<{stat.st_size},{stat.st_mtime_ns}>'.encode())
    else:
        digest.update(f'<{type(value).__name__}:{value!r}>'.encode())


def _fingerprint(digest: 'hashlib._Hash', dataset: Any) -> None:
    digest.update(' '.join(f'{c.__module__}.{c.__qualname__}'
                           for c in type(dataset).__mro__).encode())
    if isinstance(dataset, ViewDataset):
        _fingerprint(digest, dataset.dataset)
        return
    if hasattr(dataset, 'full_init'):
        dataset.full_init()
    for name in ('indices', 'times', 'repeat_indices'):
        if hasattr(dataset, name):
            _update(digest, name)
            _update(digest, getattr(dataset, name))
    if hasattr(dataset, 'datasets'):
        for child in dataset.datasets:
            _fingerprint(digest, child)
    elif hasattr(dataset, 'dataset'):
        _fingerprint(digest, dataset.dataset)
    elif hasattr(dataset, 'get_data_info'):
        _update(digest, len(dataset))
        for i in range(len(dataset)):
            _update(digest, dataset.get_data_info(i))
    else:
        _update(digest, len(dataset))


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of what a dataset serves, stable across processes and runs.

    It covers the class chain of the dataset and of the datasets it wraps
    (``.dataset``, ``.datasets``), their ``indices`` (and MMEngine's repeat
    wrappers' ``times``, ``repeat_indices``) and the data list of MMEngine
    datasets (``get_data_info``): values, arrays, and the size and
    modification time of every file named there. The pipeline is not
    covered. A dataset without ``get_data_info`` counts by its class and
    length only.

    Args:
        dataset: The dataset.

    Returns:
        str: A hexadecimal SHA-256 digest.
    """
    digest = hashlib.sha256()
    _fingerprint(digest, dataset)
    return digest.hexdigest()
