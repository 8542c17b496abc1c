"""The offline digits segmentation demo data and its MMSeg dataset class."""
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

mmseg = pytest.importorskip('mmseg', reason='needs MMSegmentation')

from mmgradfilt.datasets import DigitsSegDataset, make_digits_seg  # noqa: E402

SPLITS = dict(train=('source', 6), shift_val=('target', 4))


def read_split(root, split):
    names = sorted(os.listdir(osp.join(root, 'img_dir', split)))
    imgs = [np.asarray(Image.open(osp.join(root, 'img_dir', split, n)))
            for n in names]
    labels = [np.asarray(Image.open(osp.join(root, 'ann_dir', split, n)))
              for n in names]
    return names, np.stack(imgs), np.stack(labels)


@pytest.fixture(scope='module')
def digits_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('digits_seg'))
    assert make_digits_seg(root, seed=0, size=48, splits=SPLITS) == dict(
        train=6, shift_val=4)
    return root


def test_layout_and_labels(digits_root):
    for split, (domain, num) in SPLITS.items():
        names, imgs, labels = read_split(digits_root, split)
        assert names == [f'{i:05d}.png' for i in range(num)]
        assert imgs.shape == (num, 48, 48, 3) and imgs.dtype == np.uint8
        assert labels.shape == (num, 48, 48) and labels.dtype == np.uint8
        assert labels.max() <= 10
        assert all((label > 0).any() for label in labels)  # a digit each
        # light digits; the target's canvases are brighter and coloured
        gray = imgs.mean(-1)
        digit, background = gray[labels > 0].mean(), gray[labels == 0].mean()
        assert digit > background + 50
        tint = imgs[labels == 0].std(-1).mean()  # spread over R, G, B
        if domain == 'source':
            assert background < 50 and tint < 10
        else:
            assert background > 50 and tint > 10


def test_deterministic_from_seed(digits_root, tmp_path):
    make_digits_seg(str(tmp_path / 'same'), seed=0, size=48, splits=SPLITS)
    make_digits_seg(str(tmp_path / 'other'), seed=1, size=48, splits=SPLITS)
    for split in SPLITS:
        _, imgs, labels = read_split(digits_root, split)
        _, same_imgs, same_labels = read_split(str(tmp_path / 'same'), split)
        _, other_imgs, _ = read_split(str(tmp_path / 'other'), split)
        assert np.array_equal(imgs, same_imgs)
        assert np.array_equal(labels, same_labels)
        assert not np.array_equal(imgs, other_imgs)


def test_dataset_class(digits_root):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    init_default_scope('mmseg')
    dataset = DATASETS.build(dict(
        type='DigitsSegDataset',
        data_root=digits_root,
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations'),
            dict(type='PackSegInputs')
        ]))
    assert isinstance(dataset, DigitsSegDataset)
    assert len(dataset) == 6
    assert dataset.metainfo['classes'][:2] == ('background', '0')
    assert len(dataset.metainfo['classes']) == 11
    item = dataset[0]
    assert item['inputs'].shape == (3, 48, 48)
    _, _, labels = read_split(digits_root, 'train')
    assert np.array_equal(item['data_samples'].gt_sem_seg.data[0].numpy(),
                          labels[0])


def test_missing_data_names_path_and_command(tmp_path):
    root = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError) as err:
        DigitsSegDataset(
            data_root=root,
            data_prefix=dict(
                img_path='img_dir/train', seg_map_path='ann_dir/train'))
    assert osp.join(root, 'img_dir/train') in str(err.value)
    assert 'tools/dataset_converters/digits_seg.py' in str(err.value)
