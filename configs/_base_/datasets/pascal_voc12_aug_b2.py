# Pascal VOC 2012 + SBD aug, 512x512 crops, 2 images per GPU (the authors';
# MMSeg's VOC configs use 4)
_base_ = 'mmseg::_base_/datasets/pascal_voc12_aug.py'
train_dataloader = dict(batch_size=2)
