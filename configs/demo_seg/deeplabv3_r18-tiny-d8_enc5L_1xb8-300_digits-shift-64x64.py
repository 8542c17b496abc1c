# Demo step 2 (enc5L): vanilla back-propagation through the last 5 conv layers
_base_ = './deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64.py'
custom_hooks = [
    dict(
        type='GradientFilterHook',
        freeze_layers=_base_.layers_5L.freeze_layers)
]
