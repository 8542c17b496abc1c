# ImageNet split between two users: non-IID partitions of label-sorted shards
# (UserSplitDataset, 2 shards each, seeded). Training uses user 1's partition
# of the training set and validates on the same partition of the validation
# set (about the same classes: the shards cut both label-sorted lists at the
# same fractions); the pretrain configs switch both to partition 0. Local
# data only, in MMPretrain's layout (data/imagenet/{train,val,meta}).
dataset_type = 'ImageNet'
data_root = 'data/imagenet'
data_preprocessor = dict(
    num_classes=1000,
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=64,
    num_workers=5,
    dataset=dict(
        type='UserSplitDataset',
        partition=1,
        dataset=dict(
            type=dataset_type,
            data_root=data_root,
            ann_file='meta/train.txt',
            data_prefix='train',
            pipeline=train_pipeline)),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=64,
    num_workers=5,
    dataset=dict(
        type='UserSplitDataset',
        partition=1,
        dataset=dict(
            type=dataset_type,
            data_root=data_root,
            ann_file='meta/val.txt',
            data_prefix='val',
            pipeline=test_pipeline)),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, 5))

test_dataloader = val_dataloader
test_evaluator = val_evaluator
