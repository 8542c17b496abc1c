# MCUNet-5fps pretrained on user 0's CIFAR-10 partition from its ImageNet
# weights, all layers: the checkpoint user 1's configs fine-tune.
_base_ = ['./mcunet-5fps_full_1xb128-50e_cifar10-user1.py']

# BatchNorm trains here: this is ordinary training, not on-device
model = dict(
    backbone=dict(norm_eval=False, init_cfg=_base_.imagenet_init))
load_from = None
train_dataloader = dict(dataset=dict(partition=0))
val_dataloader = dict(dataset=dict(partition=0))
test_dataloader = val_dataloader
