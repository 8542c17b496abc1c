# calib: train the head on an ImageNet-pretrained backbone; the checkpoint
# goes to checkpoints/deeplabv3_r18-d8_calib_4xb2-1k_voc12aug-512x512/
_base_ = [
    '../_base_/models/deeplabv3_r18-d8.py',
    '../_base_/datasets/pascal_voc12_aug_b2.py',
    '../_base_/schedules/seg_calib_1k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=_base_.backbone_pretrained),
    decode_head=dict(num_classes=21))
custom_hooks = [
    dict(type='GradientFilterHook', freeze_layers=_base_.calib_freeze)
]
