"""Single-layer latency suite: PyTorch's conv backward vs the filtered one."""
import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..layers import GradFilterConv2d
from .flops import conv_backward_flops
from .timing import summarize, timed


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
    """The built-in suite, or a JSON list of :class:`ConvShape` fields."""
    if path is None:
        return list(LAYER_SUITE)
    with open(path) as f:
        return [ConvShape(**item) for item in json.load(f)]


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
    for key, layer in (('vanilla', vanilla), ('filtered', filtered)):
        fwd, bwd = [], []
        for i in range(warmup + iters):
            holder = {}
            t_f = timed(lambda: holder.update(out=layer(x)), device)
            t_b = timed(lambda: torch.autograd.backward(
                holder['out'], grad_out, inputs=[x, layer.weight]), device)
            x.grad = layer.weight.grad = None
            if i >= warmup:
                fwd.append(t_f)
                bwd.append(t_b)
        result[key] = dict(forward=summarize(fwd), backward=summarize(bwd),
                           backward_flops=conv_backward_flops(
                               layer, grad_out.shape,
                               None if key == 'vanilla' else (radius, ) * 2))
    result['backward_speedup'] = (result['vanilla']['backward']['median'] /
                                  result['filtered']['backward']['median'])
    result['forward_ratio'] = (result['filtered']['forward']['median'] /
                               result['vanilla']['forward']['median'])
    return result


def layer_rows(results: Sequence[Dict]) -> List[List[str]]:
    """Table rows: shape, radius, medians (ms) and ratios."""
    return [[
        r['name'], r['radius'], f"{r['vanilla']['forward']['median']:.2f}",
        f"{r['filtered']['forward']['median']:.2f}",
        f"{r['forward_ratio']:.2f}x",
        f"{r['vanilla']['backward']['median']:.2f}",
        f"{r['filtered']['backward']['median']:.2f}",
        f"{r['backward_speedup']:.1f}x",
        f"{r['vanilla']['backward_flops'] / r['filtered']['backward_flops']:.0f}x"
    ] for r in results]


LAYER_HEADERS = [
    'layer', 'r', 'fwd ms', 'fwd ms (filt)', 'fwd ratio', 'bwd ms',
    'bwd ms (filt)', 'bwd speedup', 'bwd FLOPs cut'
]
