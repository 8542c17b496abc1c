# Demo step 1 (calib-like): train the tiny DeepLabV3 from scratch on the source
# domain; the checkpoint goes to
# checkpoints/deeplabv3_r18-tiny-d8_calib_1xb8-1k_digits-64x64/iter_1000.pth
_base_ = [
    '../_base_/models/deeplabv3_r18-tiny-d8.py',
    '../_base_/datasets/digits_seg.py',
    '../_base_/schedules/seg_calib_1k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (64, 64)
# From scratch: backbone BatchNorm statistics train; the head's convs get
# PyTorch's default init (with MMSeg's, conv_seg ~ N(0, 0.01), this model
# stayed stuck predicting background for 1k iterations); AdamW.
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_eval=False),
    decode_head=dict(
        num_classes=11,
        init_cfg=dict(
            type='Kaiming',
            layer='Conv2d',
            a=5**0.5,
            mode='fan_in',
            nonlinearity='leaky_relu',
            distribution='uniform')))
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=0.002, weight_decay=0.01))
randomness = dict(seed=0)  # a reproducible demo
