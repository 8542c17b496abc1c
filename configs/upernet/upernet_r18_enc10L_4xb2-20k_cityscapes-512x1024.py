# enc10L: vanilla back-propagation through the last 10 conv layers
_base_ = './upernet_r18_full_4xb2-20k_cityscapes-512x1024.py'
custom_hooks = [
    dict(
        type='GradientFilterHook',
        freeze_layers=_base_.layers_10L.freeze_layers)
]
