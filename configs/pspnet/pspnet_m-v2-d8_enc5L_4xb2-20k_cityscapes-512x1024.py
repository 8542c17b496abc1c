# enc5L: vanilla back-propagation through the last 5 conv layers
_base_ = './pspnet_m-v2-d8_full_4xb2-20k_cityscapes-512x1024.py'
custom_hooks = [
    dict(
        type='GradientFilterHook',
        freeze_layers=_base_.layers_5L.freeze_layers)
]
