# MMPretrain's ResNet-18 with BatchNorm in eval mode; its basic blocks from
# the last one backwards (both convs and the downsample conv of each) and its
# ImageNet weights (MMPretrain model zoo, downloaded once to this path).
_base_ = ['mmpretrain::_base_/models/resnet18.py']

model = dict(backbone=dict(norm_eval=True))
last_blocks = [
    'backbone.layer4.1', 'backbone.layer4.0', 'backbone.layer3.1',
    'backbone.layer3.0'
]
imagenet_init = dict(
    type='Pretrained',
    checkpoint='data/pretrained/resnet18_8xb32_in1k_20210831-fbbb1da6.pth',
    prefix='backbone.')
