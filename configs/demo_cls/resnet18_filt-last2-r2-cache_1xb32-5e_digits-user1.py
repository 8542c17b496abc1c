# Demo: filt-last2-r2 trained from the frozen part's stored outputs
# (FrozenFeatureCacheHook, one view of the random crop per sample) after the
# first epoch
_base_ = ['./resnet18_filt-last2-r2_1xb32-5e_digits-user1.py']
custom_hooks = _base_.custom_hooks + [
    dict(type='FrozenFeatureCacheHook', views=1, dtype='float16')
]
