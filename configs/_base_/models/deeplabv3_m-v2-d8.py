# DeepLabV3, MobileNetV2-D8 (MMSeg's m-v2-d8 backbone) as the authors train it:
# 128 head channels, no auxiliary head, no dropout, backbone BatchNorm
# statistics frozen.
_base_ = 'mmseg::_base_/models/deeplabv3_r50-d8.py'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='MobileNetV2',
        widen_factor=1.,
        strides=(1, 2, 2, 1, 1, 1, 1),
        dilations=(1, 1, 1, 2, 2, 4, 4),
        out_indices=(1, 2, 4, 6),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=True),
    decode_head=dict(in_channels=320, channels=128, dropout_ratio=0.0),
    auxiliary_head=None)
# ImageNet weights for calib (MMSeg's mmcls://mobilenet_v2, local; the
# MMPretrain checkpoint as released, its 'backbone.' keys are selected)
backbone_pretrained = dict(
    type='Pretrained',
    checkpoint='checkpoints/mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth',
    prefix='backbone.')

# The authors' recipes: calib trains the decoder; nL trains the last n conv
# layers (freeze_layers) and filters their gradient (filter_install)
calib_freeze = ['backbone']
layers_5L = dict(
    filter_install=[
        dict(path='decode_head.bottleneck', radius=3),
        dict(path='decode_head.aspp_modules.0', radius=3),
        dict(path='decode_head.aspp_modules.1', radius=3),
        dict(path='decode_head.aspp_modules.2', radius=6),
        dict(path='decode_head.aspp_modules.3', radius=9),
    ],
    freeze_layers=[
        'backbone', 'decode_head', '~decode_head.conv_seg',
        '~decode_head.bottleneck', '~decode_head.aspp_modules'
    ])
layers_10L = dict(
    filter_install=layers_5L['filter_install'] + [
        dict(path='backbone.layer7.0.conv', radius=3),
        dict(path='backbone.layer6.2.conv.2', radius=3),
    ],
    freeze_layers=layers_5L['freeze_layers'] +
    ['~backbone.layer7', '~backbone.layer6.2.conv.2'])
