# Demo: vanilla backprop on the last 4 blocks and the head.
_base_ = ['./resnet18_full_1xb32-5e_digits-user1.py']
from mmgradfilt.models.recipes import last_blocks_hook  # noqa: E402

custom_hooks = _base_.custom_hooks + [
    last_blocks_hook(_base_.last_blocks, num_blocks=4)
]
