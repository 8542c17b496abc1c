"""Whole training step of a config's model: vanilla, gradient-filtered and
filtered with the lean step (:class:`Variant`)."""
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope

from ..hooks import GradientFilterHook
from ..layers import GradFilterConv2d
from ..surgery import freeze_layers
from .flops import conv_backward_flops
from .memory import SavedTensorMeter, peak_phase, step_peaks
from .timing import cuda_kernel_seconds, summarize, timed

PHASES = ('forward', 'backward', 'optimizer')


def gradient_filter_hook_cfg(cfg: Config) -> Dict:
    """The arguments of the config's ``GradientFilterHook``; an error if it
    has none."""
    hooks = [h for h in cfg.get('custom_hooks', [])
             if h.get('type') in ('GradientFilterHook', GradientFilterHook)]
    if len(hooks) != 1:
        raise ValueError(f'{cfg.filename} must have exactly one '
                         f'GradientFilterHook in custom_hooks, found {len(hooks)}')
    return {k: v for k, v in hooks[0].items() if k not in ('type', 'priority')}


def gradient_filter_hook(cfg: Config) -> GradientFilterHook:
    """The config's ``GradientFilterHook``, built; an error if it has none."""
    return GradientFilterHook(**gradient_filter_hook_cfg(cfg))


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


def build_model(cfg: Config, model_cfg: Optional[ConfigDict] = None
                ) -> nn.Module:
    """The config's model (or ``model_cfg``, a variant of it) as built in the
    config's scope, SyncBN reverted to BN, weights not initialised."""
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = copy.deepcopy(model_cfg or cfg.model)
    model_cfg.pop('pretrained', None)
    return revert_sync_batchnorm(MODELS.build(model_cfg))


@dataclass(frozen=True)
class Variant:
    """One model the benchmark measures: the config's model with its
    freezing and, unless ``hook`` is None, its ``GradientFilterHook`` with
    the arguments in ``hook`` changed."""
    key: str  # its name in the JSON and the CSV
    label: str  # its name in the printed tables
    hook: Optional[Dict] = None
    description: str = ''


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
                   variants: Sequence[Variant] = VARIANTS
                   ) -> Tuple[Dict[str, nn.Module], List[str], Dict[str, Dict]]:
    """The model of each variant, by key; the filtered conv paths; and the
    lean settings (``lean_memory``, ``filter_norm``) each variant's hook ran
    with, by key (none for vanilla).

    All start from one build of the config's model, so they share the same
    random weights (no checkpoint is loaded: timing and memory do not
    depend on them). A data preprocessor that pads to a fixed size pads to
    ``size`` instead.
    """
    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.get('data_preprocessor', {}).get('size') is not None:
        model_cfg.data_preprocessor.size = size
    built = build_model(cfg, model_cfg)
    hook_cfg = gradient_filter_hook_cfg(cfg)
    models, paths, settings = {}, [], {}
    for variant in variants:
        model = copy.deepcopy(built)
        if variant.hook is None:
            hook = GradientFilterHook(**hook_cfg)
            freeze_layers(model, hook.freeze_layers, hook.norm_eval)
        else:
            hook = GradientFilterHook(**{**hook_cfg, **variant.hook})
            hook.apply(model)
            settings[variant.key] = dict(lean_memory=hook.lean_memory,
                                         filter_norm=hook.filter_norm)
            paths = paths or [n for n, m in model.named_modules()
                              if isinstance(m, GradFilterConv2d)]
        models[variant.key] = model.to(device).train()
    return models, paths, settings


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


def measure_step(step: TrainStep, paths: List[str], device: torch.device,
                 iters: int) -> Dict:
    """Saved activations (in total, by kind of module and per layer of
    ``paths``), backward FLOPs of those layers, and the step's peak memory
    with the peak of each phase and the phase that holds it."""
    result = {}
    layers = {p: step.model.get_submodule(p) for p in paths}
    seen = {}  # path -> (output shape, whether the input needs a gradient)
    handles = [m.register_forward_hook(
        lambda m, args, out, p=p: seen.__setitem__(
            p, (tuple(out.shape), args[0].requires_grad)))
        for p, m in layers.items()]
    with SavedTensorMeter(step.model, layers) as meter:
        step.forward()
    for handle in handles:
        handle.remove()
    step.backward()
    step.optimizer()
    result['saved_bytes'] = meter.total_bytes
    result['saved_by_kind'] = dict(meter.kind_bytes)
    result['layers'] = {
        p: dict(saved_bytes=meter.module_bytes[p],
                backward_flops=conv_backward_flops(
                    m, seen[p][0], getattr(m, 'radius', None),
                    need_input=seen[p][1], need_weight=m.weight.requires_grad))
        for p, m in layers.items()
    }
    result['peak_bytes'], result['phase_peak_bytes'] = step_peaks(
        step.model, [(p, getattr(step, p)) for p in PHASES], device)
    result['peak_phase'] = peak_phase(result['phase_peak_bytes'])
    if device.type == 'cuda':
        result['step_kernel_ms'] = 1e3 * cuda_kernel_seconds(step.run, iters)
    return result
