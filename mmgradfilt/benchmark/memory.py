"""Memory measurements of a training step: saved activations, by module and
by kind of module, and the peak, with the phase of the step it falls in."""
import functools
import gc
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.module import (register_module_forward_hook,
                                     register_module_forward_pre_hook)
from torch.profiler import ProfilerActivity, profile, record_function

# what saved a tensor: the innermost module whose forward was running
KINDS = ('conv', 'norm', 'activation', 'loss', 'other')
# the parts of a step, in order, that the peak is attributed to
STEP_PHASES = ('frozen forward', 'trained forward', 'loss', 'backward',
               'optimizer')
# the heads' methods that compute the loss from the head's output: MMSeg's
# decode heads and MMPretrain's classification heads (whose ``loss`` also
# runs the classifier's forward)
LOSS_METHODS = ('loss_by_feat', '_get_loss')
# modules of these packages are activations (ReLU and its lean twins, which
# subclass it, GELU, Sigmoid, MMCV's HSwish, ...)
ACTIVATION_PACKAGES = (
    'torch.nn.modules.activation', 'mmcv.cnn.bricks.activation',
    'mmcv.cnn.bricks.hsigmoid', 'mmcv.cnn.bricks.hswish',
    'mmcv.cnn.bricks.swish')
LOSS = 'loss'  # the scope of a loss method on the stack of running modules


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def module_kind(module: nn.Module) -> str:
    """``'conv'``, ``'norm'``, ``'activation'`` or ``'other'``."""
    if isinstance(module, _ConvNd):
        return 'conv'
    if isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
        return 'norm'
    if not isinstance(module, nn.MultiheadAttention) and any(
            cls.__module__ in ACTIVATION_PACKAGES
            for cls in type(module).__mro__):
        return 'activation'
    return 'other'


class ModuleScopes:
    """Context manager that calls :meth:`enter` and :meth:`leave` around
    every module forward that runs and every call of a loss method
    (:data:`LOSS_METHODS`) of ``model``'s modules (with :data:`LOSS`).

    Module forwards are followed with torch's global module hooks, so no
    module of the model gets hooks of its own; the loss methods are wrapped
    on the instances and given back on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def enter(self, scope) -> None:
        """A module's forward or a loss (:data:`LOSS`) starts."""

    def leave(self, scope) -> None:
        """A module's forward or a loss ends."""

    def _loss(self, method: Callable) -> Callable:

        @functools.wraps(method)
        def loss(*args, **kwargs):
            self.enter(LOSS)
            try:
                return method(*args, **kwargs)
            finally:
                self.leave(LOSS)

        return loss

    def __enter__(self):
        self._handles = [
            register_module_forward_pre_hook(lambda m, a: self.enter(m)),
            register_module_forward_hook(lambda m, a, o: self.leave(m))]
        self._wrapped: List[Tuple[nn.Module, str, Optional[Callable]]] = []
        for module in self.model.modules():
            name = next((n for n in LOSS_METHODS
                         if callable(getattr(module, n, None))), None)
            if name is not None:
                # an instance attribute (the lean loss) is put back as it was
                self._wrapped.append((module, name, vars(module).get(name)))
                setattr(module, name, self._loss(getattr(module, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name, own in self._wrapped:
            if own is None:
                delattr(module, name)
            else:
                setattr(module, name, own)


class SavedTensorMeter(ModuleScopes):
    """Bytes that autograd saves for backward, in total, per module, by
    kind of module and by storage.

    Each storage counts once in the total (views and tensors saved by several
    ops share it) and once in each given module that saved it, so a conv's
    input that the ReLU before it also saves counts for both modules. By
    kind (:data:`KINDS`), each storage counts once, for the innermost module
    whose forward was running when it was first saved: a conv, a norm, an
    activation, else the loss when a loss method (:data:`LOSS_METHODS`) was
    running, else other; so the kinds add up to the total. By storage
    (:attr:`savers`), each one's size and the names of the innermost given
    modules running whenever it was saved (``''`` where none was: a
    functional op); given the model's leaves, these say which layers keep
    it. Parameters and buffers of the model are not activations and are
    left out. Use as a context manager around the forward pass.

    Args:
        model (nn.Module): Model whose parameters and buffers to leave out.
        modules (dict[str, nn.Module], optional): Modules to measure one by
            one, by name. Defaults to None.
    """

    def __init__(self, model: nn.Module,
                 modules: Optional[Dict[str, nn.Module]] = None) -> None:
        super().__init__(model)
        self._exclude = {_storage_key(t) for t in
                         [*model.parameters(), *model.buffers()]}
        self._modules = modules or {}
        self._names = {id(m): n for n, m in self._modules.items()}
        self._seen: Dict[Optional[str], set] = {None: set()}
        self._seen.update({n: set() for n in self._modules})
        self._current: List[str] = []  # the given modules now running
        self._kinds: List[str] = []  # kind of each running scope
        self.total_bytes = 0
        self.module_bytes: Dict[str, int] = {n: 0 for n in self._modules}
        self.kind_bytes: Dict[str, int] = {k: 0 for k in KINDS}
        # storage -> (bytes, names of the given modules that saved it)
        self.savers: Dict[tuple, Tuple[int, Set[str]]] = {}

    def enter(self, scope) -> None:
        if scope is LOSS:
            kind = LOSS
        else:
            kind = module_kind(scope)
            # a module of no kind of its own inside a loss (the loss
            # module, a resize) is part of the loss
            if kind == 'other' and LOSS in self._kinds:
                kind = LOSS
            if id(scope) in self._names:
                self._current.append(self._names[id(scope)])
        self._kinds.append(kind)

    def leave(self, scope) -> None:
        self._kinds.pop()
        if scope is not LOSS and id(scope) in self._names:
            self._current.remove(self._names[id(scope)])

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key in self._exclude:
            return t
        nbytes = t.untyped_storage().nbytes()
        self.savers.setdefault(key, (nbytes, set()))[1].add(
            self._current[-1] if self._current else '')
        if key not in self._seen[None]:
            self._seen[None].add(key)
            self.total_bytes += nbytes
            self.kind_bytes[self._kinds[-1] if self._kinds else 'other'] += \
                nbytes
        for name in self._current:
            if key not in self._seen[name]:
                self._seen[name].add(key)
                self.module_bytes[name] += nbytes
        return t

    def __enter__(self) -> 'SavedTensorMeter':
        super().__enter__()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        super().__exit__(*exc)


MARK = 'mmgradfilt.phase.'  # prefix of the profiler's phase markers


def mark_phase(phase: str) -> None:
    """Put a marker in the profiler's timeline: ``phase`` starts now."""
    with record_function(MARK + phase):
        pass


class PhaseMarks(ModuleScopes):
    """Context manager that marks where a forward pass's phases start:
    the trained forward when the first module holding a trained parameter
    starts, the loss while a loss method runs (then back to the forward).
    Before that, the step is in the frozen forward (no gradient recorded).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._phases = ['frozen forward']

    def enter(self, scope) -> None:
        if scope is LOSS:
            self._phases.append('loss')
            mark_phase('loss')
        elif self._phases == ['frozen forward'] and any(
                p.requires_grad for p in scope.parameters(recurse=False)):
            self._phases = ['trained forward']
            mark_phase('trained forward')

    def leave(self, scope) -> None:
        if scope is LOSS:
            self._phases.pop()
            mark_phase(self._phases[-1])


def _memory_timeline(fn: Callable[[], object], device: torch.device,
                     phases: Sequence[str]) -> Dict[str, int]:
    """Peak of the running sum of the allocator's allocations and frees on
    ``device`` (``torch.profiler``'s memory events) while ``fn`` runs, in
    each phase that :func:`mark_phase` marked (the first phase until the
    first mark), above what was live before."""
    # garbage the collector would free while the profiler runs is memory
    # allocated before it: torch warns of each such block on stderr (through
    # any progress bar) and the peak would depend on when the collector ran
    gc.collect()
    activities = [ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    kind = getattr(torch.autograd.DeviceType, device.type.upper())
    events = [e for e in prof.profiler.kineto_results.events()
              if (e.name() == '[memory]' and e.device_type() == kind)
              or e.name().startswith(MARK)]
    phase, live = phases[0], 0
    peaks = {p: None for p in phases}
    peaks[phase] = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.name() != '[memory]':
            phase = event.name()[len(MARK):]
            peaks[phase] = max(peaks[phase] or 0, live)
            continue
        live += event.nbytes()
        peaks[phase] = max(peaks[phase], live)
    return peaks


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was live before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the CPU
    allocator's allocations and frees that ``torch.profiler`` records
    (``profile_memory=True``), which counts the same tensors.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _memory_timeline(fn, device, ['step'])['step']


def step_peaks(model: nn.Module, phases: Sequence[Tuple[str, Callable]],
               device: torch.device) -> Tuple[int, Dict[str, Optional[int]]]:
    """The peak of a step given as ``(phase, fn)`` pairs run in turn, and
    the peak in each phase of :data:`STEP_PHASES` (None for one that did not
    happen), bytes above what was live before.

    The forward's ``fn`` (phase ``'forward'``) is split into its frozen
    part, trained part and loss (:class:`PhaseMarks` on ``model``). The
    phases' peaks come from the profiler's memory events; the step's peak
    too on CPU, ``torch.cuda.max_memory_allocated`` of the same run on CUDA.
    """

    def run() -> None:
        for phase, fn in phases:
            if phase == 'forward':
                with PhaseMarks(model):
                    fn()
            else:
                mark_phase(phase)
                fn()

    if device.type != 'cuda':
        peaks = _memory_timeline(run, device, STEP_PHASES)
        return max(p for p in peaks.values() if p is not None), peaks
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    peaks = _memory_timeline(run, device, STEP_PHASES)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, peaks


def peak_phase(peaks: Dict[str, Optional[int]]) -> str:
    """The phase that holds the step's peak (the first of equal ones)."""
    return max(STEP_PHASES, key=lambda p: -1 if peaks[p] is None else peaks[p])
