"""Gradient fidelity: the filtered gradients of a model's convs against exact ones.

In training passes over real batches, the input and output gradient of every
gradient-filtered conv are recorded; the filtered input and weight gradients
of that input and output gradient (what training uses) are then compared with
the exact ones of the same input and output gradient: cosine similarity and
relative error. For convs whose taps fall in different patches (dilation of a
block or more, as in ASPP), the weight gradient that the paper shares between
all taps of a filter is compared too.

With ``filter_norm``, the BatchNorm right after each filtered conv (those that
``filter_norm=True`` would filter) is recorded too: from its input and output
gradient, the exact BN backward gives the conv's output gradient (the ``dx``
of the BN), and the filtered BN
(:class:`~mmgradfilt.memory.norm.FilteredBatchNorm2d`) another one. The conv
is measured on both against the same exact conv gradients, and the filtered
BN's weight and bias gradients against the exact BN's.
"""
import functools
import statistics
from collections import defaultdict
from typing import (Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Tuple)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import GradFilterConv2d
from ..memory.norm import filtered_batch_norm, filtered_norm_records
from ..ops.grad_filter_conv import grad_filter_conv2d, grid_conv
from ..report import Column, Table, pair_label, radius_bars, save_figure

METRICS = ('weight_cos', 'weight_rel_error', 'input_cos', 'input_rel_error',
           'shared_weight_cos')
# with filter_norm: the conv behind the filtered BN, and the BN itself
CONV_NORM_METRICS = ('filter_norm_weight_cos', 'filter_norm_weight_rel_error',
                     'filter_norm_input_cos', 'filter_norm_input_rel_error')
NORM_METRICS = ('norm_weight_cos', 'norm_weight_ratio', 'norm_bias_cos',
                'norm_bias_ratio')
IntPair = Tuple[int, int]


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors as flat vectors, in float64."""
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(),
                               0).item()


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``|approx - exact| / |exact|`` (Frobenius norms), in float64."""
    exact = exact.double()
    return ((approx.double() - exact).norm() / exact.norm()).item()


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
    """Filtered (with ``radius``, default the layer's) vs exact gradients of
    ``layer`` for input ``x`` and output gradient ``grad_out``.

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


def norm_ratio(approx: Tensor, exact: Tensor) -> float:
    """``|approx| / |exact|`` (Frobenius norms), in float64."""
    return (approx.double().norm() / exact.double().norm()).item()


def norm_grads(norm: _BatchNorm, x: Tensor, grad_out: Tensor,
               batch_stats: bool, radius: Optional[IntPair] = None
               ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(dx, dgamma, dbeta)`` of ``norm`` for input ``x`` and output
    gradient ``grad_out``: of the exact BN, or with ``radius`` of the filtered
    one; normalizing with the batch's statistics or the running ones, as the
    layer did (neither updates them). None for a missing affine parameter."""
    x = x.detach().requires_grad_()
    params = [None if p is None else p.detach().requires_grad_()
              for p in (norm.weight, norm.bias)]
    stats = ((None, None) if batch_stats else
             (norm.running_mean, norm.running_var))
    if radius is None:
        out = F.batch_norm(x, *stats, *params, batch_stats, 0.0, norm.eps)
    else:
        out = filtered_batch_norm(x, *params, *stats, 0.0, norm.eps, radius,
                                  training=batch_stats)
    leaves = [t for t in (x, *params) if t is not None]
    grads = iter(torch.autograd.grad(out, leaves, grad_out))
    return tuple(None if t is None else next(grads) for t in (x, *params))


def _norm_fidelity(layer: GradFilterConv2d, x: Tensor, grad_out: Tensor,
                   exact: Tuple[Tensor, Tensor], norm: _BatchNorm,
                   norm_record: Dict, exact_norm: Tuple, radius: IntPair
                   ) -> Dict[str, Optional[float]]:
    """:data:`CONV_NORM_METRICS` and :data:`NORM_METRICS` of ``layer`` and
    the BN after it, filtered with ``radius``, against ``exact`` (the conv's
    exact gradients) and ``exact_norm`` (the exact BN's)."""
    filtered = norm_grads(norm, norm_record['input'], norm_record['grad_out'],
                          norm_record['batch_stats'], radius)
    # the conv's output gradient with the BN's input gradient swapped for
    # the filtered BN's
    conv = layer_fidelity(layer, x, grad_out - exact_norm[0] + filtered[0],
                          radius, exact)
    result = {f'filter_norm_{key}': conv[key] for key in METRICS[:4]}
    for key, got, want in (('weight', filtered[1], exact_norm[1]),
                           ('bias', filtered[2], exact_norm[2])):
        result[f'norm_{key}_cos'] = None if want is None else cosine(got, want)
        result[f'norm_{key}_ratio'] = None if want is None else norm_ratio(
            got, want)
    return result


class GradientRecorder:
    """Records, in training passes, the input and output gradient of every
    :class:`GradFilterConv2d` of ``model`` (the last pass's, by layer name).

    With ``norms``, also those of the BatchNorm after each filtered conv that
    ``filter_norm=True`` would filter (:attr:`norms`: the conv of each, by
    the norm's path), with whether it normalized with batch statistics.
    """

    def __init__(self, model: nn.Module, norms: bool = False) -> None:
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, GradFilterConv2d)}
        self.norms = {r.path: r.conv for r in filtered_norm_records(model)
                      if norms and r.status != 'skipped'}
        self.norm_modules = {path: model.get_submodule(path)
                             for path in self.norms}
        self.records: Dict[str, Dict] = {}
        self._handles: List = []

    def _record(self, name: str, module: nn.Module, inputs: tuple,
                output: Tensor) -> None:
        if not output.requires_grad:
            return
        entry = self.records[name] = dict(
            input=inputs[0].detach(), input_grad=inputs[0].requires_grad)
        if isinstance(module, _BatchNorm):
            entry['batch_stats'] = module.training or (
                module.running_mean is None and module.running_var is None)
        output.register_hook(
            lambda grad: entry.__setitem__('grad_out', grad.detach()))

    def __enter__(self) -> 'GradientRecorder':
        self._handles = [
            module.register_forward_hook(functools.partial(self._record, name))
            for name, module in (*self.layers.items(),
                                 *self.norm_modules.items())
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def recorded_passes(model: nn.Module, recorder: 'GradientRecorder',
                    batches: Iterable[Dict]) -> Iterator[Dict]:
    """One training pass (forward, loss, backward) per batch; yields what
    ``recorder`` kept of it, layer by layer."""
    for batch in batches:
        recorder.records.clear()
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        model.zero_grad(set_to_none=True)
        yield recorder.records


def measure_fidelity(model: nn.Module, batches: Iterable[Dict],
                     radii: Optional[Sequence[int]] = None,
                     progress: Callable[[], None] = lambda: None,
                     filter_norm: bool = False) -> List[Dict]:
    """One row per filtered layer and radius: the layer's geometry and the
    means over ``batches`` (data loader batches of an OpenMMLab model) of
    :func:`layer_fidelity`.

    ``radii`` (default: each layer's own) are compared on the same recorded
    gradients. The input-gradient figures are None for a layer whose input
    needs no gradient (nothing upstream trains). With ``filter_norm``, a
    layer followed by a BatchNorm that ``filter_norm=True`` would filter also
    gets that norm's path (``norm``), its statistics (``norm_stats``:
    ``'batch'`` or ``'running'``) and the means of :data:`CONV_NORM_METRICS`
    and :data:`NORM_METRICS` (the BN filtered with the row's radius); these
    are None elsewhere. Measure a model whose BatchNorms are exact, so that
    the recorded gradients are those of the exact-BN step.
    """
    samples = defaultdict(list)
    with GradientRecorder(model, norms=filter_norm) as recorder:
        norm_of = {conv: norm for norm, conv in recorder.norms.items()}
        for records in recorded_passes(model, recorder, batches):
            for name, layer in recorder.layers.items():
                rec = records.get(name, {})
                if 'grad_out' not in rec:  # its output did not reach the loss
                    continue
                x, grad_out = rec['input'], rec['grad_out']
                exact = exact_grads(layer, x, grad_out)
                norm_rec = recorder.records.get(norm_of.get(name), {})
                if 'grad_out' in norm_rec:
                    norm = recorder.norm_modules[norm_of[name]]
                    exact_norm = norm_grads(norm, norm_rec['input'],
                                            norm_rec['grad_out'],
                                            norm_rec['batch_stats'])
                pairs = [(r, r) for r in radii] if radii else [layer.radius]
                for radius in pairs:
                    result = layer_fidelity(layer, x, grad_out, radius, exact)
                    result.update(dict.fromkeys(CONV_NORM_METRICS +
                                                NORM_METRICS))
                    if 'grad_out' in norm_rec:
                        result.update(_norm_fidelity(
                            layer, x, grad_out, exact, norm, norm_rec,
                            exact_norm, radius))
                        result['norm'] = norm_of[name]
                        result['norm_stats'] = ('batch' if
                                                norm_rec['batch_stats'] else
                                                'running')
                    if not rec['input_grad']:
                        for key in ('input_cos', 'input_rel_error',
                                    'filter_norm_input_cos',
                                    'filter_norm_input_rel_error'):
                            result[key] = None
                    samples[name, radius].append(result)
            progress()
    rows = []
    for (name, radius), results in samples.items():
        layer = recorder.layers[name]
        rows.append(dict(
            layer=name, kernel_size=tuple(layer.kernel_size),
            stride=layer.stride, dilation=layer.dilation, radius=radius,
            batches=len(results),
            norm=results[-1].get('norm'),
            norm_stats=results[-1].get('norm_stats'),
            **{key: _mean([r[key] for r in results])
               for key in METRICS + CONV_NORM_METRICS + NORM_METRICS}))
    return rows


FIDELITY_COLUMNS = [
    Column('filtered layer', 'layer'), Column('kernel', 'kernel'),
    Column('dilation', 'dilation'), Column('radius', 'radius'),
    Column('dW cos', 'weight_cos', '.3f'),
    Column('dW rel err', 'weight_rel_error', '.3f'),
    Column('dx cos', 'input_cos', '.3f'),
    Column('dx rel err', 'input_rel_error', '.3f'),
    Column('dW cos (taps shared)', 'shared_weight_cos', '.3f'),
]

FILTER_NORM_COLUMNS = [
    Column('dW cos, +norm', 'filter_norm_weight_cos', '.3f'),
    Column('dW rel err, +norm', 'filter_norm_weight_rel_error', '.3f'),
    Column('dx cos, +norm', 'filter_norm_input_cos', '.3f'),
]

NORM_COLUMNS = [
    Column('BatchNorm', 'norm'), Column('after', 'layer'),
    Column('statistics', 'norm_stats'), Column('radius', 'radius'),
    Column('dgamma cos', 'norm_weight_cos', '.3f'),
    Column('dgamma |f|/|e|', 'norm_weight_ratio', '.3f'),
    Column('dbeta cos', 'norm_bias_cos', '.3f'),
    Column('dbeta |f|/|e|', 'norm_bias_ratio', '.3f'),
]

FIDELITY_LEGEND = '\n'.join([
    'filtered: the gradients GradFilterConv2d computes (what training '
    'uses); exact: PyTorch\'s conv backward of the same input and output '
    'gradient',
    'dW, dx: weight and input gradient; cos: cosine similarity (1: the same '
    'direction); rel err: |filtered - exact| / |exact|',
    'dW cos (taps shared): the paper\'s weight gradient, one value for all '
    'taps of a filter, where the taps fall in different patches',
    '-: not computed (dx: the layer\'s input needs no gradient; taps shared: '
    'the filtered dW is that one already)',
])

FILTER_NORM_LEGEND = '\n'.join([
    '+norm: the same conv behind a filtered BatchNorm (filter_norm=True), '
    'from the same BN output gradient; the columns without it are '
    'filter_norm=False (exact BN); both against the exact conv behind the '
    'exact BN',
    'dgamma, dbeta: the filtered BN\'s weight and bias gradients against the '
    'exact BN\'s; |f|/|e|: the ratio of their norms; statistics: batch '
    '(training mode) or running (eval mode, e.g. norm_eval=True)',
    '-: the conv feeds no BatchNorm that filter_norm would filter',
])


def fidelity_table(rows: Sequence[Dict], filter_norm: bool = False) -> Table:
    """:func:`measure_fidelity`'s results, printed and as CSV; with
    ``filter_norm``, the conv's figures behind the filtered BN too."""
    extra = FILTER_NORM_COLUMNS if filter_norm else []
    return Table(FIDELITY_COLUMNS + extra, [[
        r['layer'], 'x'.join(map(str, r['kernel_size'])),
        pair_label(r['dilation']), pair_label(r['radius']),
        *(r[m] for m in METRICS), *(r[c.name] for c in extra)
    ] for r in rows])


def norm_fidelity_table(rows: Sequence[Dict]) -> Table:
    """The filtered BatchNorms' gradients of :func:`measure_fidelity`'s
    rows (``filter_norm=True``), one per BN and radius."""
    return Table(NORM_COLUMNS, [[
        r['norm'], r['layer'], r['norm_stats'], pair_label(r['radius']),
        *(r[m] for m in NORM_METRICS)
    ] for r in rows if r['norm'] is not None])


def plot_fidelity(path: str, rows: Sequence[Dict], title: str) -> None:
    """Cosine of the filtered and exact weight gradients per layer and radius."""
    fig, ax = radius_bars(rows, 'layer', 'weight_cos')
    ax.set_ylim(min(0.0, *(r['weight_cos'] for r in rows)), 1.0)
    ax.set_ylabel('cosine, filtered vs exact weight gradient')
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
