"""Checkpoint loading with mmgradfilt imported: weights-only, refusals name the
global, one file can be trusted explicitly."""

import copy
import datetime
import logging
import os
import os.path as osp
import pickle
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MMLogger
from mmengine.runner import Runner, load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

import mmgradfilt  # noqa: F401  (registers the loader under test)
from mmgradfilt.checkpoint import TRUSTED_ENV

pytestmark = pytest.mark.skipif(
    not hasattr(torch.serialization, 'safe_globals'),
    reason='the weights-only loader is registered from PyTorch 2.6 on',
)


class Call:
    """Unpickles as ``func(*args)``: how a crafted checkpoint runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_calls(marker):
    """Payloads that create ``marker`` when unpickled in full, with the name each
    pickle gives its global (``os.system`` is ``posix.system`` on Linux)."""
    return [
        (Call(os.system, f'touch "{marker}"'), f'{os.system.__module__}.system'),
        (Call(shutil.copyfile, __file__, str(marker)), 'shutil.copyfile'),
    ]


@pytest.fixture(params=[0, 1], ids=['os.system', 'shutil.copyfile'])
def payload(request, tmp_path):
    """``(path, marker, global name)`` of a crafted model-zoo style checkpoint."""
    marker = tmp_path / 'ran'
    call, name = _touch_calls(marker)[request.param]
    path = tmp_path / 'crafted.pth'
    torch.save({'state_dict': OrderedDict(w=torch.ones(1)), 'meta': {'x': call}}, path)
    return str(path), marker, name


def _assert_refused(load, path, marker):
    """``load(path)`` raises an UnpicklingError, without running the payload;
    return its message."""
    with pytest.raises(pickle.UnpicklingError) as info:
        load(path)
    assert not marker.exists()
    return str(info.value)


def _assert_same(a, b, where='checkpoint'):
    """``a`` and ``b`` hold the same types and values, recursively."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f'{where}[{i}]')
    elif isinstance(a, HistoryBuffer):
        _assert_same(vars(a), vars(b), f'{where}.__dict__')
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


def test_payload_is_live(payload):
    # what the refusals below prevent: a full unpickle runs the call
    path, marker, _ = payload
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_torch_load_refuses_payload(payload):
    path, marker, name = payload
    assert name in _assert_refused(torch.load, path, marker)


@pytest.mark.parametrize(
    'load',
    [
        CheckpointLoader.load_checkpoint,
        lambda path: load_checkpoint(torch.nn.Linear(1, 1), path),
    ],
    ids=['CheckpointLoader', 'load_checkpoint'],
)
def test_mmengine_loaders_refuse_payload_naming_it(payload, load):
    path, marker, name = payload
    message = _assert_refused(load, path, marker)
    assert f'does not allow: {name}' in message
    assert TRUSTED_ENV in message


@pytest.mark.parametrize('resume', [False, True], ids=['load_from', 'resume'])
def test_runner_refuses_payload(payload, resume, seg_cfg, tmp_path):
    path, marker, name = payload
    cfg = copy.deepcopy(seg_cfg)
    cfg.merge_from_dict(
        dict(work_dir=str(tmp_path / 'run'), load_from=path, resume=resume)
    )
    runner = Runner.from_cfg(cfg)
    message = _assert_refused(lambda _: runner.train(), path, marker)
    assert name in message
    assert runner.iter == 0


def test_legacy_format_payload_is_refused_naming_it(tmp_path):
    # PyTorch < 1.6 files are no zip: the name comes from the unpickler
    marker = tmp_path / 'ran'
    call, name = _touch_calls(marker)[1]
    path = str(tmp_path / 'legacy.pth')
    torch.save({'meta': call}, path, _use_new_zipfile_serialization=False)
    assert name in _assert_refused(CheckpointLoader.load_checkpoint, path, marker)


def test_getattr_resolves_history_buffer_statistics_only(tmp_path):
    # pickle writes HistoryBuffer.min as getattr(HistoryBuffer, 'min'): allowed
    path = str(tmp_path / 'ok.pth')
    torch.save({'m': Call(getattr, HistoryBuffer, 'min')}, path)
    assert CheckpointLoader.load_checkpoint(path)['m'] is HistoryBuffer.min
    # any other attribute of an allowed object is refused, by name
    torch.save({'m': Call(getattr, np.ndarray, 'tofile')}, path)
    with pytest.raises(pickle.UnpicklingError, match=r'numpy\.ndarray\.tofile'):
        CheckpointLoader.load_checkpoint(path)


NUMPY_VALUES = {
    'loss history': np.array([0.5, 0.25]),
    'counts': np.array([1, 1]),
    'eta': np.float64(12.5),
    'best mIoU': np.float32(32.36),
}


def test_numpy_values_mmengine_stores_load(tmp_path):
    path = str(tmp_path / 'numpy.pth')
    torch.save(NUMPY_VALUES, path)
    _assert_same(CheckpointLoader.load_checkpoint(path), NUMPY_VALUES)


def test_numpy_1_checkpoint_loads(tmp_path):
    # numpy 1 names the same functions numpy.core.multiarray.*; a legacy file is
    # one pickle stream whose GLOBAL lines can be renamed in place
    path = tmp_path / 'numpy1.pth'
    torch.save(NUMPY_VALUES, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b'numpy._core.multiarray\n' in data
    numpy1 = data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
    path.write_bytes(numpy1)
    _assert_same(CheckpointLoader.load_checkpoint(str(path)), NUMPY_VALUES)


def test_numpy_dtype_outside_the_list_is_named(tmp_path):
    path = str(tmp_path / 'int32.pth')
    torch.save({'x': np.arange(3, dtype=np.int32)}, path)
    refused = r'allow: numpy\.dtypes\.Int32DType'
    with pytest.raises(pickle.UnpicklingError, match=refused):
        CheckpointLoader.load_checkpoint(path)


@pytest.fixture(scope='module')
def runner_checkpoint(seg_cfg, tmp_path_factory):
    """An MMSeg Runner checkpoint: SGD momentum, a MultiStepLR, a message hub."""
    work_dir = tmp_path_factory.mktemp('runner_ckpt')
    cfg = copy.deepcopy(seg_cfg)
    cfg.merge_from_dict(
        dict(
            work_dir=str(work_dir),
            param_scheduler=[dict(type='MultiStepLR', milestones=[1], by_epoch=False)],
            train_cfg=dict(max_iters=2),
        )
    )
    Runner.from_cfg(cfg).train()
    return str(work_dir / 'iter_2.pth')


def test_runner_checkpoint_loads_as_a_full_unpickle_would(runner_checkpoint):
    loaded = CheckpointLoader.load_checkpoint(runner_checkpoint)
    _assert_same(loaded, torch.load(runner_checkpoint, weights_only=False))
    # the parts that needed the allowlist are there
    scalars = loaded['message_hub']['log_scalars']
    assert isinstance(scalars['train/loss'], HistoryBuffer)
    assert scalars['train/loss'].data[0].dtype == np.float64
    assert isinstance(loaded['message_hub']['runtime_info']['eta'], np.float64)
    assert loaded['meta']['dataset_meta']['classes'] == ('background', 'a', 'b')
    assert loaded['param_schedulers'][0]['milestones'] == {1: 1}


def test_allowlist_is_scoped_to_the_loader(runner_checkpoint):
    before = set(torch.serialization.get_safe_globals())  # a set's list: any order
    CheckpointLoader.load_checkpoint(runner_checkpoint)
    assert set(torch.serialization.get_safe_globals()) == before
    # torch.load itself stays as strict as without mmgradfilt
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(runner_checkpoint)


def test_globals_allowed_by_the_user_survive_a_load(runner_checkpoint):
    with torch.serialization.safe_globals([np.dtype]):
        CheckpointLoader.load_checkpoint(runner_checkpoint)
        assert np.dtype in torch.serialization.get_safe_globals()


def test_amp_loss_scaler_state_loads(runner_checkpoint, tmp_path):
    # AmpOptimWrapper needs a GPU, NPU, MLU or MUSA; its state is the optimizer's
    # plus torch's GradScaler state_dict under 'loss_scaler', taken here from a
    # CPU scaler after a step with an inf gradient (scale backed off)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(model(torch.full((1, 2), float('inf'))).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 512.0
    checkpoint = torch.load(runner_checkpoint, weights_only=False)
    checkpoint['optimizer']['loss_scaler'] = scaler.state_dict()
    path = str(tmp_path / 'amp.pth')
    torch.save(checkpoint, path)
    state = CheckpointLoader.load_checkpoint(path)['optimizer']['loss_scaler']
    assert state == scaler.state_dict()
    restored = torch.amp.GradScaler('cpu')
    restored.load_state_dict(state)
    assert restored.get_scale() == 512.0


@pytest.mark.parametrize('zipfile', [True, False], ids=['zip', 'legacy'])
def test_model_zoo_checkpoint_loads(build_seg_model, tmp_path, zipfile):
    source = build_seg_model(filtered=False)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1)  # differ from the seeded initialisation
    state_dict = OrderedDict(source.state_dict())
    meta = {
        'CLASSES': ('background', 'a', 'b'),
        'PALETTE': [[0, 0, 0], [128, 0, 0], [0, 128, 0]],
        'config': 'model = dict()',
        'mmseg_version': '0.30.0',
        'epoch': 3,
        'iter': 120,
        'hook_msgs': {'last_ckpt': 'work_dirs/x/iter_120.pth'},
    }
    path = str(tmp_path / 'zoo.pth')
    torch.save(
        {'meta': meta, 'state_dict': state_dict},
        path,
        _use_new_zipfile_serialization=zipfile,
    )
    target = build_seg_model(filtered=True)
    checkpoint = load_checkpoint(target, path, strict=True)
    assert checkpoint['meta'] == meta
    for key, value in target.state_dict().items():
        assert torch.equal(value, state_dict[key]), key


@pytest.fixture
def warnings_logged():
    """Messages of the warnings logged through MMEngine's current logger."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def dated(tmp_path):
    """A checkpoint with a global outside the allowlist, and a copy of it."""
    content = {'state_dict': {}, 'meta': {'date': datetime.date(2026, 1, 2)}}
    path, copy_path = tmp_path / 'dated.pth', tmp_path / 'copy' / 'dated.pth'
    copy_path.parent.mkdir()
    torch.save(content, path)
    torch.save(content, copy_path)
    return path, copy_path, content


def test_untrusted_file_is_refused_naming_the_variable(dated, monkeypatch):
    path, _, _ = dated
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    with pytest.raises(pickle.UnpicklingError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    assert 'does not allow: datetime.date' in str(info.value)
    assert TRUSTED_ENV in str(info.value)


def test_trusted_file_loads_and_logs(dated, monkeypatch, warnings_logged):
    path, _, content = dated
    monkeypatch.chdir(path.parent)
    # a relative entry, among others, names the file once resolved
    monkeypatch.setenv(TRUSTED_ENV, os.pathsep.join(['/nowhere.pth', 'dated.pth']))
    assert CheckpointLoader.load_checkpoint(str(path)) == content
    assert any(str(path) in m and TRUSTED_ENV in m for m in warnings_logged)


@pytest.mark.parametrize('entry', ['folder', 'pattern', 'copy'])
def test_trust_is_for_the_exact_file_only(dated, monkeypatch, entry, warnings_logged):
    path, copy_path, _ = dated
    listed = {
        'folder': str(path.parent),
        'pattern': str(path.parent / '*.pth'),
        'copy': str(copy_path),
    }[entry]
    monkeypatch.setenv(TRUSTED_ENV, listed)
    with pytest.raises(pickle.UnpicklingError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    assert f'does not list {osp.realpath(path)}' in str(info.value)
    assert warnings_logged == []


def test_trusting_one_file_keeps_refusing_others(payload, dated, monkeypatch):
    path, marker, name = payload
    monkeypatch.setenv(TRUSTED_ENV, str(dated[0]))
    assert name in _assert_refused(CheckpointLoader.load_checkpoint, path, marker)
