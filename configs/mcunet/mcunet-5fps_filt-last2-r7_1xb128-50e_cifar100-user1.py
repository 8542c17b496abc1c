# Gradient filter (radius 7) on the last 2 blocks; the head as usual.
_base_ = ['./mcunet-5fps_full_1xb128-50e_cifar100-user1.py']
from mmgradfilt.models.recipes import last_blocks_hook  # noqa: E402

custom_hooks = _base_.custom_hooks + [
    last_blocks_hook(_base_.last_blocks, num_blocks=2, radius=7)
]
