# PSPNet, MobileNetV2-D8 (MMSeg's m-v2-d8 backbone) as the authors train it:
# 128 head channels, no auxiliary head, no dropout, backbone BatchNorm
# statistics frozen.
_base_ = 'mmseg::_base_/models/pspnet_r50-d8.py'
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
# layers (freeze_layers) and filters their gradient (filter_install). The four
# pyramid-pooling convs see 1x1 to 6x6 maps: trained, not filtered.
calib_freeze = ['backbone']
layers_5L = dict(
    filter_install=[dict(path='decode_head.bottleneck', radius=4)],
    freeze_layers=['backbone'])
layers_10L = dict(
    filter_install=layers_5L['filter_install'] + [
        dict(path='backbone.layer7.0.conv', radius=4),
        dict(path='backbone.layer6.2.conv.2', radius=4),
        dict(path='backbone.layer6.2.conv.1', radius=4),
    ],
    freeze_layers=layers_5L['freeze_layers'] + [
        '~backbone.layer7', '~backbone.layer6.2.conv.2',
        '~backbone.layer6.2.conv.1'
    ])
