import numpy as np
import pytest

pytest.importorskip('mmpretrain', reason='the datasets are MMPretrain ones')

from mmengine.registry import DefaultScope  # noqa: E402
from mmpretrain.registry import DATASETS  # noqa: E402

from mmgradfilt.datasets import (Digits, UserSplitDataset,  # noqa: E402
                                 make_user_split)


@pytest.fixture(autouse=True)
def mmpretrain_scope():
    """Build in mmpretrain's scope whatever scope an earlier test left."""
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        yield


def test_make_user_split_is_label_sorted_shards():
    labels = np.repeat(np.arange(10), 20)[np.random.default_rng(1).permutation(200)]
    part = make_user_split(labels, num_partitions=2, shards_per_partition=2,
                           seed=3)
    assert part.shape == (200, ) and np.bincount(part).tolist() == [100, 100]
    # 4 shards of 50 label-sorted samples: 2.5 classes each, so a partition
    # holds 5 or 6 classes, and all 10 labels are covered once
    classes = [set(labels[part == p]) for p in (0, 1)]
    assert all(5 <= len(c) <= 6 for c in classes)
    assert classes[0] | classes[1] == set(range(10))
    assert len(classes[0] & classes[1]) <= 2
    np.testing.assert_array_equal(
        part, make_user_split(labels, 2, 2, seed=3))
    assert any((make_user_split(labels, 2, 2, seed=s) != part).any()
               for s in range(4, 8))


def test_wrapper_from_seed_and_index_file(tmp_path):
    digits = dict(type='Digits', img_size=16)
    users = [DATASETS.build(dict(type='UserSplitDataset', dataset=digits,
                                 partition=p)) for p in (0, 1)]
    total = len(DATASETS.build(digits))
    assert len(users[0]) + len(users[1]) == total
    first = {users[0].get_data_info(i)['sample_idx'] for i in range(len(users[0]))}
    second = {users[1].get_data_info(i)['sample_idx'] for i in range(len(users[1]))}
    assert not first & second
    assert users[1].metainfo['classes'] == Digits.METAINFO['classes']
    item = users[1][0]
    assert item['img'].shape == (16, 16, 3)
    assert item['gt_label'] == users[1].get_cat_ids(0)[0]

    # an index file gives the same split as the seed it was made with
    labels = DATASETS.build(digits).get_gt_labels()
    path = tmp_path / 'split.npy'
    np.save(path, make_user_split(labels, seed=0))
    from_file = UserSplitDataset(digits, partition=1, index_file=str(path))
    np.testing.assert_array_equal(from_file.indices, users[1].indices)


def test_wrapper_pipeline_and_lazy_init():
    dataset = UserSplitDataset(
        dict(type='Digits', img_size=16, pipeline=[dict(type='PackInputs')]),
        partition=0, lazy_init=True)
    assert not dataset._fully_initialized
    packed = dataset[3]
    assert packed['inputs'].shape == (3, 16, 16)
    assert packed['data_samples'].gt_label.item() == dataset.get_cat_ids(3)[0]


def test_wrapper_errors(tmp_path):
    digits = dict(type='Digits', img_size=8)
    with pytest.raises(ValueError, match='partition must be in'):
        UserSplitDataset(digits, partition=2)
    with pytest.raises(FileNotFoundError, match='nope.npy'):
        UserSplitDataset(digits, index_file=str(tmp_path / 'nope.npy'))
    bad = tmp_path / 'bad.npy'
    np.save(bad, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match=r'shape \(5,\)'):
        UserSplitDataset(digits, index_file=str(bad))


def test_digits_split():
    train, test = Digits(split='train'), Digits(split='test', img_size=24)
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.25) < 0.01
    assert set(test.get_gt_labels()) == set(range(10))
    img = test.get_data_info(0)['img']
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    assert img.max() > 200 and img.min() == 0
