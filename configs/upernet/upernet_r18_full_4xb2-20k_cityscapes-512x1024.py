# full: vanilla back-propagation through the whole model, from calib
_base_ = [
    '../_base_/models/upernet_r18.py',
    'mmseg::_base_/datasets/cityscapes.py',
    '../_base_/schedules/seg_finetune_20k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=19))
# the authors' UPerNet weight decay
optim_wrapper = dict(optimizer=dict(weight_decay=0.0001))
load_from = ('checkpoints/upernet_r18_calib_4xb2-1k_cityscapes-512x1024/'
             'iter_1000.pth')
