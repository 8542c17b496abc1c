"""Gradient fidelity: the filtered gradients of a model's convs against exact ones.

In training passes over real batches, the input and output gradient of every
gradient-filtered conv are recorded; the filtered input and weight gradients
of that input and output gradient (what training uses) are then compared with
the exact ones of the same input and output gradient: cosine similarity and
relative error. For convs whose taps fall in different patches (dilation of a
block or more, as in ASPP), the weight gradient that the paper shares between
all taps of a filter is compared too.
"""
import functools
import statistics
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import GradFilterConv2d
from ..ops.grad_filter_conv import grad_filter_conv2d, grid_conv
from ..report import Column, Table, pair_label, radius_bars, save_figure

METRICS = ('weight_cos', 'weight_rel_error', 'input_cos', 'input_rel_error',
           'shared_weight_cos')
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


class GradientRecorder:
    """Records, in training passes, the input and output gradient of every
    :class:`GradFilterConv2d` of ``model`` (the last pass's, by layer name)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, GradFilterConv2d)}
        self.records: Dict[str, Dict] = {}
        self._handles: List = []

    def _record(self, name: str, module: nn.Module, inputs: tuple,
                output: Tensor) -> None:
        if not output.requires_grad:
            return
        entry = self.records[name] = dict(
            input=inputs[0].detach(), input_grad=inputs[0].requires_grad)
        output.register_hook(
            lambda grad: entry.__setitem__('grad_out', grad.detach()))

    def __enter__(self) -> 'GradientRecorder':
        self._handles = [
            layer.register_forward_hook(functools.partial(self._record, name))
            for name, layer in self.layers.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def measure_fidelity(model: nn.Module, batches: Iterable[Dict],
                     radii: Optional[Sequence[int]] = None,
                     progress: Callable[[], None] = lambda: None
                     ) -> List[Dict]:
    """One row per filtered layer and radius: the layer's geometry and the
    means over ``batches`` (data loader batches of an OpenMMLab model) of
    :func:`layer_fidelity`.

    ``radii`` (default: each layer's own) are compared on the same recorded
    gradients. The input-gradient figures are None for a layer whose input
    needs no gradient (nothing upstream trains).
    """
    samples = defaultdict(list)
    with GradientRecorder(model) as recorder:
        for batch in batches:
            recorder.records.clear()
            data = model.data_preprocessor(batch, True)
            loss, _ = model.parse_losses(model(**data, mode='loss'))
            loss.backward()
            model.zero_grad(set_to_none=True)
            for name, rec in recorder.records.items():
                if 'grad_out' not in rec:  # its output did not reach the loss
                    continue
                layer = recorder.layers[name]
                x, grad_out = rec['input'], rec['grad_out']
                exact = exact_grads(layer, x, grad_out)
                pairs = [(r, r) for r in radii] if radii else [layer.radius]
                for radius in pairs:
                    result = layer_fidelity(layer, x, grad_out, radius, exact)
                    if not rec['input_grad']:
                        result['input_cos'] = result['input_rel_error'] = None
                    samples[name, radius].append(result)
            progress()
    rows = []
    for (name, radius), results in samples.items():
        layer = recorder.layers[name]
        rows.append(dict(
            layer=name, kernel_size=tuple(layer.kernel_size),
            stride=layer.stride, dilation=layer.dilation, radius=radius,
            batches=len(results),
            **{key: _mean([r[key] for r in results]) for key in METRICS}))
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


def fidelity_table(rows: Sequence[Dict]) -> Table:
    """:func:`measure_fidelity`'s results, printed and as CSV."""
    return Table(FIDELITY_COLUMNS, [[
        r['layer'], 'x'.join(map(str, r['kernel_size'])),
        pair_label(r['dilation']), pair_label(r['radius']),
        *(r[m] for m in METRICS)
    ] for r in rows])


def plot_fidelity(path: str, rows: Sequence[Dict], title: str) -> None:
    """Cosine of the filtered and exact weight gradients per layer and radius."""
    fig, ax = radius_bars(rows, 'layer', 'weight_cos')
    ax.set_ylim(min(0.0, *(r['weight_cos'] for r in rows)), 1.0)
    ax.set_ylabel('cosine, filtered vs exact weight gradient')
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
