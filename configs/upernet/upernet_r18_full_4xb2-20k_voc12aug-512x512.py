# full: vanilla back-propagation through the whole model, from calib
_base_ = [
    '../_base_/models/upernet_r18.py',
    '../_base_/datasets/pascal_voc12_aug_b2.py',
    '../_base_/schedules/seg_finetune_20k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=21))
# the authors' UPerNet weight decay
optim_wrapper = dict(optimizer=dict(weight_decay=0.0001))
load_from = ('checkpoints/upernet_r18_calib_4xb2-1k_voc12aug-512x512/'
             'iter_1000.pth')
