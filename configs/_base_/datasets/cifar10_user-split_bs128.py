# CIFAR-10 split between two users: non-IID partitions of label-sorted shards
# (UserSplitDataset, 2 shards each, seeded). Training uses user 1's partition
# of the training set and validates on the same partition of the test set
# (the same classes); the pretrain configs switch both to partition 0.
# Images are upsampled to 224 for ImageNet-pretrained models. Local data
# only: put `cifar-10-batches-py` under `data_root`.
dataset_type = 'CIFAR10'
data_root = 'data/cifar10'
data_preprocessor = dict(
    num_classes=10,
    mean=[125.307, 122.961, 113.8575],
    std=[51.5865, 50.847, 51.255],
    to_rgb=False)

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='Resize', scale=(224, 224)),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='Resize', scale=(224, 224)),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=128,
    num_workers=4,
    dataset=dict(
        type='UserSplitDataset',
        partition=1,
        dataset=dict(
            type=dataset_type,
            data_root=data_root,
            split='train',
            download=False,
            pipeline=train_pipeline)),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    dataset=dict(
        type='UserSplitDataset',
        partition=1,
        dataset=dict(
            type=dataset_type,
            data_root=data_root,
            split='test',
            download=False,
            pipeline=test_pipeline)),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))

test_dataloader = val_dataloader
test_evaluator = val_evaluator
