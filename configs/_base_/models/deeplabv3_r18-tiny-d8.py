# A quarter-width DeepLabV3-R18-D8 (16 to 128 channels) for the offline CPU
# demo. Same module names as the full-size model, so its recipes (calib_freeze,
# layers_5L, layers_10L) apply to the same layers; trained from scratch, so no
# pretrained backbone. 64x64 inputs give 8x8 feature maps: ASPP rates
# (1, 2, 3, 4) instead of (1, 12, 24, 36), whose taps would all fall outside.
_base_ = './deeplabv3_r18-d8.py'
model = dict(
    backbone=dict(stem_channels=16, base_channels=16),
    decode_head=dict(in_channels=128, channels=32, dilations=(1, 2, 3, 4)))
backbone_pretrained = None
# The same layers, radius 2 (a 4x4 patch grid on the 8x8 maps) instead of the
# radii for 64x64 maps
layers_5L = dict(filter_install=[
    dict(path=item['path'], radius=2)
    for item in _base_.layers_5L.filter_install
])
layers_10L = dict(filter_install=[
    dict(path=item['path'], radius=2)
    for item in _base_.layers_10L.filter_install
])
