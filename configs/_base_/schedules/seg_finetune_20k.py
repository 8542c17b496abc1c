# The authors' fine-tuning schedule: SGD (MMSeg's 20k settings), a 1k-iteration
# linear warm-up from 0.1x, then cosine annealing to 1e-4, gradient clipping at
# norm 1. Fine-tuning starts from the calib checkpoint (load_from).
_base_ = 'mmseg::_base_/schedules/schedule_20k.py'
optim_wrapper = dict(clip_grad=dict(_delete_=True, max_norm=1, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, begin=0, end=1000, by_epoch=False),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-4,
        begin=1000,
        end=20000,
        by_epoch=False)
]
default_hooks = dict(pretrained_check=dict(type='PretrainedCheckHook'))
