# MobileNetV2 fine-tuned on user 1's ImageNet partition, all layers with vanilla
# backprop, from the checkpoint its pretrain config writes. The primitive
# of the base-last* / filt-last* variants.
_base_ = [
    '../_base_/models/mobilenet-v2_gradfilt.py',
    '../_base_/datasets/imagenet_user-split_bs64.py',
    '../_base_/schedules/cls_gradfilt_90e_imagenet.py', '../_base_/cls_runtime.py'
]

load_from = 'work_dirs/mobilenet-v2_pretrain_1xb64-90e_in1k-user0/epoch_90.pth'
