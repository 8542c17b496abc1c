# The authors' CIFAR recipe: SGD lr 0.05 without momentum, cosine decay over
# 50 epochs, gradient clipping at norm 2.0.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0, weight_decay=0),
    clip_grad=dict(max_norm=2.0))
param_scheduler = dict(
    type='CosineAnnealingLR', T_max=50, by_epoch=True, begin=0, end=50)

train_cfg = dict(by_epoch=True, max_epochs=50, val_interval=1)
val_cfg = dict()
test_cfg = dict()
