# MMPretrain's ResNet-34 with BatchNorm in eval mode; its basic blocks from
# the last one backwards (both convs and the downsample conv of each) and its
# ImageNet weights (MMPretrain model zoo, downloaded once to this path).
_base_ = ['mmpretrain::_base_/models/resnet34.py']

model = dict(backbone=dict(norm_eval=True))
last_blocks = [
    'backbone.layer4.2', 'backbone.layer4.1', 'backbone.layer4.0',
    'backbone.layer3.5'
]
imagenet_init = dict(
    type='Pretrained',
    checkpoint='data/pretrained/resnet34_8xb32_in1k_20210831-f257d4e6.pth',
    prefix='backbone.')
