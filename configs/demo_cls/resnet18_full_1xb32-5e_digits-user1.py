# Demo, offline on a CPU in minutes: ResNet-18 fine-tuned for 5 epochs on
# user 1's share of scikit-learn's digits (64x64), all layers with vanilla
# backprop, from the checkpoint the pretrain config writes. The primitive of
# the base-last* / filt-last* demo variants; the recipe is the CIFAR one.
_base_ = [
    '../_base_/models/resnet18_gradfilt.py',
    '../_base_/datasets/digits_user-split_bs32.py',
    '../_base_/schedules/cls_gradfilt_50e_cifar.py', '../_base_/cls_runtime.py'
]

model = dict(head=dict(num_classes=10, topk=(1, )))
train_cfg = dict(max_epochs=5)
param_scheduler = dict(T_max=5, end=5)
default_hooks = dict(logger=dict(interval=10))
load_from = 'work_dirs/resnet18_pretrain_1xb32-10e_digits-user0/epoch_10.pth'
randomness = dict(seed=0)  # a reproducible demo, for every variant
