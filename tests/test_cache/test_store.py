"""FeatureStore: roundtrips per dtype, validity, reuse, failures, processes."""
import errno
import logging
import multiprocessing as mp
import os
import os.path as osp

import numpy as np
import pytest
import torch

from mmgradfilt.cache import FeatureStore
from mmgradfilt.cache import store as store_module

SPECS = [((4, 3, 5), torch.float32), ((6, ), torch.float32)]
KEY = dict(weights='abc', pipeline='p1', dtype='float16')


def entry(seed, specs=SPECS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) * (1 + seed)
            for shape, dtype in specs]


@pytest.fixture
def logs(monkeypatch):
    """The store's log lines as (level, message)."""
    lines = []
    monkeypatch.setattr(store_module, 'print_log',
                        lambda msg, logger, level: lines.append((level, msg)))
    return lines


def make(root, **kwargs):
    args = dict(key=KEY, specs=SPECS, capacity=8, dtype='float32',
                max_memory_mb=64)
    args.update(kwargs)
    return FeatureStore(str(root), **args)


def test_float32_roundtrip_exact(tmp_path):
    store = make(tmp_path, max_memory_mb=1e-9)  # nothing fits in RAM
    tensors = entry(0)
    assert store.put(3, tensors)
    assert store.ram_bytes == 0
    got = store.get(3)
    assert [g.dtype for g in got] == [torch.float32] * 2
    for g, t in zip(got, tensors):
        assert torch.equal(g, t)
    batch = store.get_batch([3, 3])
    assert batch[0].shape == (2, 4, 3, 5) and torch.equal(batch[1][1],
                                                          tensors[1])


def test_float16_within_rounding(tmp_path):
    store = make(tmp_path, dtype='float16', max_memory_mb=1e-9)
    tensors = entry(1)
    assert store.put(0, tensors)
    for g, t in zip(store.get(0), tensors):
        assert g.dtype == torch.float32
        assert torch.equal(g, t.half().float())
        assert not torch.equal(g, t)  # really stored as float16
    assert store.bytes_per_entry == (60 + 6) * 2


def test_float64_spec_returns_float64(tmp_path):
    specs = [((3, 2), torch.float64)]
    store = make(tmp_path, specs=specs)
    tensors = entry(2, specs)
    assert store.put(1, tensors)
    (got, ) = store.get(1)
    assert got.dtype == torch.float64
    assert torch.equal(got, tensors[0].float().double())


def test_int8_per_channel_scales(tmp_path):
    specs = [((3, 4, 4), torch.float32)]
    store = make(tmp_path, specs=specs, dtype='int8', max_memory_mb=1e-9)
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    x[1] *= 100  # a channel 100 times larger: its own scale
    x[2] = 0  # an all-zero channel stays exactly zero
    assert store.put(5, [x])
    scales = np.load(osp.join(str(tmp_path), 'frontier_0_scale.npy'))[5]
    expected = x.abs().amax(dim=(1, 2)) / 127
    assert np.allclose(scales, expected.numpy(), rtol=1e-6)
    assert scales[1] > 50 * scales[0]
    (got, ) = store.get(5)
    err = (got - x).abs().amax(dim=(1, 2))
    assert torch.all(err <= torch.from_numpy(scales) / 2 * (1 + 1e-5) + 1e-12)
    assert err[0] > 0  # quantised, not stored exactly
    assert torch.equal(got[2], torch.zeros(4, 4))
    assert store.bytes_per_entry == 48 + 3 * 4


def test_valid_only_after_put(tmp_path):
    store = make(tmp_path)
    assert not store.contains(2)
    with pytest.raises(KeyError, match=r'\[2\]'):
        store.get(2)
    assert store.num_entries == 0 and store.disk_bytes == 0
    assert store.put(2, entry(0))
    assert store.contains(2) and not store.contains(1)
    assert store.num_entries == 1
    assert store.disk_bytes == store.bytes_per_entry == (60 + 6) * 4
    valid = np.load(osp.join(str(tmp_path), 'valid.npy'))
    assert valid.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_spec_mismatch_names_both(tmp_path):
    store = make(tmp_path)
    with pytest.raises(ValueError, match=r'torch.float32\[4, 3\].*'
                       r'torch.float32\[4, 3, 5\]'):
        store.put(0, [torch.zeros(4, 3), torch.zeros(6)])
    with pytest.raises(ValueError, match=r'torch.float16.*torch.float32'):
        store.put(0, [torch.zeros(4, 3, 5).half(), torch.zeros(6)])
    with pytest.raises(ValueError, match='expected 2 tensors, got 1'):
        store.put(0, [torch.zeros(4, 3, 5)])
    assert not store.contains(0)


def test_reopen_same_key_reuses_entries(tmp_path, logs):
    first = make(tmp_path, dtype='float16')
    tensors = entry(3)
    assert first.put(6, tensors)
    assert not first.rebuilt
    # a resumed run: a new object on the same folder, same key
    second = make(tmp_path, dtype='float16')
    assert not second.rebuilt
    assert second.contains(6) and second.num_entries == 1
    assert second.ram_bytes == 0
    for g, t in zip(second.get(6), tensors):
        assert torch.equal(g, t.half().float())
    assert second.ram_bytes == second.bytes_per_entry  # read into RAM
    assert any('reusing' in msg and '1 valid entries' in msg
               for _, msg in logs)


def test_other_key_rebuilds_and_logs(tmp_path, logs):
    first = make(tmp_path)
    assert first.put(1, entry(0))
    second = make(tmp_path, key=dict(KEY, weights='changed'))
    assert second.rebuilt
    assert not second.contains(1) and second.num_entries == 0
    rebuilt = [msg for level, msg in logs if 'rebuilding' in msg]
    assert len(rebuilt) == 1 and 'weights' in rebuilt[0]
    assert 'pipeline' not in rebuilt[0]
    # another dtype rebuilds too
    assert make(tmp_path, key=dict(KEY, weights='changed'),
                dtype='int8').rebuilt
    assert "dtype 'float32' != 'int8'" in logs[-1][1]
    # fewer specs: the old spec's files are removed
    fourth = make(tmp_path, key=dict(KEY, weights='changed'), dtype='int8',
                  specs=SPECS[:1])
    assert fourth.rebuilt and 'specs' in logs[-1][1]
    assert sorted(os.listdir(str(tmp_path))) == [
        'frontier_0.npy', 'frontier_0_scale.npy', 'manifest.json',
        'valid.npy']


def test_unfinished_store_is_rebuilt(tmp_path):
    first = make(tmp_path)
    assert first.put(1, entry(0))
    os.remove(osp.join(str(tmp_path), 'manifest.json'))  # killed mid-build
    second = make(tmp_path)
    assert second.rebuilt and not second.contains(1)
    os.remove(osp.join(str(tmp_path), 'frontier_1.npy'))
    assert make(tmp_path).rebuilt


def test_open_without_create(tmp_path):
    with pytest.raises(RuntimeError, match='no manifest'):
        make(tmp_path, create=False)
    writer = make(tmp_path)
    assert writer.put(0, entry(0))
    reader = make(tmp_path, create=False)
    assert reader.contains(0)
    with pytest.raises(RuntimeError, match=r'key field\(s\) weights'):
        make(tmp_path, create=False, key=dict(KEY, weights='other'))
    assert reader.contains(0)  # nothing removed


def test_write_failure_leaves_entry_invalid(tmp_path, logs, monkeypatch):
    store = make(tmp_path)
    assert store.put(0, entry(0))
    real_pwrite, calls = os.pwrite, []

    def failing_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, 'pwrite', failing_pwrite)
    assert not store.put(1, entry(1))
    assert len(calls) == 2  # the first tensor written, the second failed
    assert not store.contains(1)
    with pytest.raises(KeyError):
        store.get(1)
    assert not store.put(2, entry(2))
    assert len(calls) == 2  # no further write tried
    warnings = [msg for level, msg in logs if level == logging.WARNING]
    assert len(warnings) == 1
    assert 'No space left' in warnings[0] and 'without caching' in warnings[0]
    # a reader in another "process" does not see the partial entry either
    monkeypatch.setattr(os, 'pwrite', real_pwrite)
    other = make(tmp_path, create=False)
    assert other.contains(0) and not other.contains(1)
    assert other.num_entries == 1


def test_ram_tier_then_disk(tmp_path):
    per_entry = (60 + 6) * 4
    store = make(tmp_path, max_memory_mb=2.5 * per_entry / 2**20)
    tensors = [entry(i) for i in range(5)]
    for i in range(5):
        assert store.put(i, tensors[i])
    assert sorted(store._ram) == [0, 1]
    assert store.ram_bytes == 2 * per_entry
    assert store.disk_bytes == 5 * per_entry
    for i in range(5):
        for g, t in zip(store.get(i), tensors[i]):
            assert torch.equal(g, t)
    batch = store.get_batch([4, 0, 3])
    for c in range(2):
        assert torch.equal(batch[c], torch.stack(
            [tensors[4][c], tensors[0][c], tensors[3][c]]))
    # a returned tensor is a copy: changing it leaves the entry alone
    store.get(0)[0].zero_()
    assert torch.equal(store.get(0)[0], tensors[0][0])


def test_default_ram_budget_is_a_quarter_of_available(tmp_path, logs):
    store = make(tmp_path, max_memory_mb=None)
    assert 0 < store.max_memory_mb
    assert any('a quarter of the' in msg for _, msg in logs)


def test_max_disk_mb(tmp_path, logs):
    per_entry = (60 + 6) * 4
    store = make(tmp_path, max_disk_mb=3.5 * per_entry / 2**20)
    assert all(store.put(i, entry(i)) for i in range(3))
    assert not store.put(3, entry(3))
    assert not store.put(4, entry(4))
    assert not store.contains(3) and store.num_entries == 3
    warnings = [msg for level, msg in logs if level == logging.WARNING]
    assert len(warnings) == 1 and 'max_disk_mb' in warnings[0]


def _writer(root, rows, barrier, queue):
    store = make(root, create=False)
    for i in rows:
        store.put(i, entry(i))
    barrier.wait()
    others = [i for i in range(8) if i not in rows]
    ok = all(
        store.contains(i) and all(
            torch.equal(g, t) for g, t in zip(store.get(i), entry(i)))
        for i in others)
    queue.put((tuple(rows), ok, store.num_entries))


def test_two_processes_disjoint_rows(tmp_path):
    make(tmp_path)  # the creating process; the others open after it
    ctx = mp.get_context('fork')
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(str(tmp_path), rows, barrier,
                                          queue))
        for rows in ([0, 2, 4, 6], [1, 3, 5, 7])
    ]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert results == [((0, 2, 4, 6), True, 8), ((1, 3, 5, 7), True, 8)]
    assert make(tmp_path).num_entries == 8


@pytest.mark.parametrize('kwargs, error, text', [
    (dict(dtype='bfloat16'), ValueError, "'bfloat16'"),
    (dict(max_memory_mb=0), ValueError, 'max_memory_mb .* got 0'),
    (dict(max_memory_mb=-5.0), ValueError, 'max_memory_mb .* got -5.0'),
    (dict(max_memory_mb='1G'), TypeError, "max_memory_mb .* '1G'"),
    (dict(max_disk_mb=0), ValueError, 'max_disk_mb .* got 0'),
    (dict(capacity=0), ValueError, 'capacity .* got 0'),
    (dict(capacity=2.5), TypeError, 'capacity .* got 2.5'),
    (dict(key=dict(w=object)), TypeError, 'JSON'),
    (dict(specs=[((2, ), torch.int64)]), TypeError, 'torch.int64'),
    (dict(specs=[]), ValueError, 'specs .* got \\[\\]'),
])
def test_bad_arguments(tmp_path, kwargs, error, text):
    with pytest.raises(error, match=text):
        make(tmp_path, **kwargs)
    assert os.listdir(str(tmp_path)) == []


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    root = str(blocker / 'cache')
    with pytest.raises(ValueError,
                       match=f'cache_dir .*{root}.* cannot be written: '):
        make(root)


def test_close_releases_files(tmp_path):
    fds = len(os.listdir('/proc/self/fd'))
    store = make(tmp_path)
    assert store.put(0, entry(0))
    assert len(os.listdir('/proc/self/fd')) > fds
    store.close()
    assert len(os.listdir('/proc/self/fd')) == fds
    assert store.contains(0)  # reopened on use
    del store
    assert len(os.listdir('/proc/self/fd')) == fds


def test_index_out_of_range(tmp_path):
    store = make(tmp_path)
    with pytest.raises(IndexError, match='entry 8 out of range'):
        store.put(8, entry(0))
