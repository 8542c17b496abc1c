# MMPretrain's MobileNetV2 with BatchNorm in eval mode; its blocks from the
# last one backwards (the 1x1 conv2, then InvertedResidual blocks) and its
# ImageNet weights (MMPretrain model zoo, downloaded once to this path).
_base_ = ['mmpretrain::_base_/models/mobilenet_v2_1x.py']

model = dict(backbone=dict(norm_eval=True))
last_blocks = [
    'backbone.conv2', 'backbone.layer7.0', 'backbone.layer6.2',
    'backbone.layer6.1'
]
imagenet_init = dict(
    type='Pretrained',
    checkpoint='data/pretrained/'
    'mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth',
    prefix='backbone.')
