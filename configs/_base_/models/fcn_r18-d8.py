# FCN, ResNet18-V1c-D8 (MMSeg's r18-d8 settings) as the authors train it: no
# auxiliary head, no dropout, backbone BatchNorm statistics frozen.
_base_ = 'mmseg::_base_/models/fcn_r50-d8.py'
model = dict(
    pretrained=None,
    backbone=dict(depth=18, norm_eval=True),
    decode_head=dict(in_channels=512, channels=128, dropout_ratio=0.0),
    auxiliary_head=None)
# ImageNet weights for calib (MMSeg's open-mmlab://resnet18_v1c, local)
backbone_pretrained = dict(
    type='Pretrained', checkpoint='checkpoints/resnet18_v1c-b5776b93.pth')

# The authors' recipes: calib trains the classifier; nL trains the last n conv
# layers (freeze_layers) and filters their gradient (filter_install)
calib_freeze = ['backbone', 'decode_head', '~decode_head.conv_seg']
layers_5L = dict(
    filter_install=[
        dict(path='decode_head.conv_cat', radius=4),
        dict(path='decode_head.convs', radius=4),
        dict(path='backbone.layer4.1', radius=4),
    ],
    freeze_layers=['backbone', '~backbone.layer4.1'])
layers_10L = dict(
    filter_install=[
        dict(path='decode_head.conv_cat', radius=2),
        dict(path='decode_head.convs', radius=2),
        dict(path='backbone.layer4', radius=2),
        dict(path='backbone.layer3.1', radius=2),
    ],
    freeze_layers=['backbone', '~backbone.layer4', '~backbone.layer3.1'])
