"""Gradient fidelity: the gradients training applies against exact ones.

One definition, used by ``tools/grad_fidelity.py``, the planner's quality
measure and :class:`~mmgradfilt.hooks.GradientFilterHook`'s monitor: for each
trained :class:`~mmgradfilt.layers.GradFilterConv2d` and each
:class:`~mmgradfilt.memory.FilteredBatchNorm2d`, the cosine similarity and
relative error of its weight gradient (and of its input gradient, where one
flows) in the model *as configured* (gradient filters, filtered BatchNorms,
the lean step) against *the exact model*: the same model with every
approximation off (no filter, exact BatchNorms, ``lean_memory=False``: only
the config's freezing), with the same weights, on the same batch, with the
same random draws (dropout). The error of a layer therefore includes what
the approximations downstream of it (nearer the loss) did to its output
gradient: a conv behind a filtered BatchNorm of its radius reads below 1 even
where the conv's own filter, given that already patch-averaged output
gradient, adds nothing.

That conv's own error (the filtered gradients of the input and output
gradient the configured model gave it, against the exact conv backward of
the same pair: :func:`layer_fidelity`) is kept as a second, labelled figure
(``own_*``); it is not the fidelity of training.

Both passes are training passes (data preprocessor, loss, backward) run
through :func:`torch.autograd.grad`, so no ``.grad`` is touched; the random
number generators and the BatchNorm buffers are restored after each, so a
training step that follows sees exactly what it would have seen.
"""
import copy
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import (Callable, Dict, Iterable, List, Optional,
                    Sequence, Tuple)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..frontier import kept_buffers, replayed_rng
from ..layers import GradFilterConv2d
from ..memory.norm import FilteredBatchNorm2d
from ..ops.grad_filter_conv import grad_filter_conv2d, grid_conv
from ..ops.types import IntPair
from ..report import Column, Table, pair_label, radius_bars, save_figure
from ..surgery import GradientFilterRecipe

# against the exact model (the headline), then the conv's own error
METRICS = ('weight_cos', 'weight_rel_error', 'input_cos', 'input_rel_error',
           'bias_cos')
OWN_METRICS = ('own_weight_cos', 'own_input_cos', 'shared_weight_cos')


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors as flat vectors, in float64."""
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(),
                               0).item()


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``|approx - exact| / |exact|`` (Frobenius norms), in float64."""
    exact = exact.double()
    return ((approx.double() - exact).norm() / exact.norm()).item()


# --- a conv's own error: the same input and output gradient -----------------

def _filtered_grads(layer: GradFilterConv2d, x: Tensor, grad_out: Tensor,
                    padding: IntPair, dilation: IntPair, radius: IntPair,
                    input_grad: bool = True
                    ) -> Optional[Tuple[Optional[Tensor], Tensor]]:
    """``(dx, dW)`` of the filtered op with the layer's weight at the given
    geometry (``dx`` None unless ``input_grad``), or None where that geometry
    gives another output size."""
    x = x.detach().requires_grad_(input_grad)
    weight = layer.weight.detach().requires_grad_()
    out = grad_filter_conv2d(x, weight, None, layer.stride, padding, dilation,
                             layer.groups, radius)
    if out.shape != grad_out.shape:
        return None
    if not input_grad:
        return None, torch.autograd.grad(out, weight, grad_out)[0]
    return torch.autograd.grad(out, (x, weight), grad_out)


def exact_grads(layer: GradFilterConv2d, x: Tensor,
                grad_out: Tensor) -> Tuple[Tensor, Tensor]:
    """``(dx, dW)`` of ``layer``'s plain conv for ``x`` and ``grad_out``."""
    dx, dw, _ = torch.ops.aten.convolution_backward(
        grad_out, x, layer.weight.detach(), None, layer.stride,
        layer.padding_pair, layer.dilation, False, (0, 0), layer.groups,
        (True, True, False))
    return dx, dw


def layer_fidelity(layer: GradFilterConv2d, x: Tensor, grad_out: Tensor,
                   radius: Optional[IntPair] = None,
                   exact: Optional[Tuple[Tensor, Tensor]] = None
                   ) -> Dict[str, Optional[float]]:
    """A conv's own error: filtered (with ``radius``, default the layer's)
    vs exact gradients of ``layer`` for one input ``x`` and output gradient
    ``grad_out``.

    This is not the fidelity of training (:func:`gradient_fidelity`): it
    ignores what happened to ``grad_out`` on its way from the loss.
    ``exact`` is :func:`exact_grads` of the same, where already computed.
    ``shared_weight_cos`` is the cosine of the paper's weight gradient (one
    value for all taps of a filter) where the layer's taps fall in different
    patches, else None: there the filtered one is that gradient already.
    """
    exact_x, exact_w = exact or exact_grads(layer, x, grad_out)
    radius = radius or layer.radius
    dx, dw = _filtered_grads(layer, x, grad_out, layer.padding_pair,
                             layer.dilation, radius)
    result = dict(weight_cos=cosine(dw, exact_w),
                  weight_rel_error=relative_error(dw, exact_w),
                  input_cos=cosine(dx, exact_x),
                  input_rel_error=relative_error(dx, exact_x),
                  shared_weight_cos=None)
    grid = grid_conv(tuple(layer.kernel_size), layer.stride, layer.padding_pair,
                     layer.dilation, radius)
    if any(grid.dilation):
        # the same conv undilated: its grid kernel is the summed one
        same = tuple((k - 1) // 2 for k in layer.kernel_size)
        shared = _filtered_grads(layer, x, grad_out, same, (1, 1), radius,
                                 input_grad=False)
        if shared is not None:
            result['shared_weight_cos'] = cosine(shared[1], exact_w)
    return result


# --- the configured model against the exact one ------------------------------

def filtered_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The layers whose gradients approximate: each
    :class:`GradFilterConv2d` whose weight trains and each
    :class:`FilteredBatchNorm2d`, by path, in model order."""
    return {
        path: m for path, m in model.named_modules()
        if (isinstance(m, GradFilterConv2d) and m.weight.requires_grad)
        or isinstance(m, FilteredBatchNorm2d)
    }


def share_weights(model: nn.Module, source: nn.Module) -> None:
    """Make ``model``'s parameters and buffers the very objects of
    ``source``'s of the same names (``model`` a copy of ``source`` taken
    before its surgery, which keeps the names): then one set of weights
    serves both, whatever loads or trains them later.

    Raises:
        ValueError: A parameter or buffer of ``source`` that ``model`` lacks.
    """
    for kind in ('_parameters', '_buffers'):
        named = (source.named_parameters if kind == '_parameters' else
                 source.named_buffers)(remove_duplicate=False)
        for name, tensor in named:
            path, _, attr = name.rpartition('.')
            try:
                owner = model.get_submodule(path)
            except AttributeError:
                owner = None
            if owner is None or attr not in getattr(owner, kind):
                raise ValueError(f'{name} of the configured model is not in '
                                 'the exact one: not a copy of the same model')
            getattr(owner, kind)[attr] = tensor


def exact_model(model: nn.Module, recipe: GradientFilterRecipe) -> nn.Module:
    """The exact twin of ``model`` (taken before ``recipe`` is applied to
    it): a copy with only ``recipe``'s freezing (freeze rules and
    ``norm_eval``): no gradient filter, no lean step, exact BatchNorms.
    :func:`measure_fidelity` shares the configured model's weights with it
    (:func:`share_weights`) before each measurement."""
    twin = copy.deepcopy(model)
    recipe.replace(filter_install=(), lean_memory=False,
                   filter_norm=False).apply(twin)
    return twin


def at_radii(recipe: GradientFilterRecipe, radii: Optional[Sequence[int]]
             ) -> Dict[Optional[IntPair], GradientFilterRecipe]:
    """``recipe`` with every filter at each of ``radii`` (by radius pair),
    else ``recipe`` itself (key None)."""
    if not radii:
        return {None: recipe}
    return {(r, r): recipe.replace(filter_install=tuple(
        (path, (r, r)) for path, _ in recipe.filter_install)) for r in radii}


def configured_models(model: nn.Module,
                      recipes: Dict[object, GradientFilterRecipe]
                      ) -> Tuple[nn.Module, Dict[object, nn.Module]]:
    """The exact twin of ``model`` (:func:`exact_model`) and one copy per
    recipe with it applied (by the same keys), all sharing one set of
    weights (the first copy's, frozen as the recipes say); ``model``, which
    has no surgery yet, is left as it is. The recipes differ in filters and
    lean settings only: all have the first one's freezing."""
    exact = exact_model(model, next(iter(recipes.values())))
    models = {}
    for key, recipe in recipes.items():
        models[key] = copy.deepcopy(model)
        recipe.apply(models[key])
    first = next(iter(models.values()))
    for twin in (exact, *models.values()):
        share_weights(twin, first)
    return exact, models


@dataclass
class PassGradients:
    """What one training pass gave the filtered layers.

    Args:
        params (dict): Gradient of each parameter, by parameter name.
        inputs (dict): Gradient of each layer's input, by layer path (only
            where the input needs one).
        io (dict): ``(input, output gradient)`` of each filtered conv, by
            path (with ``keep_io``).
    """
    params: Dict[str, Tensor] = field(default_factory=dict)
    inputs: Dict[str, Tensor] = field(default_factory=dict)
    io: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict)


def training_loss(model: nn.Module, batch: Dict) -> Tensor:
    """The loss of ``model`` (an OpenMMLab model) on a data loader batch,
    computed as its ``train_step`` does (without the optimizer wrapper's
    autocast: in the parameters' precision)."""
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    return loss


def pass_gradients(model: nn.Module, batch: Dict, paths: Iterable[str],
                   keep_io: bool = False) -> PassGradients:
    """One training pass of ``model`` on ``batch``: the gradients of the
    parameters of the modules at ``paths`` and of their inputs.

    Through :func:`torch.autograd.grad` (no ``.grad`` changes), with the
    random number generators replayed (:func:`replayed_rng`) and the buffers
    kept (:func:`kept_buffers`): what follows sees neither.
    """
    paths = [p for p in paths]
    modules = {p: model.get_submodule(p) for p in paths}
    inputs: Dict[str, List[Tensor]] = defaultdict(list)
    grad_outs: Dict[str, List[Tensor]] = defaultdict(list)

    def record(path, module, args, output):
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            inputs[path].append(args[0])
        if (keep_io and isinstance(module, GradFilterConv2d) and
                isinstance(output, Tensor) and output.requires_grad):
            index = len(grad_outs[path])
            grad_outs[path].append(args[0].detach())
            output.register_hook(
                lambda g: grad_outs[path].__setitem__(index, (
                    grad_outs[path][index], g.detach())))

    handles = [m.register_forward_hook(
        lambda m, a, o, p=p: record(p, m, a, o)) for p, m in modules.items()]
    params = {f'{p}.{name}': t for p, m in modules.items()
              for name, t in m.named_parameters(recurse=False)
              if t.requires_grad}
    device = next(model.parameters()).device
    try:
        with replayed_rng(device), kept_buffers(model):
            loss = training_loss(model, batch)
            wanted = list(params.values()) + [
                x for xs in inputs.values() for x in xs]
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    grads = iter(grads)
    result = PassGradients()
    for name in params:
        grad = next(grads)
        if grad is not None:
            result.params[name] = grad
    for path, xs in inputs.items():
        got = [next(grads) for _ in xs]
        if all(g is not None for g in got):
            result.inputs[path] = torch.cat([g.flatten() for g in got])
    for path, pairs in grad_outs.items():
        if pairs and isinstance(pairs[-1], tuple):  # the last call's
            result.io[path] = pairs[-1]
    return result


def compare(model: nn.Module, got: PassGradients, exact: PassGradients,
            own: bool = False) -> List[Dict]:
    """One row per filtered layer of ``model`` (the configured model) that
    got a weight or input gradient: its :data:`METRICS` (``got`` against
    ``exact``), and with ``own`` its conv's :data:`OWN_METRICS`."""
    rows = []
    for path, module in filtered_layers(model).items():
        row = dict(layer=path, **_geometry(module),
                   **dict.fromkeys(METRICS + OWN_METRICS))
        for param, key in (('weight', 'weight'), ('bias', 'bias')):
            name = f'{path}.{param}'
            if name in got.params and name in exact.params:
                row[f'{key}_cos'] = cosine(got.params[name],
                                           exact.params[name])
                if key == 'weight':
                    row['weight_rel_error'] = relative_error(
                        got.params[name], exact.params[name])
        if isinstance(module, GradFilterConv2d):
            row['bias_cos'] = None  # the filter leaves it exact
        if path in got.inputs and path in exact.inputs:
            row['input_cos'] = cosine(got.inputs[path], exact.inputs[path])
            row['input_rel_error'] = relative_error(got.inputs[path],
                                                    exact.inputs[path])
        if own and path in got.io:
            x, grad_out = got.io[path]
            conv = layer_fidelity(module, x, grad_out)
            row.update(own_weight_cos=conv['weight_cos'],
                       own_input_cos=(conv['input_cos'] if row['input_cos']
                                      is not None else None),
                       shared_weight_cos=conv['shared_weight_cos'])
        if row['weight_cos'] is not None or row['input_cos'] is not None:
            rows.append(row)
    return rows


def _geometry(module: nn.Module) -> Dict:
    if isinstance(module, GradFilterConv2d):
        return dict(kind='conv', kernel_size=tuple(module.kernel_size),
                    stride=tuple(module.stride),
                    dilation=tuple(module.dilation),
                    radius=tuple(module.radius))
    return dict(kind='norm', kernel_size=None, stride=None, dilation=None,
                radius=tuple(module.radius))


def gradient_fidelity(model: nn.Module, exact: nn.Module, batch: Dict,
                      own: bool = False) -> List[Dict]:
    """The fidelity of ``model``'s gradients on ``batch``: one row per
    filtered layer (:func:`filtered_layers`) with its :data:`METRICS`
    against ``exact`` (:func:`exact_model` of it, whose weights this makes
    ``model``'s first), both in their current train/eval mode.

    Costs an exact training pass and a configured one (forward and
    backward, no optimizer step); changes no weight, buffer, ``.grad`` or
    random state.
    """
    return measure_fidelity({None: model}, exact, [batch], own=own)[None]


def measure_fidelity(models: Dict, exact: nn.Module, batches: Iterable[Dict],
                     own: bool = False,
                     progress: Callable[[], None] = lambda: None
                     ) -> Dict[object, List[Dict]]:
    """:func:`gradient_fidelity` of several configurations of one model (by
    key, e.g. radius: each a configured copy) on the same ``batches``, each
    against the same exact pass; per key, one row per layer with the means
    over the batches (and ``batches``: how many gave it a gradient)."""
    for model in models.values():
        share_weights(exact, model)
    paths = list(dict.fromkeys(
        p for m in models.values() for p in filtered_layers(m)))
    samples: Dict[object, Dict[str, List[Dict]]] = {
        key: defaultdict(list) for key in models}
    for batch in batches:
        reference = pass_gradients(exact, batch, paths)
        for key, model in models.items():
            got = pass_gradients(model, batch, filtered_layers(model), own)
            for row in compare(model, got, reference, own):
                samples[key][row['layer']].append(row)
        progress()
    return {key: [_mean_row(rows) for rows in per_layer.values()]
            for key, per_layer in samples.items()}


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _mean_row(rows: List[Dict]) -> Dict:
    row = dict(rows[-1], batches=len(rows))
    row.update({m: _mean([r[m] for r in rows]) for m in METRICS + OWN_METRICS})
    return row


# --- tables ------------------------------------------------------------------

FIDELITY_COLUMNS = [
    Column('filtered layer', 'layer'), Column('kernel', 'kernel'),
    Column('dilation', 'dilation'), Column('radius', 'radius'),
    Column('dW cos', 'weight_cos', '.3f'),
    Column('dW rel err', 'weight_rel_error', '.3f'),
    Column('dx cos', 'input_cos', '.3f'),
    Column('dx rel err', 'input_rel_error', '.3f'),
    Column('own dW cos', 'own_weight_cos', '.3f'),
    Column('own dW cos (taps shared)', 'shared_weight_cos', '.3f'),
]

NORM_COLUMNS = [
    Column('filtered BatchNorm', 'layer'), Column('radius', 'radius'),
    Column('dgamma cos', 'weight_cos', '.3f'),
    Column('dgamma rel err', 'weight_rel_error', '.3f'),
    Column('dbeta cos', 'bias_cos', '.3f'),
    Column('dx cos', 'input_cos', '.3f'),
    Column('dx rel err', 'input_rel_error', '.3f'),
]

FIDELITY_LEGEND = '\n'.join([
    'configured: the model as the config trains it (gradient filters, '
    'filtered BatchNorms, the lean step); exact: the same model with every '
    'approximation off (the config\'s freezing only), same weights, same '
    'batch, same dropout',
    'dW, dx: the gradient of the layer\'s weight and of its input tensor '
    '(all its uses: a residual branch too), configured against exact; cos: '
    'cosine similarity (1: the same direction); rel err: '
    '|configured - exact| / |exact|',
    'own dW cos: the conv\'s own error only: its filtered dW against the '
    'exact conv backward of the same input and output gradient (what reached '
    'it, filtered BatchNorms included); not the fidelity of training',
    'own dW cos (taps shared): the same with the paper\'s weight gradient, '
    'one value for all taps of a filter, where the taps fall in different '
    'patches',
    '-: not computed (dx: the layer\'s input needs no gradient; taps shared: '
    'the filtered dW is that one already)',
])

NORM_LEGEND = ('dgamma, dbeta, dx: the filtered BatchNorm\'s weight, bias '
               'and input gradients against the exact BatchNorm\'s in the '
               'exact model')


def fidelity_table(rows: Sequence[Dict]) -> Table:
    """The filtered convs of :func:`measure_fidelity`'s rows, printed and as
    CSV."""
    return Table(FIDELITY_COLUMNS, [[
        r['layer'], 'x'.join(map(str, r['kernel_size'])),
        pair_label(r['dilation']), pair_label(r['radius']),
        *(r[c.name] for c in FIDELITY_COLUMNS[4:])
    ] for r in rows if r['kind'] == 'conv'])


def norm_fidelity_table(rows: Sequence[Dict]) -> Table:
    """The filtered BatchNorms of :func:`measure_fidelity`'s rows."""
    return Table(NORM_COLUMNS, [[
        r['layer'], pair_label(r['radius']),
        *(r[c.name] for c in NORM_COLUMNS[2:])
    ] for r in rows if r['kind'] == 'norm'])


def plot_fidelity(path: str, rows: Sequence[Dict], title: str) -> None:
    """Cosine of the configured and exact weight gradients per filtered conv
    and radius."""
    rows = [r for r in rows if r['kind'] == 'conv']
    fig, ax = radius_bars(rows, 'layer', 'weight_cos')
    ax.set_ylim(min(0.0, *(r['weight_cos'] or 0 for r in rows)), 1.0)
    ax.set_ylabel('cosine, configured vs exact weight gradient')
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
