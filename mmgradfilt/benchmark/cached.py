"""The benchmark's ``cached`` variant: the step of a training run with
``FrozenFeatureCacheHook`` once every entry is stored (the steady state).

The config's model with its ``GradientFilterHook`` as configured (lean by
default); the frontier of its frozen part is found on the benchmark's batch
(:func:`~mmgradfilt.frontier.find_frontier`), captured once, written to a
:class:`~mmgradfilt.cache.FeatureStore` in the hook's default dtype and read
back at every step, so the step trains on what the cache would give it. The
forward runs inside :meth:`~mmgradfilt.frontier.Frontier.replay`: nothing
upstream of the frontier runs.
"""
import logging
import tempfile
import time
from typing import Dict, List

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger

from ..cache import FeatureStore
from ..frontier import find_frontier, kept_buffers, replayed_rng
from ..report import MB
from .step import TrainStep, Variant
from .timing import summarize, synchronize


class NotCacheable(ValueError):
    """The model's frozen part cannot be cached (nothing frozen that the
    loss reads, or an output that is not a function of the sample)."""


class CachedStep(TrainStep):
    """A training step whose forward reads the frontier tensors of its batch
    from a feature store and replays them (:class:`TrainStep`'s phases).

    The forward phase includes the read: the store's RAM tier, decoded to
    the frontier's dtype and moved to the model's device, as
    ``FrozenFeatureCacheHook`` reads a batch whose samples are all stored.
    The store lives in a temporary folder that goes with the step.

    Args:
        model (nn.Module): The model as trained (recipe applied), on its
            device, in training mode.
        optim_cfg (ConfigDict): The config's ``optim_wrapper``.
        batch (dict): The batch, before the data preprocessor.

    Raises:
        NotCacheable: Where :func:`~mmgradfilt.frontier.find_frontier`
            refuses the model or finds an empty frontier.
    """
    #: stored dtype: the hook's default
    dtype = 'float16'

    def __init__(self, model: nn.Module, optim_cfg: ConfigDict,
                 batch: Dict) -> None:
        super().__init__(model, optim_cfg, batch)
        size = len(batch['data_samples'])
        try:
            self.frontier = find_frontier(model, self._loss, batch_size=size)
        except ValueError as e:
            raise NotCacheable(str(e)) from e
        if not self.frontier:
            raise NotCacheable('the loss reads no output of the frozen part '
                               '(empty frontier): nothing to cache')
        self._dir = tempfile.TemporaryDirectory(prefix='mmgradfilt_cached_')
        self.indices = list(range(size))
        # the batch's entries all fit the RAM tier, as in a run whose cache
        # fits the memory budget
        bytes_per_sample = self.frontier.bytes_per_sample(self.dtype)
        # the store's log line names a temporary folder: nothing to say
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            self.store = FeatureStore(
                self._dir.name, dict(benchmark=[t.name for t in
                                                self.frontier.tensors]),
                self.frontier.specs, size, dtype=self.dtype,
                max_memory_mb=2 * size * bytes_per_sample / MB + 1)
        finally:
            logger.setLevel(level)
        rows = self._capture()
        for i in self.indices:
            if not self.store.put(i, [t[i] for t in rows]):
                raise RuntimeError(f'could not store entry {i} in '
                                   f'{self._dir.name}')
        self.read_seconds: List[float] = []

    def _loss(self) -> torch.Tensor:
        return self.model.parse_losses(self.model(**self.data, mode='loss'))[0]

    def _capture(self) -> List[torch.Tensor]:
        """The frontier tensors of the batch (CPU), from one forward that
        leaves the model's buffers and the random state as they were."""
        devices = {p.device for p in self.model.parameters()}
        with replayed_rng(*devices), kept_buffers(self.model), \
                self.frontier.capture() as capture:
            self._loss()
        return [t.cpu() for t in capture.tensors]

    def read(self) -> List[torch.Tensor]:
        """The batch's frontier tensors from the store, on the model's
        device."""
        device = next(self.model.parameters()).device
        return [t.to(device, non_blocking=True)
                for t in self.store.get_batch(self.indices)]

    def forward(self) -> None:
        start = time.perf_counter()
        tensors = self.read()
        synchronize(tensors[0].device)
        self.read_seconds.append(time.perf_counter() - start)
        with self.frontier.replay(tensors):
            super().forward()

    def cache_info(self) -> Dict:
        """What the benchmark's JSON says of the cache: the stored dtype,
        the bytes one sample takes, the frontier tensors, the modules a
        cached step skips, and the time of the reads so far (ms)."""
        return dict(
            cache_dtype=self.dtype,
            cache_bytes_per_sample=self.store.bytes_per_entry,
            frontier=[dict(name=t.name, shape=list(t.shape),
                           bytes_per_sample=t.bytes_per_sample(self.dtype))
                      for t in self.frontier.tensors],
            skipped=list(dict.fromkeys(p for p, _ in self.frontier.calls)),
            cache_read=summarize(self.read_seconds) if self.read_seconds
            else None)


CACHED = Variant(
    'cached', 'filtered+lean+cache', dict(lean_memory=True),
    'filtered+lean with FrozenFeatureCacheHook in the steady state (every '
    'entry stored): the frontier of the frozen part is read from the '
    f'store\'s RAM tier ({CachedStep.dtype}, the hook\'s default; the read '
    'is in the forward) and the forward starts there, the frozen part '
    'upstream not run', CachedStep)
