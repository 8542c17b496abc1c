# The calibration schedule of the MobileNetV2 models (the authors train their
# whole decoder, so 5k iterations)
_base_ = './seg_calib_1k.py'
calib_iters = 5000
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
default_hooks = dict(checkpoint=dict(interval=calib_iters))
