# MCUNet-5fps (mcunet package's `mcunet-in1`, the authors' model) built by
# mmgradfilt's MCUNet backbone from its architecture defined in mmgradfilt
# (arch='5fps': no net config file needed; `net_config='<file>.json'` builds
# another one); its MBConv blocks from the last one backwards (expand,
# depthwise and project conv of each) and its ImageNet weights, a local copy
# of the mcunet model zoo's mcunet-5fps_imagenet.pth, downloaded once.
model = dict(
    type='ImageClassifier',
    backbone=dict(type='MCUNet', arch='5fps', norm_eval=True),
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
