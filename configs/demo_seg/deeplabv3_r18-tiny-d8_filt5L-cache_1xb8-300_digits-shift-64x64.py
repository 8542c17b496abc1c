# Demo step 2 (filt5L + cache): filt5L trained from the frozen part's stored
# outputs (FrozenFeatureCacheHook) after the first pass over the data
_base_ = './deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64.py'
custom_hooks = _base_.custom_hooks + [
    dict(type='FrozenFeatureCacheHook', views=1, dtype='float16')
]
