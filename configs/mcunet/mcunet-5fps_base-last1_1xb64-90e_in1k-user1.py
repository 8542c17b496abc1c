# Vanilla backprop on the last block and the head.
_base_ = ['./mcunet-5fps_full_1xb64-90e_in1k-user1.py']
from mmgradfilt.models.recipes import last_blocks_hook  # noqa: E402

custom_hooks = _base_.custom_hooks + [
    last_blocks_hook(_base_.last_blocks, num_blocks=1)
]
