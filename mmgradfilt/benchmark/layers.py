"""Single-layer latency suite: PyTorch's conv backward vs the filtered one."""
import json
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..layers import GradFilterConv2d
from ..report import Column, Table, write_json
from .flops import conv_backward_flops
from .tables import compared, ratio
from .timing import cuda_kernel_seconds, paired_ratio, summarize, timed


@dataclass(frozen=True)
class ConvShape:
    """One conv layer of the suite."""
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    size: int  # input height = width
    stride: int = 1
    dilation: int = 1
    groups: int = 1

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name == 'name':
                continue
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f'{field.name} must be a positive integer, '
                                 f'got {value!r}')
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f'groups ({self.groups}) must divide in_channels '
                             f'({self.in_channels}) and out_channels '
                             f'({self.out_channels})')

    def build(self) -> nn.Conv2d:
        padding = self.dilation * (self.kernel_size - 1) // 2
        return nn.Conv2d(self.in_channels, self.out_channels,
                         self.kernel_size, self.stride, padding,
                         self.dilation, self.groups, bias=False)


# layers of the paper's models: DeepLabV3 head (bottleneck, ASPP), ResNet-18
# layer3/4, MobileNetV2's last blocks (1x1 and depthwise)
LAYER_SUITE = [
    ConvShape('dense3x3 640-128 @64', 640, 128, 3, 64),
    ConvShape('aspp3x3 512-128 d12 @64', 512, 128, 3, 64, dilation=12),
    ConvShape('dense3x3 512-512 @32', 512, 512, 3, 32),
    ConvShape('dense3x3 256-256 @64', 256, 256, 3, 64),
    ConvShape('dense3x3 s2 256-512 @64', 256, 512, 3, 64, stride=2),
    ConvShape('pointwise 512-128 @64', 512, 128, 1, 64),
    ConvShape('pointwise 320-1280 @32', 320, 1280, 1, 32),
    ConvShape('depthwise3x3 960 @32', 960, 960, 3, 32, groups=960),
]


def load_layer_suite(path: Optional[str]) -> List[ConvShape]:
    """The built-in suite, or a JSON list of :class:`ConvShape` fields.

    Raises:
        ValueError: where the file is not such a list, naming the first entry
            that is not a valid layer and why.
    """
    if path is None:
        return list(LAYER_SUITE)
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list) or not items:
        raise ValueError(f'{path}: expected a non-empty JSON list of layers')
    shapes = []
    for i, item in enumerate(items):
        try:
            shapes.append(ConvShape(**item))
        except (TypeError, ValueError) as e:
            names = ', '.join(f.name for f in fields(ConvShape))
            raise ValueError(f'{path}, layer {i} {item!r}: {e} (fields: '
                             f'{names})') from None
    return shapes


def bench_layer(shape: ConvShape, radius: int, batch_size: int,
                device: torch.device, dtype: torch.dtype, iters: int,
                warmup: int) -> Dict:
    """Time forward (with gradients) and backward of one layer, both ways."""
    vanilla = shape.build().to(device, dtype)
    filtered = GradFilterConv2d.from_conv(vanilla, radius)
    x = torch.randn(batch_size, shape.in_channels, shape.size, shape.size,
                    device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(vanilla(x))
    result = dict(asdict(shape), radius=radius, batch_size=batch_size,
                  dtype=str(dtype).replace('torch.', ''))
    layers = dict(vanilla=vanilla, filtered=filtered)
    samples = {key: ([], []) for key in layers}
    holder = {}

    def forward(layer):
        holder['out'] = layer(x)

    def backward(layer):
        torch.autograd.backward(holder.pop('out'), grad_out,
                                inputs=[x, layer.weight])
        x.grad = layer.weight.grad = None

    def forward_backward(layer):
        forward(layer)
        backward(layer)

    # the two alternate, so that a slow spell of a shared machine hits both;
    # each timed run follows an untimed one of the same layer, as in training:
    # the allocator then holds what this layer freed, not what the other did
    # (after PyTorch's backward, the next forward of a conv can get fresh
    # pages to fault in, 20% of a 640->128 conv's time on this CPU)
    for i in range(warmup + iters):
        for key, layer in layers.items():
            forward_backward(layer)
            t_f = timed(partial(forward, layer), device)
            t_b = timed(partial(backward, layer), device)
            if i >= warmup:
                samples[key][0].append(t_f)
                samples[key][1].append(t_b)
    for key, layer in layers.items():
        fwd, bwd = samples[key]
        result[key] = dict(forward=summarize(fwd), backward=summarize(bwd),
                           backward_flops=conv_backward_flops(
                               layer, grad_out.shape,
                               None if key == 'vanilla' else (radius, ) * 2))
        if device.type == 'cuda':
            step_ms, forward_ms = (1e3 * cuda_kernel_seconds(fn, iters) for fn in (
                partial(forward_backward, layer), partial(forward, layer)))
            result[key]['backward_kernel_ms'] = step_ms - forward_ms
            result[key]['forward_kernel_ms'] = forward_ms
    van, fil = result['vanilla'], result['filtered']
    result['backward_speedup'] = paired_ratio(van['backward'], fil['backward'])
    result['forward_speedup'] = paired_ratio(van['forward'], fil['forward'])
    return result


def bench_layers(shapes: Sequence[ConvShape], radii: Sequence[int],
                 batch_size: int, device: torch.device, dtype: torch.dtype,
                 iters: int, warmup: int, json_path: str, env: Dict,
                 progress: Callable[[], None] = lambda: None) -> List[Dict]:
    """:func:`bench_layer` of every shape at every radius, each result
    written to ``json_path`` with those before it as it is measured
    (``complete`` False until the last one): a crash or Ctrl-C loses one
    layer at most."""
    results = []
    for shape in shapes:
        for radius in radii:
            results.append(bench_layer(shape, radius, batch_size, device,
                                       dtype, iters, warmup))
            write_json(json_path, dict(env=env, results=results,
                                       complete=False))
            progress()
    write_json(json_path, dict(env=env, results=results, complete=True))
    return results


def layer_table(results: Sequence[Dict]) -> Table:
    """Shape, radius, median times (ms) and vanilla/filtered ratios.

    CUDA runs add the summed kernel times (profiler) of both passes.
    """
    columns = [
        Column('layer', 'layer'), Column('r', 'radius'),
        *compared('fwd', 'forward', 'ms', '.3f', 'fwd speedup', 'speedup'),
        *compared('bwd', 'backward', 'ms', '.3f', 'bwd speedup', 'speedup'),
        Column('bwd FLOPs ratio', 'backward_flops_ratio_x', '.0f', 'x'),
    ]
    kernels = 'backward_kernel_ms' in results[0]['vanilla']
    if kernels:
        columns += [
            Column('fwd kernel speedup', 'forward_kernel_speedup_x', '.2f',
                   'x'),
            *compared('bwd kernel', 'backward_kernel', 'ms', '.4f',
                      'bwd kernel speedup', 'speedup'),
        ]
    rows = []
    for r in results:
        van, fil = r['vanilla'], r['filtered']
        row = [
            r['name'], r['radius'], van['forward']['median'],
            fil['forward']['median'], r['forward_speedup'],
            van['backward']['median'], fil['backward']['median'],
            r['backward_speedup'],
            ratio(van['backward_flops'], fil['backward_flops'])
        ]
        if kernels:
            row += [
                ratio(van['forward_kernel_ms'], fil['forward_kernel_ms']),
                van['backward_kernel_ms'], fil['backward_kernel_ms'],
                ratio(van['backward_kernel_ms'], fil['backward_kernel_ms'])
            ]
        rows.append(row)
    return Table(columns, rows)


def layer_legend(iters: int) -> str:
    """What the columns of :func:`layer_table` mean."""
    return '\n'.join([
        'vanilla:  nn.Conv2d, PyTorch\'s backward (exact gradients); '
        'filtered: GradFilterConv2d with r x r patches',
        f'ms: medians over {iters} timed runs of one forward (with '
        'gradients) or one backward (input and weight gradients)',
        'speedup, ratio: vanilla / filtered (for times, the median of the '
        'runs\' ratios); above 1 the filtered layer is faster or computes '
        'less',
        'bwd FLOPs: analytic, the input and weight gradients',
    ])
