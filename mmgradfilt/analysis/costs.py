"""What the planner's plans cost, measured on the machine at hand: one
training step per prefix of candidate layers (all vanilla), and each
candidate conv filtered at each radius on its own."""
import copy
from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from torch import Tensor

from ..benchmark.flops import conv_backward_flops
from ..benchmark.memory import (SavedTensorMeter, _storage_key,
                                peak_memory_bytes)
from ..benchmark.step import TrainStep, measure_step
from ..hooks import GradientFilterHook
from ..layers import GradFilterConv2d
from .plan import IntPair, Layer, PrefixCosts


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


def filtered_saved_bytes(conv: nn.Conv2d, in_shape: Sequence[int],
                         radius: IntPair, input_grad: bool) -> int:
    """Bytes ``conv`` filtered at ``radius`` saves for backward on an input
    of ``in_shape`` (needing a gradient or not); its weight must train."""
    layer = GradFilterConv2d.from_conv(conv, radius)
    x = torch.zeros(in_shape, device=conv.weight.device,
                    dtype=conv.weight.dtype, requires_grad=input_grad)
    with torch.enable_grad(), SavedTensorMeter(layer) as meter:
        layer(x)
    return meter.total_bytes


def measure_prefix(model: nn.Module, hook: GradientFilterHook,
                   layers: Sequence[Layer], trained: int,
                   optim_cfg: ConfigDict, batch: Dict,
                   device: torch.device) -> PrefixCosts:
    """Costs of training the first ``trained`` of ``layers``.

    ``model`` (its weights are irrelevant) is copied and ``hook`` (the plan's
    freezing, the config's lean settings) applied to the copy, as training
    would. All vanilla, saved bytes are counted in one forward, by storage
    and by the module that saved each, and the peak of a whole step is
    measured after a first step (optimizer state exists, as in training).
    The same step with every trained conv filtered at its largest radius is
    measured too (saved bytes and peak).
    """
    filtered = [dict(path=layer.path, radius=layer.radii[-1])
                for layer in layers[:trained] if layer.radii]
    filtered_hook = copy.copy(hook)
    filtered_hook.filter_install = filtered
    base, model = model, copy.deepcopy(model)
    hook.apply(model)
    model.to(device).train()
    step = TrainStep(model, optim_cfg, batch)
    convs = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d)}
    # conv -> (output shape, whether its input and output need gradients)
    grads: Dict[str, Tuple[tuple, bool, bool]] = {}

    def record(name: str, args: tuple, out: Tensor) -> None:
        grads.setdefault(name, (tuple(out.shape), args[0].requires_grad,
                                out.requires_grad))

    handles = [m.register_forward_hook(
        lambda m, args, out, n=n: record(n, args, out))
        for n, m in convs.items()]
    with StorageMeter(model, _leaves(model)) as meter:
        step.forward()
    for handle in handles:
        handle.remove()
    step.backward()
    step.optimizer()

    paths = [layer.path for layer in layers[:trained]]
    flops = {}
    for name, (shape, input_grad, output_grad) in grads.items():
        if output_grad:  # the gradient reaches it: its backward runs
            flops[name] = conv_backward_flops(
                convs[name], shape, None, need_input=input_grad,
                need_weight=convs[name].weight.requires_grad)
    costs = PrefixCosts(trained, meter.total_bytes,
                        peak_memory_bytes(step.run, device),
                        sum(flops.values()))
    if filtered:
        model = copy.deepcopy(base)
        filtered_hook.apply(model)
        result = measure_step(TrainStep(model.to(device).train(), optim_cfg,
                                        batch), [], device, iters=1)
        costs.filtered_saved_bytes = result['saved_bytes']
        costs.filtered_peak_bytes = result['peak_bytes']
    for layer in layers[:trained]:
        shape, input_grad, _ = grads[layer.path]
        conv = convs[layer.path]
        costs.layer_flops[layer.path] = {None: flops[layer.path], **{
            r: conv_backward_flops(conv, shape, r, need_input=input_grad)
            for r in layer.radii}}
        costs.filtered_bytes[layer.path] = {
            r: filtered_saved_bytes(conv, layer.in_shape, r, input_grad)
            for r in layer.radii}
    trained_convs = set(paths)
    for nbytes, savers in meter.savers.values():
        if savers and savers <= trained_convs:
            costs.shared.append((nbytes, frozenset(savers)))
    return costs

