# enc5L: vanilla back-propagation through the last 5 conv layers
_base_ = './upernet_r18_full_4xb2-20k_voc12aug-512x512.py'
custom_hooks = [
    dict(
        type='GradientFilterHook',
        freeze_layers=_base_.layers_5L.freeze_layers)
]
