"""MCUNet / ProxylessNAS backbone: MCUNet-5fps built in, or any net config of
the ``mcunet`` package's JSON format."""
import json
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from mmpretrain.registry import MODELS
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

_ACTIVATIONS = {
    None: None,
    'relu': dict(type='ReLU'),
    'relu6': dict(type='ReLU6'),
    'h_swish': dict(type='HSwish'),
}


def _act_cfg(name: Optional[str]) -> Optional[dict]:
    if name not in _ACTIVATIONS:
        raise ValueError(f'unsupported act_func {name!r}; supported: '
                         f'{", ".join(map(str, _ACTIVATIONS))}')
    return _ACTIVATIONS[name]


def _conv_layer(cfg: dict, norm_cfg: dict) -> ConvModule:
    """A ``ConvLayer`` of the net config as an MMCV ``ConvModule``."""
    if cfg.get('ops_order', 'weight_bn_act') != 'weight_bn_act':
        raise ValueError(f'unsupported ops_order {cfg["ops_order"]!r}')
    if cfg.get('dropout_rate', 0) or cfg.get('has_shuffle', False):
        raise ValueError('ConvLayer with dropout or channel shuffle is not '
                         'supported')
    kernel_size, dilation = cfg.get('kernel_size', 3), cfg.get('dilation', 1)
    return ConvModule(
        cfg['in_channels'],
        cfg['out_channels'],
        kernel_size,
        stride=cfg.get('stride', 1),
        padding=kernel_size // 2 * dilation,
        dilation=dilation,
        groups=cfg.get('groups', 1),
        bias=cfg.get('bias', False),
        norm_cfg=norm_cfg if cfg.get('use_bn', True) else None,
        act_cfg=_act_cfg(cfg.get('act_func', 'relu')))


class MBInvertedConv(nn.Module):
    """Expand (1x1), depthwise and project (1x1) convs of an MBConv block.

    The child names (``inverted_bottleneck``, ``depth_conv``,
    ``point_linear``) follow the ``mcunet`` package, so its checkpoints load.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Depthwise kernel size. Defaults to 3.
        stride (int): Depthwise stride. Defaults to 1.
        expand_ratio (float): Hidden channels over input channels, used when
            ``mid_channels`` is None. Defaults to 6.
        mid_channels (int, optional): Hidden channels. Defaults to None.
        act_func (str): Activation name. Defaults to 'relu6'.
        use_se (bool): Squeeze-excitation (not supported). Defaults to False.
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN')``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int = 3,
                 stride: int = 1,
                 expand_ratio: float = 6,
                 mid_channels: Optional[int] = None,
                 act_func: str = 'relu6',
                 use_se: bool = False,
                 norm_cfg: dict = dict(type='BN')  # noqa: B006 (only read)
                 ) -> None:
        super().__init__()
        if use_se:
            raise ValueError('MBInvertedConvLayer with use_se=True is not '
                             'supported')
        mid = mid_channels or round(in_channels * expand_ratio)
        act_cfg = _act_cfg(act_func)
        self.inverted_bottleneck = None if expand_ratio == 1 else ConvModule(
            in_channels, mid, 1, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.depth_conv = ConvModule(
            mid, mid, kernel_size, stride=stride, padding=kernel_size // 2,
            groups=mid, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.point_linear = ConvModule(
            mid, out_channels, 1, norm_cfg=norm_cfg, act_cfg=None)

    def forward(self, x: Tensor) -> Tensor:
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MBBlock(nn.Module):
    """A ``MobileInvertedResidualBlock``: an MBConv with optional identity.

    Args:
        mobile_inverted_conv (MBInvertedConv): The convs.
        with_shortcut (bool): Add the input to the output.
    """

    def __init__(self, mobile_inverted_conv: MBInvertedConv,
                 with_shortcut: bool) -> None:
        super().__init__()
        self.mobile_inverted_conv = mobile_inverted_conv
        self.with_shortcut = with_shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.mobile_inverted_conv(x)
        return out + x if self.with_shortcut else out


def load_net_config(net_config: str) -> dict:
    """Read a ``ProxylessNASNets`` net config JSON; a missing file says how
    to get one."""
    if not osp.isfile(net_config):
        raise FileNotFoundError(
            f'MCUNet net config "{net_config}" not found. Download it once '
            'from the mcunet model zoo (e.g. mcunet-5fps_imagenet.json, see '
            'mcunet.model_zoo.build_model in https://github.com/mit-han-lab/'
            'mcunet) and point `net_config` at the local file.')
    with open(net_config, encoding='utf-8') as f:
        cfg = json.load(f)
    if cfg.get('name', 'ProxylessNASNets') != 'ProxylessNASNets':
        raise ValueError(f'{net_config}: expected a ProxylessNASNets config, '
                         f'got {cfg["name"]!r}')
    return cfg


# Published architectures of the mcunet model zoo, the facts of their net
# configs (``mcunet-5fps_imagenet.json`` for ``mcunet-in1``, which the zoo
# downloads and mit-han-lab/tinyml keeps under mcunet/assets/configs), so that
# building them needs no file: the first conv's channels (3x3, stride 2), then
# per block (expand ratio, output channels, depthwise kernel, stride). Every
# conv has BN and ReLU6 but the project conv (BN only); no feature-mix conv.
ARCH_SETTINGS = {
    '5fps': dict(
        first_channels=16,
        blocks=[(1, 8, 3, 1), (4, 16, 3, 2), (3, 16, 3, 1), (3, 24, 7, 2),
                (5, 24, 3, 1), (5, 40, 3, 2), (4, 40, 7, 1), (4, 48, 5, 1),
                (3, 48, 3, 1), (4, 48, 3, 1), (5, 96, 7, 2), (4, 96, 5, 1),
                (4, 96, 5, 1), (6, 160, 3, 1)],
        resolution=96),
}


def arch_net_config(arch: str) -> dict:
    """The net config (``mcunet`` JSON format) of a built-in architecture.

    A block has an identity shortcut where its input and output have the same
    shape (stride 1, as many channels in as out), as in the published
    configs. Written with ``json.dump``, it is a file that ``MCUNet``'s
    ``net_config`` accepts.
    """
    if arch not in ARCH_SETTINGS:
        raise ValueError(f'unknown MCUNet arch {arch!r}; built in: '
                         f'{", ".join(ARCH_SETTINGS)} (or give a net_config)')
    setting = ARCH_SETTINGS[arch]
    channels = setting['first_channels']
    blocks = []
    for expand, out, kernel, stride in setting['blocks']:
        blocks.append(dict(
            name='MobileInvertedResidualBlock',
            mobile_inverted_conv=dict(
                name='MBInvertedConvLayer', in_channels=channels,
                out_channels=out, kernel_size=kernel, stride=stride,
                expand_ratio=expand, mid_channels=channels * expand,
                act_func='relu6', use_se=False),
            shortcut=dict(name='IdentityLayer') if stride == 1
            and channels == out else None))
        channels = out
    return dict(
        name='ProxylessNASNets',
        bn=dict(momentum=0.1, eps=1e-5),
        first_conv=dict(
            name='ConvLayer', in_channels=3,
            out_channels=setting['first_channels'], kernel_size=3, stride=2,
            act_func='relu6'),
        blocks=blocks,
        feature_mix_layer=None,
        resolution=setting['resolution'])


def _build_block(cfg: dict, norm_cfg: dict) -> MBBlock:
    conv_cfg = dict(cfg['mobile_inverted_conv'])
    if conv_cfg.pop('name', 'MBInvertedConvLayer') != 'MBInvertedConvLayer':
        raise ValueError('only MBInvertedConvLayer blocks are supported, got '
                         f'{cfg["mobile_inverted_conv"]}')
    shortcut = cfg.get('shortcut')
    if shortcut is not None and shortcut.get('name') != 'IdentityLayer':
        raise ValueError(f'only identity shortcuts are supported, got '
                         f'{shortcut}')
    return MBBlock(MBInvertedConv(**conv_cfg, norm_cfg=norm_cfg),
                   with_shortcut=shortcut is not None)


@MODELS.register_module()
class MCUNet(BaseBackbone):
    """MCUNet / ProxylessNAS backbone: a built-in architecture or a net config.

    Builds the network that ``mcunet.model_zoo.build_model`` builds (first
    conv, MBConv blocks, optional feature-mix conv; the classifier is left to
    the head), from the architecture ``arch`` defined here (no file needed)
    or from a local net config JSON, with the same parameter names, so the
    package's checkpoints (``{'state_dict': ...}``) load with
    ``init_cfg=dict(type='Pretrained', checkpoint=...)``; their
    ``classifier.*`` weights are ignored. Every conv sits in an MMCV
    ``ConvModule``; ``blocks.i`` holds one block's expand, depthwise and
    project convs, so a filter path such as ``backbone.blocks.13`` reaches
    all three.

    Args:
        arch (str): Built-in architecture, a key of ``ARCH_SETTINGS``:
            '5fps' is MCUNet-5fps (the model zoo's ``mcunet-in1``, 96x96
            input). Defaults to '5fps'.
        net_config (str, optional): Path of a net config JSON (``mcunet``
            format); when given, it is built instead of ``arch``. Defaults to
            None.
        out_indices (Sequence[int]): Outputs to return, indexing the blocks
            followed by the feature-mix conv when there is one. Defaults to
            (-1, ), the last feature map.
        norm_eval (bool): Keep BatchNorm layers in eval mode while training.
            Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization config.
            Defaults to None.
    """

    def __init__(self,
                 arch: str = '5fps',
                 net_config: Optional[str] = None,
                 out_indices: Sequence[int] = (-1, ),
                 norm_eval: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg)
        cfg = load_net_config(net_config) if net_config else \
            arch_net_config(arch)
        bn = cfg.get('bn') or dict(momentum=0.1, eps=1e-3)
        norm_cfg = dict(type='BN', momentum=bn['momentum'], eps=bn['eps'])
        self.first_conv = _conv_layer(cfg['first_conv'], norm_cfg)
        self.blocks = nn.ModuleList(
            _build_block(b, norm_cfg) for b in cfg['blocks'])
        mix = cfg.get('feature_mix_layer')
        self.feature_mix_layer = _conv_layer(mix, norm_cfg) if mix else None
        num_outs = len(self.blocks) + (self.feature_mix_layer is not None)
        self.out_indices = self._check_indices(out_indices, num_outs)
        self.norm_eval = norm_eval
        self.resolution = cfg.get('resolution')

    @staticmethod
    def _check_indices(indices: Sequence[int], num_outs: int) -> List[int]:
        out = []
        for index in indices:
            if not -num_outs <= index < num_outs:
                raise IndexError(f'out index {index} out of range for '
                                 f'{num_outs} outputs')
            out.append(index % num_outs)
        return out

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.first_conv(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        if self.feature_mix_layer is not None:
            outs.append(self.feature_mix_layer(x))
        return tuple(outs[i] for i in self.out_indices)

    def train(self, mode: bool = True) -> 'MCUNet':
        """Set train mode; BatchNorm stays in eval mode when ``norm_eval``."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
