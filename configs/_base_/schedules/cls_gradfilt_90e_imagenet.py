# The authors' ImageNet recipe: SGD lr 0.05, momentum 0.9, 4 warm-up epochs
# then cosine decay to epoch 90, gradient clipping at norm 2.0.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=0),
    clip_grad=dict(max_norm=2.0))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.01,
        by_epoch=True,
        begin=0,
        end=4,
        convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=86, by_epoch=True, begin=4, end=90),
]

train_cfg = dict(by_epoch=True, max_epochs=90, val_interval=1)
val_cfg = dict()
test_cfg = dict()
