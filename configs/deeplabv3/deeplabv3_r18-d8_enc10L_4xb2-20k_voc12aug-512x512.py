# enc10L: vanilla back-propagation through the last 10 conv layers
_base_ = './deeplabv3_r18-d8_full_4xb2-20k_voc12aug-512x512.py'
custom_hooks = [
    dict(
        type='GradientFilterHook',
        freeze_layers=_base_.layers_10L.freeze_layers)
]
