# filt5L: gradient filtering in the last 5 conv layers
_base_ = './fcn_r18-d8_full_4xb2-20k_cityscapes-512x1024.py'
custom_hooks = [dict(type='GradientFilterHook', **_base_.layers_5L)]
