# full: vanilla back-propagation through the whole model, from calib
_base_ = [
    '../_base_/models/pspnet_m-v2-d8.py',
    '../_base_/datasets/pascal_voc12_aug_b2.py',
    '../_base_/schedules/seg_finetune_20k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=21))
load_from = ('checkpoints/pspnet_m-v2-d8_calib_4xb2-5k_voc12aug-512x512/'
             'iter_5000.pth')
