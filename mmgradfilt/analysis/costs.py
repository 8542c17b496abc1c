"""What the planner's plans cost, measured on the machine at hand: per
prefix of candidate layers, a training step all vanilla, a forward with all
of them filtered at each radius and a step with all at their largest."""
import copy
from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from torch import Tensor

from ..benchmark.flops import conv_backward_flops
from ..benchmark.memory import _storage_key, peak_memory_bytes
from ..benchmark.step import TrainStep
from ..hooks import GradientFilterHook
from .plan import Layer, PrefixCosts


class StorageMeter:
    """Each storage autograd saves for backward while in use, once: its size
    and the names of the given modules whose forward saved it (``''`` where
    none of them was running: a functional op). Parameters and buffers of
    ``model`` are not activations and are left out, as
    :class:`~mmgradfilt.benchmark.SavedTensorMeter` does, whose total this
    is.

    Args:
        model (nn.Module): Model whose parameters and buffers to leave out.
        modules (dict[str, nn.Module]): Modules that do not nest (leaves),
            by name.
    """

    def __init__(self, model: nn.Module, modules: Dict[str, nn.Module]):
        self._exclude = {_storage_key(t) for t in
                         [*model.parameters(), *model.buffers()]}
        self._modules = modules
        self._current: List[str] = []
        self.savers: Dict[tuple, Tuple[int, Set[str]]] = {}

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for nbytes, _ in self.savers.values())

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in self._exclude:
            entry = self.savers.setdefault(
                key, (t.untyped_storage().nbytes(), set()))
            entry[1].add(self._current[-1] if self._current else '')
        return t

    def _leave(self, module: nn.Module, args: tuple, output) -> None:
        self._current.pop()  # returns None: a hook's result replaces output

    def __enter__(self) -> 'StorageMeter':
        self._handles = []
        for name, module in self._modules.items():
            self._handles += [
                module.register_forward_pre_hook(
                    lambda m, a, name=name: self._current.append(name)),
                module.register_forward_hook(self._leave)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def _leaves(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if not list(m.children())}


def _measure(model: nn.Module, hook: GradientFilterHook,
             optim_cfg: ConfigDict, batch: Dict, device: torch.device,
             whole_step: bool
             ) -> Tuple[nn.Module, StorageMeter, Dict[str, tuple], int]:
    """A copy of ``model`` with ``hook`` applied (as training would), every
    storage its forward saves, per conv ``(output shape, input needs a
    gradient, output needs one)`` and, with ``whole_step``, the peak of
    that forward with its backward and optimizer step (else 0)."""
    model = copy.deepcopy(model)
    hook.apply(model)
    step = TrainStep(model.to(device).train(), optim_cfg, batch)
    convs: Dict[str, tuple] = {}

    def record(name: str, args: tuple, out: Tensor) -> None:
        convs.setdefault(name, (tuple(out.shape), args[0].requires_grad,
                                out.requires_grad))

    handles = [m.register_forward_hook(
        lambda m, args, out, n=n: record(n, args, out))
        for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    meter = StorageMeter(model, _leaves(model))

    def run() -> None:
        with meter:
            step.forward()
        if whole_step:
            step.backward()
            step.optimizer()

    peak = peak_memory_bytes(run, device) if whole_step else (run() or 0)
    for handle in handles:
        handle.remove()
    return model, meter, convs, peak


def measure_prefix(model: nn.Module, hook: GradientFilterHook,
                   layers: Sequence[Layer], trained: int,
                   optim_cfg: ConfigDict, batch: Dict,
                   device: torch.device) -> PrefixCosts:
    """Costs of training the first ``trained`` of ``layers``.

    ``model`` (its weights are irrelevant) is copied and ``hook`` (the
    plan's freezing, the config's lean settings) applied to each copy, as
    training would: once all vanilla, then once with all of them filtered at
    each radius that some of them take. Each forward counts what every
    storage costs and which modules saved it; the peaks of the vanilla step
    and of the step with every one filtered at its largest radius are
    measured (first steps: the optimizer's state, small next to the
    activations, is made in them).
    """
    units = {}  # module -> the trained conv it belongs to
    for layer in layers[:trained]:
        units.update({path: layer.path for path in layer.params})
    vanilla, meter, convs, peak = _measure(model, hook, optim_cfg, batch,
                                           device, True)
    flops = {}
    for name, (shape, input_grad, output_grad) in convs.items():
        if output_grad:  # the gradient reaches it: its backward runs
            conv = vanilla.get_submodule(name)
            flops[name] = conv_backward_flops(
                conv, shape, None, need_input=input_grad,
                need_weight=conv.weight.requires_grad)
    costs = PrefixCosts(trained, meter.total_bytes, peak,
                        sum(flops.values()))
    for nbytes, savers in meter.savers.values():
        if savers <= set(units):
            costs.storages.append(
                (nbytes, None, frozenset(units[s] for s in savers)))
        else:  # something outside the trained layers keeps it
            costs.fixed_bytes += nbytes
    for layer in layers[:trained]:
        shape, input_grad, _ = convs[layer.path]
        conv = vanilla.get_submodule(layer.path)
        costs.layer_flops[layer.path] = {None: flops[layer.path], **{
            r: conv_backward_flops(conv, shape, r, need_input=input_grad)
            for r in layer.radii}}

    radii = sorted({r for layer in layers[:trained] for r in layer.radii})
    for radius in radii:
        filtered = {layer.path for layer in layers[:trained]
                    if radius in layer.radii}
        filtered_hook = copy.copy(hook)
        filtered_hook.filter_install = [dict(path=p, radius=radius)
                                        for p in sorted(filtered)]
        _, meter, _, _ = _measure(model, filtered_hook, optim_cfg, batch,
                                  device, False)
        for nbytes, savers in meter.savers.values():
            # a storage of filtered layers alone; any other is counted
            # from the vanilla forward already
            if savers <= set(units) and {units[s] for s in savers} <= filtered:
                costs.storages.append(
                    (nbytes, radius, frozenset(units[s] for s in savers)))
    largest = [dict(path=layer.path, radius=layer.radii[-1])
               for layer in layers[:trained] if layer.radii]
    if largest:
        filtered_hook = copy.copy(hook)
        filtered_hook.filter_install = largest
        _, meter, _, costs.filtered_peak_bytes = _measure(
            model, filtered_hook, optim_cfg, batch, device, True)
        costs.filtered_saved_bytes = meter.total_bytes
    return costs
