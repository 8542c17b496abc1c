# Demo step 2 (filt5L): gradient filtering in the last 5 conv layers
_base_ = './deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64.py'
custom_hooks = [dict(type='GradientFilterHook', **_base_.layers_5L)]
