# filt5L: gradient filtering in the last 5 conv layers
_base_ = './deeplabv3_m-v2-d8_full_4xb2-20k_voc12aug-512x512.py'
custom_hooks = [dict(type='GradientFilterHook', **_base_.layers_5L)]
