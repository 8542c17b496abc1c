# filt10L: gradient filtering in the last 10 conv layers
_base_ = './upernet_r18_full_4xb2-20k_voc12aug-512x512.py'
custom_hooks = [dict(type='GradientFilterHook', **_base_.layers_10L)]
