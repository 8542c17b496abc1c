# Runtime of the classification configs: MMPretrain's, plus mmgradfilt and a
# check that the checkpoints a run loads exist before it starts.
_base_ = ['mmpretrain::_base_/default_runtime.py']

custom_imports = dict(imports=['mmgradfilt'], allow_failed_imports=False)
default_hooks = dict(
    logger=dict(interval=50),
    # keep the last epoch only: fine-tuning configs load it
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1))
custom_hooks = [
    dict(
        type='PretrainedCheckHook',
        hint='A fine-tuning config (user1) loads the checkpoint its '
        '*_pretrain_*-user0 config writes: train that one first. ImageNet '
        'weights: see docs/classification.md, "Local files".')
]
