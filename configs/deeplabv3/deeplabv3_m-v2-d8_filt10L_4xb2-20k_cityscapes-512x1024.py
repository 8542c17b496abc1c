# filt10L: gradient filtering in the last 10 conv layers
_base_ = './deeplabv3_m-v2-d8_full_4xb2-20k_cityscapes-512x1024.py'
custom_hooks = [dict(type='GradientFilterHook', **_base_.layers_10L)]
