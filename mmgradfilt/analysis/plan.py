"""The memory-budget planner: which conv layers to train, and at which
gradient-filter radius, so that a training step fits a device's budget.

Plans train a prefix of the model's convolutions in reverse order of the
forward pass ("the last k conv layers"), each conv with the norm layer its
output feeds, plus the head's classifier; each trained conv runs vanilla
back-propagation or the gradient filter at one radius whose patch fits its
output map. :mod:`.costs` measures what each prefix and each filtered layer
costs; :func:`choose_plan` picks, within every budget and with every filtered
layer's weight-gradient cosine at least ``min_cosine``, the plan that trains
the most conv layers, ties broken by the higher mean cosine (a vanilla layer
counts 1: its gradient is exact).
"""
import copy
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import (Callable, Dict, FrozenSet, List, Optional, Sequence,
                    Tuple)

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from ..ops.types import IntPair
from ..report import pair_label
from ..surgery import trained_modules

Radius = Optional[IntPair]  # None: vanilla back-propagation
# above this many combinations, the convs that share a saved tensor are
# chosen together (all vanilla or all at one radius) instead of one by one
MAX_GROUP_OPTIONS = 4096


@dataclass
class Layer:
    """One candidate conv layer, as the forward pass saw it.

    Args:
        path (str): The conv's dotted path.
        norm (str, optional): The norm layer that its output feeds, trained
            with it.
        in_shape, out_shape (tuple[int, ...]): Its input and output shapes.
        radii (list[tuple[int, int]]): The candidate radii whose patch fits
            its output map.
    """
    path: str
    norm: Optional[str]
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    radii: List[IntPair]

    @property
    def params(self) -> List[str]:
        """The modules whose parameters train with this layer."""
        return [self.path] + ([self.norm] if self.norm else [])


def _leaf_with_params(module: nn.Module) -> bool:
    return not list(module.children()) and any(
        True for _ in module.parameters(recurse=False))


def trace_layers(model: nn.Module, run: Callable[[], object],
                 head: Optional[str] = None
                 ) -> Tuple[List[Layer], str, List[str]]:
    """The convs of ``model`` in the order ``run`` (a forward pass) calls
    them, last first, the classifier they feed and what was left out.

    The classifier is the last module with parameters that runs under the
    ``head`` module (``decode_head`` or ``head`` where the model has one);
    it is always trained and never filtered, so it is not a candidate.
    Modules under an ``auxiliary_head`` are left out: they only serve
    training. Each conv is paired with the norm layer whose input is its
    output. ``radii`` is left empty (see :func:`fit_radii`).

    Returns:
        tuple: (layers, last first; classifier path; paths left out, with
        the reason).
    """
    if head is None:
        head = next((n for n in ('decode_head', 'head')
                     if isinstance(getattr(model, n, None), nn.Module)), '')
    seen: Dict[str, Tuple[tuple, tuple]] = {}
    order: List[str] = []  # leaves with parameters, in forward order
    # id of a conv's output -> (the conv, the output, kept alive so that no
    # later tensor takes its id)
    outputs: Dict[int, Tuple[str, Tensor]] = {}
    norms: Dict[str, str] = {}
    handles = []

    def record(name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
        order.append(name)
        if isinstance(module, nn.Conv2d) and name not in seen:
            seen[name] = (tuple(args[0].shape), tuple(out.shape))
            outputs[id(out)] = (name, out)
        elif (isinstance(module, _NormBase) and args and
              id(args[0]) in outputs):
            norms.setdefault(outputs[id(args[0])][0], name)

    for name, module in model.named_modules():
        if _leaf_with_params(module):
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: record(name, m, a, o)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    under_head = [n for n in order if not head or n.startswith(head + '.')]
    if not under_head:
        raise ValueError(f'no module with parameters ran under "{head}": '
                         'cannot tell the classifier')
    classifier = under_head[-1]
    skipped, layers = [], []
    for name in reversed(list(dict.fromkeys(order))):
        if name not in seen or name == classifier:
            continue
        if name.split('.')[0] == 'auxiliary_head':
            skipped.append(f'{name} (auxiliary head)')
            continue
        layers.append(Layer(name, norms.get(name), *seen[name], radii=[]))
    return layers, classifier, skipped


def fit_radii(layers: Sequence[Layer], radii: Sequence[int]) -> None:
    """Set each layer's candidate radii: those whose patch fits its output
    map (a larger patch would average over the whole map)."""
    for layer in layers:
        h, w = layer.out_shape[-2:]
        layer.radii = [(r, r) for r in radii if r <= h and r <= w]


def freeze_rules(model: nn.Module, layers: Sequence[Layer],
                 classifier: str) -> List[str]:
    """``GradientFilterHook`` freeze rules that train ``layers`` (with their
    norms) and the classifier: freeze every top-level part with parameters
    that does not train whole, then unfreeze the shallowest modules in it
    whose parameters all train."""
    model = copy.deepcopy(model).requires_grad_(False)
    for path in [classifier, *(p for layer in layers for p in layer.params)]:
        model.get_submodule(path).requires_grad_(True)
    if all(p.requires_grad for p in model.parameters()):
        return []
    trained = trained_modules(model)
    tops = [name for name, child in model.named_children()
            if name not in trained and any(True for _ in child.parameters())]
    return tops + [f'~{name}' for name in trained
                   if name.split('.')[0] in tops]


@dataclass
class PrefixCosts:
    """What training the last ``trained`` conv layers costs, measured.

    Saved bytes are counted by storage, once each, in one forward with all
    of them vanilla and one with all of them filtered at each radius (those
    that can take it). A storage that only trained layers (a conv and its
    norm) save is theirs; any other is the step's fixed part.

    Args:
        trained (int): How many candidate layers train (0: the classifier
            alone).
        saved_bytes, peak_bytes, backward_flops (int): The step's figures
            with all of them vanilla.
        fixed_bytes (int): Saved bytes that no trained layer's choice
            changes.
        storages (list): ``(bytes, radius or None, convs)``: a storage that
            the layers of ``convs`` save when vanilla (None) or filtered at
            that radius; a plan keeps it where any of them has that choice
            (the ASPP branches' common input while one of them is vanilla;
            the pooled input that filtered convs of one radius share).
        layer_flops (dict): ``{conv: {radius or None: FLOPs}}``: its
            backward FLOPs, vanilla (None) and filtered.
        filtered_saved_bytes, filtered_peak_bytes (int, optional): The
            whole step measured with every trained conv filtered at its
            largest radius; None where none can be.
        least_peak_bytes (int, optional): A measured peak that no plan of
            this prefix can be below: the classifier-only step's, whose
            every part each plan runs too. No predicted peak is below it.
    """
    trained: int
    saved_bytes: int
    peak_bytes: int
    backward_flops: int
    fixed_bytes: int = 0
    storages: List[Tuple[int, Radius, FrozenSet[str]]] = field(
        default_factory=list)
    layer_flops: Dict[str, Dict[Radius, int]] = field(default_factory=dict)
    filtered_saved_bytes: Optional[int] = None
    filtered_peak_bytes: Optional[int] = None
    least_peak_bytes: Optional[int] = None

    def peak_at(self, saved_delta: int) -> int:
        """The predicted peak of a plan that saves ``saved_delta`` bytes
        more than all vanilla: as far between the vanilla and the filtered
        step's measured peaks as its saving is between theirs (a peak that
        falls where the saved tensors are not all alive moves less than
        they do, or not at all), and never below ``least_peak_bytes``."""
        peak = self.peak_bytes
        if self.filtered_saved_bytes is not None:
            freed = self.filtered_saved_bytes - self.saved_bytes
            if freed < 0:
                peak = round(peak + (self.filtered_peak_bytes - peak) *
                             saved_delta / freed)
        return max(peak, self.least_peak_bytes or 0)

    def to_dict(self) -> Dict:
        """The measured costs as plain data (plan.json)."""
        return dict(
            trained_convs=self.trained, saved_bytes=self.saved_bytes,
            peak_bytes=self.peak_bytes, backward_flops=self.backward_flops,
            fixed_bytes=self.fixed_bytes,
            storages=[dict(bytes=b, radius=r and pair_label(r),
                           convs=sorted(c)) for b, r, c in self.storages],
            layer_flops={p: {pair_label(r) if r else 'vanilla': f
                             for r, f in v.items()}
                         for p, v in self.layer_flops.items()},
            all_filtered=dict(saved_bytes=self.filtered_saved_bytes,
                              peak_bytes=self.filtered_peak_bytes))


@dataclass
class Budget:
    """Limits of a plan; None: no limit."""
    saved_bytes: Optional[float] = None
    peak_bytes: Optional[float] = None
    backward_flops: Optional[float] = None


@dataclass
class Plan:
    """One plan and its predicted figures."""
    layers: List[Layer]  # trained, last first
    radii: Dict[str, Radius]  # by conv path
    saved_bytes: int
    peak_bytes: int
    backward_flops: int
    mean_cosine: float

    @property
    def trained(self) -> int:
        return len(self.layers)

    @property
    def filter_install(self) -> List[dict]:
        """The plan's ``filter_install`` items, last layer first."""
        return [dict(path=layer.path, radius=_plain(self.radii[layer.path]))
                for layer in self.layers if self.radii[layer.path]]

    def fits(self, budget: Budget) -> bool:
        return all(limit is None or value <= limit for value, limit in (
            (self.saved_bytes, budget.saved_bytes),
            (self.peak_bytes, budget.peak_bytes),
            (self.backward_flops, budget.backward_flops)))

    def describe(self) -> str:
        """The filtered layers' radii, counted: ``'3 at r2, 1 at r4'``."""
        counts = Counter(sorted(r for r in self.radii.values() if r))
        return ', '.join(f'{n} at r{pair_label(r)}'
                         for r, n in counts.items()) or 'none'

    def to_dict(self, cosines: Dict[str, Dict[IntPair, float]]) -> Dict:
        """The plan as plain data (plan.json), each layer with its
        weight-gradient cosine of ``cosines`` (1 where vanilla)."""
        return dict(
            trained_convs=self.trained,
            layers=[dict(path=layer.path, norm=layer.norm,
                         radius=self.radii[layer.path],
                         weight_cos=cosines.get(layer.path, {}).get(
                             self.radii[layer.path])
                         if self.radii[layer.path] else 1.0)
                    for layer in self.layers],
            filter_install=self.filter_install,
            predicted=dict(saved_bytes=self.saved_bytes,
                           peak_bytes=self.peak_bytes,
                           backward_flops=self.backward_flops,
                           mean_weight_cos=self.mean_cosine))


def _plain(radius: IntPair):
    return radius[0] if radius[0] == radius[1] else list(radius)


def _groups(prefix: PrefixCosts, paths: Sequence[str]) -> List[List[str]]:
    """Trained convs joined where a storage is theirs together (the ASPP
    branches' common input, a pooled input they share): their choices
    decide its cost together."""
    parent = {p: p for p in paths}

    def root(p: str) -> str:
        while parent[p] != p:
            p = parent[p]
        return p

    for _, _, convs in prefix.storages:
        first, *rest = sorted(convs)
        for other in rest:
            parent[root(other)] = root(first)
    groups: Dict[str, List[str]] = {}
    for p in paths:
        groups.setdefault(root(p), []).append(p)
    return list(groups.values())


def _kept_bytes(storages: Sequence[Tuple[int, Radius, FrozenSet[str]]],
                choice: Dict[str, Radius]) -> int:
    """Bytes of the storages that ``choice`` (radius by conv) keeps."""
    return sum(nbytes for nbytes, radius, convs in storages
               if any(choice[c] == radius for c in convs))


# a partial plan: (saved delta, FLOPs delta, sum of cosines, radii chosen)
_State = Tuple[int, int, float, Tuple[Tuple[str, Radius], ...]]


def _group_options(prefix: PrefixCosts, group: List[str],
                   options: Dict[str, List[Tuple[Radius, float]]]
                   ) -> List[_State]:
    """Every choice of radii for a group, with its deltas from vanilla."""
    choices = [options[p] for p in group]
    total = 1
    for choice in choices:
        total *= len(choice)
    if total > MAX_GROUP_OPTIONS:
        common = set.intersection(*(set(r for r, _ in c) for c in choices))
        combos = [tuple(next(o for o in c if o[0] == r) for c in choices)
                  for r in common]
    else:
        combos = itertools.product(*choices)
    members = set(group)
    storages = [s for s in prefix.storages if s[2] <= members]
    vanilla = _kept_bytes(storages, dict.fromkeys(group))
    states = []
    for combo in combos:
        choice = {p: r for p, (r, _) in zip(group, combo)}
        flops = sum(prefix.layer_flops[p][r] - prefix.layer_flops[p][None]
                    for p, r in choice.items() if r)
        states.append((_kept_bytes(storages, choice) - vanilla, flops,
                       sum(c for _, c in combo), tuple(choice.items())))
    return states


def _pareto(states: List[_State], use_flops: bool) -> List[_State]:
    """The states no other one beats on saved bytes, cosine and, where
    ``use_flops``, FLOPs."""
    kept: List[_State] = []
    if not use_flops:
        for state in sorted(states, key=lambda s: (s[0], -s[2], s[1])):
            if not kept or state[2] > kept[-1][2]:
                kept.append(state)
        return kept
    for state in sorted(states, key=lambda s: (s[0], s[1], -s[2])):
        if not any(k[1] <= state[1] and k[2] >= state[2] for k in kept):
            kept.append(state)
    return kept


def prefix_plans(prefix: PrefixCosts, layers: Sequence[Layer],
                 cosines: Dict[str, Dict[IntPair, float]],
                 min_cosine: float, use_flops: bool = True) -> List[Plan]:
    """The plans that train ``prefix.trained`` layers and that no other such
    plan beats on saved bytes, mean cosine and, where ``use_flops`` (a FLOPs
    budget), backward FLOPs.

    ``cosines[conv][radius]`` is the layer's weight-gradient cosine; a radius
    whose cosine is below ``min_cosine`` (or unknown) is no option. The
    peak is predicted by :meth:`PrefixCosts.peak_at`.
    """
    trained = list(layers[:prefix.trained])
    options = {layer.path: [(None, 1.0)] + [
        (r, cosines[layer.path][r]) for r in layer.radii
        if cosines.get(layer.path, {}).get(r, -2.0) >= min_cosine]
        for layer in trained}
    states: List[_State] = [(0, 0, 0.0, ())]
    for group in _groups(prefix, [layer.path for layer in trained]):
        states = _pareto([
            (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])
            for a in states for b in _group_options(prefix, group, options)],
            use_flops)
    plans = []
    for saved, flops, cos_sum, radii in states:
        saved_bytes = prefix.saved_bytes + saved
        plans.append(Plan(
            trained, dict(radii), saved_bytes,
            prefix.peak_at(saved),
            prefix.backward_flops + flops,
            cos_sum / len(trained) if trained else 1.0))
    return plans


def smallest_plan(plans: Sequence[Plan]) -> Plan:
    """The plan that saves the least (then: the fewest FLOPs)."""
    return min(plans, key=lambda p: (p.saved_bytes, p.backward_flops))


def best_plan(plans: Sequence[Plan], budget: Budget) -> Optional[Plan]:
    """The selection rule: among the plans within ``budget``, the one that
    trains the most conv layers, then the higher mean cosine, then the
    smaller saved bytes; None if none fits."""
    fitting = [p for p in plans if p.fits(budget)]
    if not fitting:
        return None
    return max(fitting, key=lambda p: (p.trained, p.mean_cosine,
                                       -p.saved_bytes))


def choose_plan(prefixes: Sequence[PrefixCosts], layers: Sequence[Layer],
                cosines: Dict[str, Dict[IntPair, float]], budget: Budget,
                min_cosine: float) -> Tuple[Optional[Plan], List[Plan]]:
    """The chosen plan (None if no plan fits) and the front: per number of
    trained layers, its best plan within ``budget``, else its smallest."""
    front, candidates = [], []
    for prefix in prefixes:
        plans = prefix_plans(prefix, layers, cosines, min_cosine,
                             budget.backward_flops is not None)
        candidates += plans
        front.append(best_plan(plans, budget) or smallest_plan(plans))
    return best_plan(candidates, budget), front


def min_figures(prefix: PrefixCosts, layers: Sequence[Layer]) -> Plan:
    """The least saved bytes (its plan, with its predicted peak) and the
    least FLOPs of a prefix, every radius allowed (cosines not yet known):
    what decides whether longer prefixes could still fit. Its mean cosine
    is NaN: no measure of any plan."""
    trained = list(layers[:prefix.trained])
    options = {layer.path: [(r, 1.0) for r in [None, *layer.radii]]
               for layer in trained}
    radii: Dict[str, Radius] = {}
    saved = flops = 0
    for group in _groups(prefix, [layer.path for layer in trained]):
        states = _group_options(prefix, group, options)
        least = min(states, key=lambda s: (s[0], s[1]))
        radii.update(least[3])
        saved += least[0]
        flops += min(s[1] for s in states)
    return Plan(trained, radii, prefix.saved_bytes + saved,
                prefix.peak_at(saved), prefix.backward_flops + flops,
                float('nan'))


def plan_config(base: str, hook: dict, base_hooks: bool,
                extra: Sequence[str] = ()) -> str:
    """The text of a config that inherits ``base`` and trains with ``hook``
    (a ``GradientFilterHook`` dict) in place of any GradientFilterHook of
    the base; ``base_hooks``: whether the base has ``custom_hooks`` (kept)."""
    lines = [f'_base_ = {base!r}']
    lines += list(extra)
    hook_text = 'dict(\n' + ''.join(
        f'        {key}={_literal(value)},\n'
        for key, value in hook.items()) + '    )'
    if base_hooks:
        lines.append('custom_hooks = [\n    hook for hook in _base_.custom_hooks'
                     "\n    if hook.get('type') != 'GradientFilterHook'\n] + [\n"
                     f'    {hook_text}\n]')
    else:
        lines.append(f'custom_hooks = [\n    {hook_text}\n]')
    return '\n'.join(lines) + '\n'


def _literal(value) -> str:
    """A config literal: dicts as ``dict(...)``, a list of dicts or strings
    one item a line."""
    if isinstance(value, dict):
        return 'dict(' + ', '.join(f'{k}={_literal(v)}'
                                   for k, v in value.items()) + ')'
    if isinstance(value, list) and any(isinstance(v, (dict, list, str))
                                       for v in value):
        return '[\n' + ''.join(f'            {_literal(v)},\n'
                               for v in value) + '        ]'
    return repr(value)
