# CIFAR-100 split between two users, as the CIFAR-10 piece. Local data only:
# put `cifar-100-python` under `data_root`.
_base_ = ['./cifar10_user-split_bs128.py']

dataset_type = 'CIFAR100'
data_root = 'data/cifar100'
data_preprocessor = dict(
    num_classes=100,
    mean=[129.304, 124.070, 112.434],
    std=[68.170, 65.392, 70.418])
train_dataloader = dict(
    dataset=dict(dataset=dict(type=dataset_type, data_root=data_root)))
val_dataloader = dict(
    dataset=dict(dataset=dict(type=dataset_type, data_root=data_root)))
test_dataloader = val_dataloader
