# MobileNetV2 fine-tuned on user 1's CIFAR-10 partition, all layers with vanilla
# backprop, from the checkpoint its pretrain config writes. The primitive
# of the base-last* / filt-last* variants.
_base_ = [
    '../_base_/models/mobilenet-v2_gradfilt.py',
    '../_base_/datasets/cifar10_user-split_bs128.py',
    '../_base_/schedules/cls_gradfilt_50e_cifar.py', '../_base_/cls_runtime.py'
]

model = dict(head=dict(num_classes=10, topk=(1, )))
load_from = 'work_dirs/mobilenet-v2_pretrain_1xb128-50e_cifar10-user0/epoch_50.pth'
