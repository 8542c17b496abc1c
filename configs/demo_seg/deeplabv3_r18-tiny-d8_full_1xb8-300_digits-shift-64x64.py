# Demo step 2 (full): adapt the calib model to the shifted domain
# (shift_train / shift_val) with vanilla back-propagation through all layers;
# the enc5L / filt5L demo configs change only which layers train and how
_base_ = [
    '../_base_/models/deeplabv3_r18-tiny-d8.py',
    '../_base_/datasets/digits_seg.py',
    '../_base_/schedules/seg_finetune_20k.py',
    '../_base_/seg_runtime.py',
]
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=11))
train_dataloader = dict(
    dataset=dict(
        data_prefix=dict(
            img_path='img_dir/shift_train', seg_map_path='ann_dir/shift_train')))
val_dataloader = dict(
    dataset=dict(
        data_prefix=dict(
            img_path='img_dir/shift_val', seg_map_path='ann_dir/shift_val')))
test_dataloader = val_dataloader
# the fine-tuning schedule, shortened to 300 iterations
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, begin=0, end=50, by_epoch=False),
    dict(
        type='CosineAnnealingLR', eta_min=1e-4, begin=50, end=300,
        by_epoch=False)
]
train_cfg = dict(max_iters=300, val_interval=300)
default_hooks = dict(
    logger=dict(interval=25), checkpoint=dict(interval=300))
load_from = ('checkpoints/deeplabv3_r18-tiny-d8_calib_1xb8-1k_digits-64x64/'
             'iter_1000.pth')
randomness = dict(seed=0)  # a reproducible demo
