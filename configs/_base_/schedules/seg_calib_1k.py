# The authors' calibration schedule: MMSeg's SGD with poly decay, 1k iterations.
# The checkpoint goes to checkpoints/<config name>/iter_1000.pth, where the
# fine-tuning configs load it from.
_base_ = 'mmseg::_base_/schedules/schedule_20k.py'
calib_iters = 1000
param_scheduler = [
    dict(
        type='PolyLR',
        eta_min=1e-4,
        power=0.9,
        begin=0,
        end=calib_iters,
        by_epoch=False)
]
train_cfg = dict(max_iters=calib_iters, val_interval=calib_iters)
default_hooks = dict(
    checkpoint=dict(
        interval=calib_iters, max_keep_ckpts=1, out_dir='checkpoints'),
    pretrained_check=dict(type='PretrainedCheckHook'))
