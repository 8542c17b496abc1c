"""Views: seeded augmentation per (sample, view), the view sampler, loaders
with views and the dataset fingerprint."""
import itertools
import json
import os
import os.path as osp
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.dataset import BaseDataset, DefaultSampler, InfiniteSampler

from mmgradfilt.datasets import views as views_module
from mmgradfilt.datasets.views import (Skipped, SkippedBatch, ViewDataset,
                                       ViewSampler, dataset_fingerprint,
                                       with_views)

SEG_SPLITS = dict(train=('source', 6))
LOAD = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')]


@pytest.fixture(scope='module')
def seg_root(tmp_path_factory):
    pytest.importorskip('mmseg', reason='needs MMSegmentation')
    from mmgradfilt.datasets import make_digits_seg
    root = str(tmp_path_factory.mktemp('digits_seg'))
    make_digits_seg(root, seed=0, size=32, splits=SEG_SPLITS)
    return root


def seg_dataset(root, pipeline, **kwargs):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    init_default_scope('mmseg')
    return DATASETS.build(dict(
        type='DigitsSegDataset',
        data_root=root,
        data_prefix=dict(img_path='img_dir/train',
                         seg_map_path='ann_dir/train'),
        pipeline=pipeline,
        **kwargs))


def random_seg_dataset(root):
    return seg_dataset(root, LOAD + [
        dict(type='RandomCrop', crop_size=(16, 16)),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs')
    ])


def image_and_label(data):
    return data['inputs'], data['data_samples'].gt_sem_seg.data


def rng_states():
    return (random.getstate(), np.random.get_state()[1].copy(),
            torch.get_rng_state())


def assert_same_rng(before, after):
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])


def test_same_view_same_sample(seg_root):
    dataset = random_seg_dataset(seg_root)
    # the pipeline is random without views
    raw = [image_and_label(dataset[2]) for _ in range(4)]
    assert any(not torch.equal(raw[0][0], img) for img, _ in raw[1:])

    views = ViewDataset(dataset, views=4, seed=7)
    assert len(views) == len(dataset) == 6
    code = 2 * 4 + 1
    first = views[code]
    image, label = image_and_label(first)
    assert first['data_samples'].metainfo['cache_index'] == code
    again_image, again_label = image_and_label(views[code])
    assert torch.equal(image, again_image) and torch.equal(label, again_label)
    # a fresh wrapper with the same seed gives it too; another seed does not
    same = ViewDataset(random_seg_dataset(seg_root), views=4, seed=7)
    assert torch.equal(image_and_label(same[code])[0], image)
    other = ViewDataset(dataset, views=4, seed=8)
    assert not torch.equal(image_and_label(other[code])[0], image)

    # the four views of sample 2 are different augmented images
    images = [image_and_label(views[2 * 4 + v])[0] for v in range(4)]
    for a, b in itertools.combinations(images, 2):
        assert not torch.equal(a, b)

    # image and label come from the same crop and flip of the full sample
    full = seg_dataset(seg_root, LOAD + [dict(type='PackSegInputs')])[2]
    full_image, full_label = image_and_label(full)
    if first['data_samples'].metainfo['flip']:
        image, label = image.flip(-1), label.flip(-1)
    offsets = [(y, x) for y in range(17) for x in range(17)
               if torch.equal(full_image[:, y:y + 16, x:x + 16], image)]
    assert offsets
    y, x = offsets[0]
    assert torch.equal(full_label[:, y:y + 16, x:x + 16], label)


def test_global_rng_unchanged_and_deterministic_pipeline_unchanged(seg_root):
    dataset = random_seg_dataset(seg_root)
    views = ViewDataset(dataset, views=2, seed=0)
    torch.manual_seed(123)
    before = rng_states()
    views[3]
    assert_same_rng(before, rng_states())
    # a batch (PyTorch's loaders call __getitems__): the same items, the
    # marked code not loaded, the states restored
    items = views.__getitems__([3, -1 - 5, 4])
    assert_same_rng(before, rng_states())
    for item, code in zip([items[0], items[2]], [3, 4]):
        image, label = image_and_label(item)
        assert torch.equal(image, image_and_label(views[code])[0])
        assert torch.equal(label, image_and_label(views[code])[1])
        assert item['data_samples'].cache_index == code
    assert isinstance(items[1], Skipped) and items[1].code == 5

    plain = seg_dataset(seg_root, LOAD + [dict(type='PackSegInputs')])
    wrapped = ViewDataset(plain, views=1, seed=0)
    for idx in range(len(plain)):
        assert torch.equal(
            image_and_label(plain[idx])[0], image_and_label(wrapped[idx])[0])
        assert torch.equal(
            image_and_label(plain[idx])[1], image_and_label(wrapped[idx])[1])


def test_view_dataset_refuses_untaggable_items():
    with pytest.raises(TypeError, match='data_samples of type Tensor'):
        ViewDataset([dict(inputs=torch.zeros(1), data_samples=torch.ones(1))],
                    views=1, seed=0)[0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f'views .* got {bad!r}'):
            ViewDataset([], views=bad, seed=0)
    with pytest.raises(ValueError, match='seed .* got -3'):
        ViewSampler(range(3), views=1, seed=-3)


def test_view_sampler_views_1_is_the_wrapped_sequence():
    data = list(range(10))
    sampler = ViewSampler(DefaultSampler(data, shuffle=True, seed=3), 1, 5)
    reference = DefaultSampler(data, shuffle=True, seed=3)
    assert list(sampler) == list(reference)
    assert len(sampler) == 10
    first_epoch = list(sampler)
    sampler.set_epoch(1)  # delegated: the wrapped sampler reshuffles
    reference.set_epoch(1)
    assert list(sampler) == list(reference) != first_epoch


def test_view_sampler_draws_views_reproducibly():
    data = list(range(10))
    views = 3

    def epochs(sampler, first, last):
        draws = {}
        for epoch in range(first, last):
            sampler.set_epoch(epoch)
            draws[epoch] = list(sampler)
        return draws

    sampler = ViewSampler(DefaultSampler(data, shuffle=True, seed=0), views,
                          seed=1)
    draws = epochs(sampler, 0, 6)
    for epoch, codes in draws.items():
        order = DefaultSampler(data, shuffle=True, seed=0)
        order.set_epoch(epoch)
        assert [c // views for c in codes] == list(order)
    seen = {idx: [] for idx in data}
    for codes in draws.values():
        for code in codes:
            seen[code // views].append(code % views)
    # every 3 epochs each sample draws each of its 3 views once
    for drawn in seen.values():
        assert sorted(drawn[:3]) == sorted(drawn[3:]) == [0, 1, 2]
    assert len({tuple(d) for d in seen.values()}) > 1  # not one order for all
    # reproducible, and a run resumed at epoch 4 draws the same views
    again = ViewSampler(DefaultSampler(data, shuffle=True, seed=0), views, 1)
    assert epochs(again, 0, 6) == draws
    resumed = ViewSampler(DefaultSampler(data, shuffle=True, seed=0), views, 1)
    assert epochs(resumed, 4, 6) == {4: draws[4], 5: draws[5]}
    other = ViewSampler(DefaultSampler(data, shuffle=True, seed=0), views, 2)
    assert epochs(other, 0, 6) != draws
    # picklable
    copy = pickle.loads(pickle.dumps(sampler))
    assert list(copy) == list(sampler)


def test_view_sampler_infinite():
    data = list(range(5))
    sampler = ViewSampler(InfiniteSampler(data, shuffle=True, seed=0), 2, 0)
    codes = list(itertools.islice(iter(sampler), 20))
    plain = list(
        itertools.islice(iter(InfiniteSampler(data, shuffle=True, seed=0)),
                         20))
    assert [c // 2 for c in codes] == plain
    for idx in data:
        drawn = [c % 2 for c in codes if c // 2 == idx]
        assert len(drawn) == 4
        assert sorted(drawn[:2]) == sorted(drawn[2:]) == [0, 1]
    again = ViewSampler(InfiniteSampler(data, shuffle=True, seed=0), 2, 0)
    assert list(itertools.islice(iter(again), 20)) == codes


def digits_loader(sampler='DefaultSampler', **kwargs):
    pytest.importorskip('mmpretrain', reason='needs MMPretrain')
    import mmgradfilt.datasets  # noqa: F401  (registers Digits)
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope('mmpretrain')
    cfg = dict(
        batch_size=4,
        num_workers=0,
        sampler=dict(type=sampler, shuffle=True),
        dataset=dict(type='Digits', img_size=8, indices=14,
                     pipeline=[dict(type='PackInputs')]))
    cfg.update(kwargs)
    return Runner.build_dataloader(cfg, seed=0)


@pytest.mark.parametrize('sampler', ['DefaultSampler', 'InfiniteSampler'])
def test_with_views_1_equals_the_loader(sampler):
    loader = digits_loader(sampler)
    viewed = with_views(loader, views=1, seed=3)
    assert isinstance(viewed.sampler, ViewSampler)
    assert viewed.sampler.sampler is loader.sampler
    # both loaders share the sampler: the new one first, then the old one
    new = list(itertools.islice(iter(viewed), 4))
    if sampler == 'InfiniteSampler':  # the shared stream went on: a fresh one
        loader = digits_loader(sampler)
    old = list(itertools.islice(iter(loader), 4))
    assert len(new) == len(old) == 4
    for new_batch, old_batch in zip(new, old):
        for a, b in zip(new_batch['inputs'], old_batch['inputs']):
            assert torch.equal(a, b)
        for a, b in zip(new_batch['data_samples'],
                        old_batch['data_samples']):
            assert torch.equal(a.gt_label, b.gt_label)
            assert a.cache_index == a.sample_idx == b.sample_idx
    if sampler == 'DefaultSampler':
        assert [len(b['inputs']) for b in new] == [4, 4, 4, 2]


@pytest.mark.parametrize('num_workers', [0, 1])
def test_with_views_skips_batches_all_cached(num_workers):
    loader = digits_loader(num_workers=num_workers)
    codes = [[s.cache_index for s in batch['data_samples']]
             for batch in with_views(loader, views=1, seed=0)]
    assert [len(c) for c in codes] == [4, 4, 4, 2]
    # batches 0 and 2 cached, and one sample of batch 1: it is loaded
    cached = set(codes[0] + codes[2] + codes[1][:1])
    loaded = []
    if num_workers == 0:  # count what the pipeline really sees
        prepare = loader.dataset.prepare_data
        loader.dataset.prepare_data = lambda i: loaded.append(i) or prepare(i)
    viewed = with_views(loader, views=1, seed=0,
                        is_cached=lambda code: code in cached)
    batches = list(viewed)
    for j in (0, 2):
        assert type(batches[j]) is SkippedBatch
        assert batches[j] == dict(codes=codes[j])
    for j in (1, 3):
        assert set(batches[j]) == {'inputs', 'data_samples'}
        assert [s.cache_index for s in batches[j]['data_samples']] == codes[j]
    if num_workers == 0:
        assert sorted(loaded) == sorted(codes[1] + codes[3])
    with pytest.raises(RuntimeError, match='mixes skipped and loaded'):
        viewed.collate_fn([Skipped(0), viewed.dataset[1]])


def test_with_views_keeps_loader_settings():
    loader = digits_loader(
        num_workers=2, persistent_workers=True, prefetch_factor=3,
        drop_last=True, pin_memory=False)
    viewed = with_views(loader, views=2, seed=0)
    for name in ('batch_size', 'drop_last', 'num_workers', 'collate_fn',
                 'worker_init_fn', 'persistent_workers', 'pin_memory',
                 'generator', 'prefetch_factor', 'timeout'):
        assert getattr(viewed, name) == getattr(loader, name), name
    assert viewed.dataset.dataset is loader.dataset
    assert viewed.dataset.metainfo == loader.dataset.metainfo
    assert len(viewed) == len(loader) == 3


def test_fingerprint(seg_root, tmp_path):
    seg_root = shutil.copytree(seg_root, str(tmp_path / 'data'))
    dataset = seg_dataset(seg_root, LOAD)
    first = dataset_fingerprint(dataset)
    # a new object, no pipeline: the same (the pipeline is not covered)
    assert dataset_fingerprint(seg_dataset(seg_root, [])) == first
    # the same in another process (views.py alone: a quick start)
    ann_file = str(tmp_path / 'ann.json')
    with open(ann_file, 'w') as f:
        json.dump(dict(metainfo={}, data_list=[
            dict(img_path=dataset.get_data_info(i)['img_path'], label=i)
            for i in range(3)]), f)
    code = ('import importlib.util, sys; '
            'from mmengine.dataset import BaseDataset; '
            'spec = importlib.util.spec_from_file_location("v", sys.argv[1]); '
            'views = importlib.util.module_from_spec(spec); '
            'spec.loader.exec_module(views); '
            'dataset = BaseDataset(ann_file=sys.argv[2]); '
            'print(views.dataset_fingerprint(dataset))')
    out = subprocess.run(
        [sys.executable, '-c', code, views_module.__file__, ann_file],
        capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == dataset_fingerprint(
        BaseDataset(ann_file=ann_file))

    # the list changes: a subset, a wrapper
    assert dataset_fingerprint(seg_dataset(seg_root, LOAD, indices=5)) != first
    assert dataset_fingerprint(torch.utils.data.Subset(dataset, [0, 1])) != \
        dataset_fingerprint(torch.utils.data.Subset(dataset, [0, 2]))
    # a file's modification time changes
    path = osp.join(seg_root, 'ann_dir', 'train', '00003.png')
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    moved = dataset_fingerprint(seg_dataset(seg_root, LOAD))
    assert moved != first
    # its size changes, the modification time kept
    with open(path, 'ab') as f:
        f.write(b'\0')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dataset_fingerprint(seg_dataset(seg_root, LOAD)) != moved
