"""Whole training step of a config's model: prepared (a copy of the model
with a recipe applied, :func:`prepare_step`; the benchmark's
:class:`Variant` s) and measured (:func:`measure_step`)."""
import copy
import functools
from dataclasses import dataclass
from typing import (Callable, Dict, FrozenSet, List, Optional, Sequence,
                    Tuple, Type, Union)

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from torch import Tensor

from ..hooks import recipe_from_config
from ..layers import GradFilterConv2d
from ..ops.types import IntPair
from ..surgery import GradientFilterRecipe
from .flops import conv_backward_flops
from .memory import (SavedTensorMeter, peak_memory_bytes, peak_phase,
                     step_peaks)
from .timing import cuda_kernel_seconds, summarize, timed

PHASES = ('forward', 'backward', 'optimizer')


# transforms that give every training image one size: the argument holding it
# and its order; mmcv's Resize takes (w, h), and gives one size only without
# keep_ratio
SIZE_TRANSFORMS = {
    'RandomCrop': ('crop_size', 'hw'),
    'RandomResizedCrop': ('scale', 'hw'),
    'Resize': ('scale', 'wh'),
}


def _size_pair(value: Union[int, Sequence[int], None], order: str = 'hw'
               ) -> Optional[Tuple[int, int]]:
    """``(h, w)`` of an int or a pair in ``order``; None for anything else."""
    if isinstance(value, int):
        return value, value
    if (isinstance(value, Sequence) and len(value) == 2 and
            all(isinstance(v, int) for v in value)):
        return tuple(value) if order == 'hw' else (value[1], value[0])
    return None


def _train_pipeline(dataset: Optional[Dict]) -> List[Dict]:
    """The pipeline of a dataset config, looking inside dataset wrappers."""
    while isinstance(dataset, dict) and 'pipeline' not in dataset:
        dataset = (dataset.get('dataset') or
                   (dataset.get('datasets') or [None])[0])
    return list(dataset.get('pipeline', [])) if isinstance(dataset, dict) else []


def train_input_size(cfg: Config) -> Optional[Tuple[Tuple[int, int], str]]:
    """The image size ``(h, w)`` the config trains on and where it says so.

    The last transform of the training pipeline that gives every image one
    size (a random crop, a fixed resize), else the config's ``crop_size``,
    else the size its data preprocessor pads to; None if it says none.
    """
    pipeline = _train_pipeline(cfg.get('train_dataloader', {}).get('dataset'))
    for transform in reversed(pipeline):
        name = str(transform.get('type', '')).split('.')[-1]
        if name not in SIZE_TRANSFORMS or transform.get('keep_ratio'):
            continue
        key, order = SIZE_TRANSFORMS[name]
        size = _size_pair(transform.get(key), order)
        if size is not None:
            return size, f'train pipeline {name} {key}'
    for where, value in (
            ('crop_size', cfg.get('crop_size')),
            ('model.data_preprocessor.size',
             cfg.get('model', {}).get('data_preprocessor', {}).get('size'))):
        size = _size_pair(value)
        if size is not None:
            return size, where
    return None


def step_size(cfg: Config, input_size: Optional[Sequence[int]] = None,
              batch_size: Optional[int] = None
              ) -> Tuple[Tuple[int, int], int, str]:
    """Input size ``(h, w)`` and batch size of a measured step: the given
    ones, else the config's (:func:`train_input_size`,
    ``train_dataloader.batch_size``); and where they came from, to print.

    Raises:
        ValueError: Where neither is given, naming the option to give.
    """
    if input_size:
        size, size_from = tuple(input_size), '--input-size'
    else:
        found = train_input_size(cfg)
        if found is None:
            raise ValueError(
                f'{cfg.filename} names no training size (no RandomCrop, '
                'RandomResizedCrop or fixed Resize in its train pipeline, no '
                'crop_size, no data_preprocessor size): give --input-size H W')
        size, size_from = found[0], f'config: {found[1]}'
    if batch_size:
        batch, batch_from = batch_size, '--batch-size'
    else:
        batch = cfg.get('train_dataloader', {}).get('batch_size')
        if batch is None:
            raise ValueError(f'{cfg.filename} has no '
                             'train_dataloader.batch_size: give --batch-size N')
        batch_from = 'config: train_dataloader.batch_size'
    return size, batch, (f'{size[0]}x{size[1]} ({size_from}), batch {batch} '
                         f'({batch_from})')


def build_model(cfg: Config, model_cfg: Optional[ConfigDict] = None
                ) -> nn.Module:
    """The config's model (or ``model_cfg``, a variant of it) as built in the
    config's scope, SyncBN reverted to BN, weights not initialised."""
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = copy.deepcopy(model_cfg or cfg.model)
    model_cfg.pop('pretrained', None)
    return revert_sync_batchnorm(MODELS.build(model_cfg))


def synthetic_batch(cfg: Config, batch_size: int, size: Tuple[int, int]) -> Dict:
    """Random images and labels in the data format of the config's codebase."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)
              for _ in range(batch_size)]
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        classes = cfg.model.decode_head.num_classes
        samples = [SegDataSample(
            gt_sem_seg=PixelData(data=torch.randint(
                0, classes, (1, *size), generator=gen)),
            metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size))
            for _ in range(batch_size)]
    elif scope == 'mmpretrain':
        from mmpretrain.structures import DataSample
        classes = cfg.model.head.num_classes
        samples = [DataSample(metainfo=dict(img_shape=size)).set_gt_label(
            int(torch.randint(0, classes, (1, ), generator=gen)))
            for _ in range(batch_size)]
    else:
        raise ValueError(f'default_scope {scope!r}: only mmseg and mmpretrain '
                         'configs can be benchmarked')
    return dict(inputs=inputs, data_samples=samples)


class TrainStep:
    """One training step split into forward, backward and optimizer phases."""

    def __init__(self, model: nn.Module, optim_cfg: ConfigDict, batch: Dict):
        self.model = model
        self.optim_wrapper = build_optim_wrapper(model, copy.deepcopy(optim_cfg))
        self.data = model.data_preprocessor(batch, training=True)
        self.loss = None

    def forward(self) -> None:
        losses = self.model(**self.data, mode='loss')
        self.loss, _ = self.model.parse_losses(losses)

    def backward(self) -> None:
        self.optim_wrapper.backward(self.loss)
        self.loss = None

    def optimizer(self) -> None:
        self.optim_wrapper.step()
        self.optim_wrapper.zero_grad()

    def run(self) -> None:
        for phase in PHASES:
            getattr(self, phase)()


def prepare_step(model: nn.Module, recipe: GradientFilterRecipe,
                 optim_cfg: ConfigDict, batch: Dict, device: torch.device,
                 step_type: Type[TrainStep] = TrainStep) -> TrainStep:
    """A training step of a copy of ``model`` with ``recipe`` applied, as
    training would apply it, on ``device`` in training mode."""
    model = copy.deepcopy(model)
    recipe.apply(model)
    return step_type(model.to(device).train(), optim_cfg, batch)


@dataclass(frozen=True)
class Variant:
    """One model the benchmark measures: the config's model with its
    ``GradientFilterHook``'s recipe with the arguments in ``hook`` changed
    (None: its freezing alone, PyTorch's backward), trained by ``step``.

    A new variant is one more of these: a recipe change, and the step that
    trains it where it is not a plain :class:`TrainStep`.
    """
    key: str  # its name in the JSON and the CSV
    label: str  # its name in the printed tables
    hook: Optional[Dict] = None
    description: str = ''
    step: Type[TrainStep] = TrainStep

    def recipe(self, recipe: GradientFilterRecipe) -> GradientFilterRecipe:
        """The config's ``recipe`` as this variant changes it."""
        if self.hook is None:
            return recipe.replace(filter_install=(), lean_memory=False,
                                  filter_norm=False)
        return recipe.replace(**self.hook)

    def prepare(self, model: nn.Module, recipe: GradientFilterRecipe,
                optim_cfg: ConfigDict, batch: Dict,
                device: torch.device) -> TrainStep:
        """The step of a copy of ``model`` trained as this variant of the
        config's ``recipe`` trains it (:func:`prepare_step`)."""
        return prepare_step(model, self.recipe(recipe), optim_cfg, batch,
                            device, self.step)

    def to_dict(self) -> Dict:
        """What the benchmark's JSON says of it."""
        return dict(key=self.key, label=self.label, hook=self.hook,
                    description=self.description)


VANILLA = Variant('vanilla', 'vanilla', None,
                  'the config\'s model with the config\'s freezing and no '
                  'gradient filter (PyTorch\'s backward)')
FILTERED = Variant('filtered', 'filtered',
                   dict(lean_memory=False, filter_norm=False),
                   'the same model with the config\'s GradientFilterHook '
                   'applied (the filtered layers below), without the lean step')
LEAN = Variant('lean', 'filtered+lean', dict(lean_memory=True),
               'the config\'s GradientFilterHook as configured, lean by '
               'default: 1-bit activation masks, the banded segmentation '
               'loss, patch-statistics BatchNorms where filter_norm')
LEAN_NORM = Variant('lean_norm', 'filtered+lean+norm',
                    dict(lean_memory=True, filter_norm=True),
                    'filtered+lean with patch-statistics BatchNorms after the '
                    'filtered convs')
VARIANTS = (VANILLA, FILTERED, LEAN)


def build_variants(cfg: Config, device: torch.device, size: Tuple[int, int],
                   batch: Dict, variants: Sequence[Variant] = VARIANTS
                   ) -> Tuple[Dict[str, TrainStep], List[str], Dict[str, Dict]]:
    """The step of each variant on ``batch``, by key; the filtered conv
    paths; and the lean settings (``lean_memory``, ``filter_norm``) each
    variant's recipe has, by key (none for vanilla).

    All start from one build of the config's model, so they share the same
    random weights (no checkpoint is loaded: timing and memory do not
    depend on them). A data preprocessor that pads to a fixed size pads to
    ``size`` instead.
    """
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.get('data_preprocessor', {}).get('size') is not None:
        model_cfg.data_preprocessor.size = size
    built = build_model(cfg, model_cfg)
    recipe = recipe_from_config(cfg)
    steps, paths, settings = {}, [], {}
    for variant in variants:
        step = variant.prepare(built, recipe, cfg.optim_wrapper, batch,
                               device)
        if variant.hook is not None:
            changed = variant.recipe(recipe)
            settings[variant.key] = dict(lean_memory=changed.lean_memory,
                                         filter_norm=changed.filter_norm)
            paths = paths or [n for n, m in step.model.named_modules()
                              if isinstance(m, GradFilterConv2d)]
        steps[variant.key] = step
    return steps, paths, settings


def time_steps(steps: Dict[str, TrainStep], device: torch.device, iters: int,
               warmup: int, progress: Callable[[], None]) -> Dict[str, Dict]:
    """Phase timings of each model's step (medians, quartiles).

    The models take turns, step by step, so that a slow spell of a shared
    machine hits all of them alike.
    """
    samples = {key: {phase: [] for phase in PHASES} for key in steps}
    for i in range(warmup + iters):
        for key, step in steps.items():
            for phase in PHASES:
                seconds = timed(getattr(step, phase), device)
                if i >= warmup:
                    samples[key][phase].append(seconds)
            progress()
    results = {}
    for key, phases in samples.items():
        totals = [sum(t) for t in zip(*phases.values())]
        results[key] = {phase: summarize(s) for phase, s in phases.items()}
        results[key]['step'] = summarize(totals)
    return results


@dataclass(frozen=True)
class ConvCall:
    """A conv's first call in a measured forward."""
    conv: nn.Conv2d
    out_shape: Tuple[int, ...]
    input_grad: bool  # whether its input needs a gradient
    output_grad: bool  # whether its output needs one: its backward runs

    def backward_flops(self, radius: Optional[IntPair] = None) -> int:
        """Its backward's FLOPs, exact (``radius`` None) or filtered."""
        return conv_backward_flops(
            self.conv, self.out_shape, radius, need_input=self.input_grad,
            need_weight=self.conv.weight.requires_grad)


@dataclass
class StepMeasure:
    """What :func:`measure_step` measured of one training step.

    Args:
        saved_bytes (int): Bytes autograd saved for backward in the forward,
            each storage once.
        saved_by_kind (dict[str, int]): The same by kind of module
            (:data:`~.memory.KINDS`); they add up to ``saved_bytes``.
        module_bytes (dict[str, int]): Saved by each given module.
        storages (list): ``(bytes, names)`` of every saved storage: the given
            modules that saved it (``''``: none of them).
        convs (dict[str, ConvCall]): Every conv that ran, by path.
        peak_bytes (int, optional): The step's peak above what was live
            before it.
        phase_peak_bytes (dict, optional): The peak in each phase of
            :data:`~.memory.STEP_PHASES` (None for one that did not happen).
        step_kernel_ms (float, optional): CUDA kernel time of a step.
    """
    saved_bytes: int
    saved_by_kind: Dict[str, int]
    module_bytes: Dict[str, int]
    storages: List[Tuple[int, FrozenSet[str]]]
    convs: Dict[str, ConvCall]
    peak_bytes: Optional[int] = None
    phase_peak_bytes: Optional[Dict[str, Optional[int]]] = None
    step_kernel_ms: Optional[float] = None

    def to_dict(self, paths: Sequence[str]) -> Dict:
        """The benchmark's figures, per layer for the convs of ``paths``."""
        result = dict(
            saved_bytes=self.saved_bytes,
            saved_by_kind=dict(self.saved_by_kind),
            layers={p: dict(saved_bytes=self.module_bytes[p],
                            backward_flops=self.convs[p].backward_flops(
                                getattr(self.convs[p].conv, 'radius', None)))
                    for p in paths},
            peak_bytes=self.peak_bytes,
            phase_peak_bytes=self.phase_peak_bytes,
            peak_phase=self.phase_peak_bytes and peak_phase(
                self.phase_peak_bytes))
        if self.step_kernel_ms is not None:
            result['step_kernel_ms'] = self.step_kernel_ms
        return result


# what measure_step's ``peak`` may be
PEAKS = ('next', 'this', None)


def measure_step(step: TrainStep, device: torch.device,
                 modules: Sequence[str] = (), peak: Optional[str] = 'next',
                 iters: int = 0) -> StepMeasure:
    """Measure one training step of ``step``'s model: what its forward saves
    for backward (:class:`~.memory.SavedTensorMeter`), every conv's call,
    and its peak memory.

    Args:
        step (TrainStep): The prepared step (:func:`prepare_step`); the
            measure runs it.
        device (torch.device): Where it runs.
        modules (Sequence[str]): Modules whose saved bytes to count one by
            one, by path. Defaults to ().
        peak (str, optional): ``'next'``: the measured step runs whole, then
            the peak of the next one, by phase (:func:`~.memory.step_peaks`),
            as every step of a training run after the first (the optimizer's
            state exists); ``'this'``: the peak of the measured step itself,
            forward, backward and optimizer (a first step also makes the
            optimizer's state); None: the forward alone, no peak. Defaults to
            ``'next'``.
        iters (int): With ``'next'`` on CUDA, the steps that the kernel time
            is the mean of; 0: none. Defaults to 0.
    """
    if peak not in PEAKS:
        raise ValueError(f'peak must be one of {PEAKS}, got {peak!r}')
    model = step.model
    convs: Dict[str, ConvCall] = {}

    def record(path: str, conv: nn.Conv2d, args: tuple, out: Tensor) -> None:
        if path not in convs:
            convs[path] = ConvCall(conv, tuple(out.shape),
                                   args[0].requires_grad, out.requires_grad)

    handles = [m.register_forward_hook(functools.partial(record, n))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    meter = SavedTensorMeter(model, {p: model.get_submodule(p)
                                     for p in modules})

    def forward() -> None:
        with meter:
            step.forward()
        for handle in handles:
            handle.remove()

    def whole() -> None:
        forward()
        step.backward()
        step.optimizer()

    peak_bytes = phase_peaks = kernel_ms = None
    if peak is None:
        forward()
    elif peak == 'this':
        peak_bytes = peak_memory_bytes(whole, device)
    else:
        whole()
        peak_bytes, phase_peaks = step_peaks(
            model, [(p, getattr(step, p)) for p in PHASES], device)
        if iters and device.type == 'cuda':
            kernel_ms = 1e3 * cuda_kernel_seconds(step.run, iters)
    return StepMeasure(
        meter.total_bytes, dict(meter.kind_bytes), dict(meter.module_bytes),
        [(nbytes, frozenset(names)) for nbytes, names in
         meter.savers.values()], convs, peak_bytes, phase_peaks, kernel_ms)
