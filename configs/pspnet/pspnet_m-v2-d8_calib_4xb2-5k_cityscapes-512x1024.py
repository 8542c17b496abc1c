# calib: train the head on an ImageNet-pretrained backbone; the checkpoint
# goes to checkpoints/pspnet_m-v2-d8_calib_4xb2-5k_cityscapes-512x1024/
_base_ = [
    '../_base_/models/pspnet_m-v2-d8.py',
    'mmseg::_base_/datasets/cityscapes.py',
    '../_base_/schedules/seg_calib_5k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=_base_.backbone_pretrained),
    decode_head=dict(num_classes=19))
custom_hooks = [
    dict(type='GradientFilterHook', freeze_layers=_base_.calib_freeze)
]
