# scikit-learn's 8x8 handwritten digits upsampled to 64x64 (mmgradfilt's
# Digits dataset: ships with scikit-learn, nothing to download), split
# between two users as the CIFAR pieces: user 1's partition of the training
# split, validated on the same partition of the test split.
dataset_type = 'Digits'
data_preprocessor = dict(
    num_classes=10, mean=[78.0] * 3, std=[83.0] * 3, to_rgb=False)

train_pipeline = [
    dict(type='RandomCrop', crop_size=64, padding=4),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='PackInputs')]

train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type='UserSplitDataset',
        partition=1,
        dataset=dict(
            type=dataset_type,
            split='train',
            img_size=64,
            pipeline=train_pipeline)),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type='UserSplitDataset',
        partition=1,
        dataset=dict(
            type=dataset_type,
            split='test',
            img_size=64,
            pipeline=test_pipeline)),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))

test_dataloader = val_dataloader
test_evaluator = val_evaluator
