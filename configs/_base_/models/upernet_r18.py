# UPerNet, ResNet18-V1c (MMSeg's upernet_r18 settings) as the authors train
# it: no auxiliary head, no dropout, backbone BatchNorm statistics frozen.
_base_ = 'mmseg::_base_/models/upernet_r50.py'
model = dict(
    pretrained=None,
    backbone=dict(depth=18, norm_eval=True),
    decode_head=dict(in_channels=[64, 128, 256, 512], dropout_ratio=0.0),
    auxiliary_head=None)
# ImageNet weights for calib (MMSeg's open-mmlab://resnet18_v1c, local)
backbone_pretrained = dict(
    type='Pretrained', checkpoint='checkpoints/resnet18_v1c-b5776b93.pth')

# The authors' recipes: calib trains the classifier; nL trains the last n conv
# layers (freeze_layers) and filters their gradient (filter_install), with a
# radius per FPN level (strides 4/8/16/32). 10L also trains the 1x1 and 2x2
# pyramid-pooling convs, unfiltered.
calib_freeze = ['backbone', 'decode_head', '~decode_head.conv_seg']
layers_5L = dict(
    filter_install=[
        dict(path='decode_head.fpn_bottleneck', radius=8),
        dict(path='decode_head.fpn_convs.0', radius=8),
        dict(path='decode_head.fpn_convs.1', radius=4),
        dict(path='decode_head.fpn_convs.2', radius=2),
        dict(path='decode_head.bottleneck', radius=2),
    ],
    freeze_layers=[
        'backbone', 'decode_head', '~decode_head.conv_seg',
        '~decode_head.fpn_bottleneck', '~decode_head.fpn_convs',
        '~decode_head.bottleneck'
    ])
layers_10L = dict(
    filter_install=layers_5L['filter_install'] + [
        dict(path='decode_head.lateral_convs.0', radius=8),
        dict(path='decode_head.lateral_convs.1', radius=4),
        dict(path='decode_head.lateral_convs.2', radius=2),
    ],
    freeze_layers=layers_5L['freeze_layers'] + [
        '~decode_head.lateral_convs', '~decode_head.psp_modules.0',
        '~decode_head.psp_modules.1'
    ])
