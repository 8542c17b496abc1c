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
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_eval=False),  # from scratch: BatchNorm statistics train
    decode_head=dict(num_classes=11))
optim_wrapper = dict(optimizer=dict(lr=0.05))
