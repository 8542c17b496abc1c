"""What the planner's plans cost, measured on the machine at hand: per
prefix of candidate layers, a training step all vanilla, a forward with all
of them filtered at each radius and a step with all at their largest."""
from typing import Dict, Sequence

import torch
import torch.nn as nn
from mmengine.config import ConfigDict

from ..benchmark.step import StepMeasure, measure_step, prepare_step
from ..surgery import GradientFilterRecipe
from .plan import Layer, PrefixCosts


def _by_leaves(model: nn.Module, recipe: GradientFilterRecipe,
             optim_cfg: ConfigDict, batch: Dict, device: torch.device,
             whole_step: bool) -> StepMeasure:
    """:func:`~mmgradfilt.benchmark.step.measure_step` of a copy of ``model``
    with ``recipe`` applied, each saved storage with the leaf modules that
    saved it; with ``whole_step``, the peak of that first step (forward,
    backward, optimizer), else its forward alone."""
    step = prepare_step(model, recipe, optim_cfg, batch, device)
    leaves = [name for name, m in step.model.named_modules()
              if not list(m.children())]
    return measure_step(step, device, leaves,
                        peak='this' if whole_step else None)


def measure_prefix(model: nn.Module, recipe: GradientFilterRecipe,
                   layers: Sequence[Layer], trained: int,
                   optim_cfg: ConfigDict, batch: Dict,
                   device: torch.device) -> PrefixCosts:
    """Costs of training the first ``trained`` of ``layers``.

    ``model`` (its weights are irrelevant) is copied and ``recipe`` (the
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
    vanilla = _by_leaves(model, recipe, optim_cfg, batch, device, True)
    flops = {name: call.backward_flops()
             for name, call in vanilla.convs.items()
             if call.output_grad}  # the gradient reaches it: its backward runs
    costs = PrefixCosts(trained, vanilla.saved_bytes, vanilla.peak_bytes,
                        sum(flops.values()))
    for nbytes, savers in vanilla.storages:
        if savers <= set(units):
            costs.storages.append(
                (nbytes, None, frozenset(units[s] for s in savers)))
        else:  # something outside the trained layers keeps it
            costs.fixed_bytes += nbytes
    for layer in layers[:trained]:
        call = vanilla.convs[layer.path]
        costs.layer_flops[layer.path] = {None: flops[layer.path], **{
            r: call.backward_flops(r) for r in layer.radii}}

    radii = sorted({r for layer in layers[:trained] for r in layer.radii})
    for radius in radii:
        filtered = {layer.path for layer in layers[:trained]
                    if radius in layer.radii}
        measured = _by_leaves(model, recipe.replace(filter_install=[
            dict(path=p, radius=radius) for p in sorted(filtered)]),
            optim_cfg, batch, device, False)
        for nbytes, savers in measured.storages:
            # a storage of filtered layers alone; any other is counted
            # from the vanilla forward already
            if savers <= set(units) and {units[s] for s in savers} <= filtered:
                costs.storages.append(
                    (nbytes, radius, frozenset(units[s] for s in savers)))
    largest = [dict(path=layer.path, radius=layer.radii[-1])
               for layer in layers[:trained] if layer.radii]
    if largest:
        measured = _by_leaves(model, recipe.replace(filter_install=largest),
                            optim_cfg, batch, device, True)
        costs.filtered_peak_bytes = measured.peak_bytes
        costs.filtered_saved_bytes = measured.saved_bytes
    return costs
