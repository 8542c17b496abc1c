# MCUNet-5fps (mcunet package's `mcunet-in1`, the authors' model) built by
# mmgradfilt's MCUNet backbone from its local net config; its MBConv blocks
# from the last one backwards (expand, depthwise and project conv of each)
# and its ImageNet weights. Both files come from the mcunet model zoo
# (mcunet-5fps_imagenet.json / .pth), downloaded once to these paths.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='MCUNet',
        net_config='data/pretrained/mcunet-5fps_imagenet.json',
        norm_eval=True),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=160,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5),
    ))
last_blocks = [f'backbone.blocks.{i}' for i in (13, 12, 11, 10)]
# parameter names match the mcunet package: no prefix to strip
imagenet_init = dict(
    type='Pretrained', checkpoint='data/pretrained/mcunet-5fps_imagenet.pth')
