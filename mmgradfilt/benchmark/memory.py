"""Memory measurements of a training step: saved activations and peak."""
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


class SavedTensorMeter:
    """Bytes that autograd saves for backward, in total and per module.

    Each storage counts once in the total (views and tensors saved by several
    ops share it) and once in each module that saved it, so a conv's input
    that the ReLU before it also saves counts for both modules. Parameters
    and buffers of the model are not activations and are left out. Use as a
    context manager around the forward pass.

    Args:
        model (nn.Module): Model whose parameters and buffers to leave out.
        modules (dict[str, nn.Module], optional): Modules to measure one by
            one, by name. Defaults to None.
    """

    def __init__(self, model: nn.Module,
                 modules: Optional[Dict[str, nn.Module]] = None) -> None:
        self._exclude = {_storage_key(t) for t in
                         [*model.parameters(), *model.buffers()]}
        self._modules = modules or {}
        self._seen: Dict[Optional[str], set] = {None: set()}
        self._seen.update({n: set() for n in self._modules})
        self._current: List[str] = []
        self.total_bytes = 0
        self.module_bytes: Dict[str, int] = {n: 0 for n in self._modules}

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key in self._exclude:
            return t
        nbytes = t.untyped_storage().nbytes()
        if key not in self._seen[None]:
            self._seen[None].add(key)
            self.total_bytes += nbytes
        for name in self._current:
            if key not in self._seen[name]:
                self._seen[name].add(key)
                self.module_bytes[name] += nbytes
        return t

    def __enter__(self) -> 'SavedTensorMeter':
        self._handles = []
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: self._current.append(name)))
            self._handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: self._current.remove(name)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


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
    with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
