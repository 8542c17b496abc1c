# Demo: ResNet-18 trained from scratch for 10 epochs on user 0's share of the
# digits, all layers, BatchNorm training: the checkpoint user 1 fine-tunes.
_base_ = ['./resnet18_full_1xb32-5e_digits-user1.py']

model = dict(backbone=dict(norm_eval=False))
optim_wrapper = dict(optimizer=dict(momentum=0.9, weight_decay=5e-4))
train_cfg = dict(max_epochs=10)
param_scheduler = dict(T_max=10, end=10)
load_from = None
train_dataloader = dict(dataset=dict(partition=0))
val_dataloader = dict(dataset=dict(partition=0))
test_dataloader = val_dataloader
