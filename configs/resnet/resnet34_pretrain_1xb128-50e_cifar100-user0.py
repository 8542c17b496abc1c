# ResNet-34 pretrained on user 0's CIFAR-100 partition from its ImageNet
# weights, all layers: the checkpoint user 1's configs fine-tune.
_base_ = ['./resnet34_full_1xb128-50e_cifar100-user1.py']

# BatchNorm trains here: this is ordinary training, not on-device
model = dict(
    backbone=dict(norm_eval=False, init_cfg=_base_.imagenet_init))
load_from = None
train_dataloader = dict(dataset=dict(partition=0))
val_dataloader = dict(dataset=dict(partition=0))
test_dataloader = val_dataloader
