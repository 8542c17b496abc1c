# ResNet-34 fine-tuned on user 1's CIFAR-100 partition, all layers with vanilla
# backprop, from the checkpoint its pretrain config writes. The primitive
# of the base-last* / filt-last* variants.
_base_ = [
    '../_base_/models/resnet34_gradfilt.py',
    '../_base_/datasets/cifar100_user-split_bs128.py',
    '../_base_/schedules/cls_gradfilt_50e_cifar.py', '../_base_/cls_runtime.py'
]

model = dict(head=dict(num_classes=100, topk=(1, )))
load_from = 'work_dirs/resnet34_pretrain_1xb128-50e_cifar100-user0/epoch_50.pth'
