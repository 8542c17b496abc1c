"""tools/train.py, tools/test.py and ``mim train mmseg`` on the demo configs,
and the errors for a missing dataset or checkpoint."""
import glob
import os.path as osp
import runpy
import shutil
import subprocess
import sys

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

mmseg = pytest.importorskip('mmseg', reason='needs MMSegmentation')

from mmgradfilt.datasets import make_digits_seg  # noqa: E402
from mmgradfilt.hooks.pretrained_check_hook import \
    missing_checkpoints_error  # noqa: E402

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..', '..'))
DEMO = osp.join(ROOT, 'configs', 'demo_seg', 'deeplabv3_r18-tiny-d8_{}.py')
CALIB = DEMO.format('calib_1xb8-1k_digits-64x64')
FILT = DEMO.format('filt5L_1xb8-300_digits-shift-64x64')
SPLITS = dict(train=('source', 4), val=('source', 2),
              shift_train=('target', 4), shift_val=('target', 2))
SHORT = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2',
         'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1']


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('digits_seg'))
    make_digits_seg(root, splits=SPLITS)
    return root


def data_options(root):
    return [f'{loader}.dataset.data_root={root}'
            for loader in ('train_dataloader', 'val_dataloader',
                           'test_dataloader')]


def run_tool(monkeypatch, tool, *args):
    monkeypatch.setattr(sys, 'argv', [tool, *args])
    runpy.run_path(osp.join(ROOT, 'tools', tool), run_name='__main__')


def log_text(work_dir):
    return ''.join(open(f).read()
                   for f in glob.glob(osp.join(work_dir, '*', '*.log')))


def test_calib_test_and_filt_finetune(data_root, tmp_path, monkeypatch,
                                      capsys):
    ckpts = str(tmp_path / 'checkpoints')
    calib_dir = str(tmp_path / 'calib')
    run_tool(monkeypatch, 'train.py', CALIB, '--work-dir', calib_dir,
             '--cfg-options', *SHORT, *data_options(data_root),
             f'default_hooks.checkpoint.out_dir={ckpts}')
    ckpt = osp.join(ckpts, 'calib', 'iter_2.pth')
    assert osp.isfile(ckpt)
    assert 'mIoU' in log_text(calib_dir)

    run_tool(monkeypatch, 'test.py', FILT, ckpt, '--work-dir',
             str(tmp_path / 'test'), '--cfg-options', *data_options(data_root))
    assert 'mIoU: ' in capsys.readouterr().out

    filt_dir = str(tmp_path / 'filt')
    run_tool(monkeypatch, 'train.py', FILT, '--work-dir', filt_dir,
             '--cfg-options', *SHORT, *data_options(data_root),
             f'load_from={ckpt}')
    log = log_text(filt_dir)
    assert 'Gradient filter on 5 conv(s)' in log
    assert f'Load checkpoint from {ckpt}' in log
    assert osp.isfile(osp.join(filt_dir, 'iter_2.pth'))


def test_mim_train_mmseg(data_root, tmp_path):
    mim = shutil.which('mim', path=osp.dirname(sys.executable))
    # openmim is part of the pinned environment (`make env` checks `mim`)
    assert mim is not None, 'mim not found beside the interpreter: run make env'
    work_dir = str(tmp_path / 'mim')
    subprocess.run(
        [mim, 'train', 'mmseg', CALIB, '--work-dir', work_dir,
         '--cfg-options', *SHORT, *data_options(data_root),
         f'default_hooks.checkpoint.out_dir={tmp_path}'],
        cwd=ROOT, check=True, capture_output=True)
    assert osp.isfile(osp.join(str(tmp_path), 'mim', 'iter_2.pth'))
    assert 'mIoU' in log_text(work_dir)


def test_missing_dataset(tmp_path, monkeypatch):
    missing = str(tmp_path / 'no_data')
    with pytest.raises(FileNotFoundError) as err:
        run_tool(monkeypatch, 'train.py', CALIB, '--work-dir',
                 str(tmp_path / 'w'), '--cfg-options', *data_options(missing))
    assert osp.join(missing, 'img_dir', 'train') in str(err.value)
    assert 'tools/dataset_converters/digits_seg.py' in str(err.value)


def test_missing_load_from(data_root, tmp_path, monkeypatch):
    missing = str(tmp_path / 'calib' / 'iter_1000.pth')
    with pytest.raises(FileNotFoundError) as err:
        run_tool(monkeypatch, 'train.py', FILT, '--work-dir',
                 str(tmp_path / 'w'), '--cfg-options',
                 *data_options(data_root), f'load_from={missing}')
    assert f'"{missing}" (set by load_from)' in str(err.value)
    assert 'checkpoints/README.md' in str(err.value)


def test_missing_checkpoint_names_a_command_only_for_a_file_it_writes(
        tmp_path, monkeypatch):
    # a command is named for the file its config's CheckpointHook leaves
    # (the last iteration's, in out_dir/<config name>/), nothing for a typo
    name = osp.basename(CALIB)[:-len('.py')]
    monkeypatch.chdir(ROOT)
    folder = osp.join('checkpoints', name)
    typo = osp.join(folder, 'iter_100.pth')
    message = str(missing_checkpoints_error([('load_from', typo)], 'Hint.'))
    assert message == (
        f'Missing checkpoint(s): "{typo}" (set by load_from), no such file; '
        f'configs/demo_seg/{name}.py writes {folder}/iter_1000.pth, not this '
        'name. Hint.')
    right = osp.join(folder, 'iter_1000.pth')
    if not osp.exists(right):  # made by `make demo` in this clone
        message = str(missing_checkpoints_error([('load_from', right)], 'H.'))
        assert message == (
            f'Missing checkpoint(s): "{right}" (set by load_from), written by '
            f'`make demo` or `python tools/train.py configs/demo_seg/{name}.py`'
            '. H.')
    # the same name in another folder: where the command puts it
    elsewhere = str(tmp_path / name / 'iter_1000.pth')
    message = str(missing_checkpoints_error([('load_from', elsewhere)], 'H.'))
    assert message.endswith(
        f'{name}.py` as {right}, not at this path. H.')

    # from another directory: paths that work from there, and no `make demo`
    # (it writes inside the repository)
    monkeypatch.chdir(tmp_path)
    message = str(missing_checkpoints_error([('load_from', right)], 'H.'))
    assert message == (
        f'Missing checkpoint(s): "{right}" (set by load_from), written by '
        f'`python {ROOT}/tools/train.py {CALIB}`. H.')
    # epoch-based: MMPretrain's demo pretraining keeps its last epoch only
    pretrain = 'resnet18_pretrain_1xb32-10e_digits-user0'
    kept = osp.join('work_dirs', pretrain, 'epoch_10.pth')
    message = str(missing_checkpoints_error(
        [('load_from', kept), ('load_from', kept.replace('_10', '_9'))], 'H.'))
    assert message == (
        f'Missing checkpoint(s): "{kept}" (set by load_from), written by '
        f'`python {ROOT}/tools/train.py {ROOT}/configs/demo_cls/{pretrain}.py`'
        f'; "{kept.replace("_10", "_9")}" (set by load_from), no such file; '
        f'{ROOT}/configs/demo_cls/{pretrain}.py writes {kept}, not this '
        'name. H.')
    assert missing_checkpoints_error(
        [('load_from', 'nowhere/iter_1.pth')], 'H.').args == (
            'Missing checkpoint(s): "nowhere/iter_1.pth" (set by load_from). '
            'H.', )


def test_missing_pretrained_backbone(data_root, tmp_path):
    missing = str(tmp_path / 'resnet18_v1c.pth')
    cfg = Config.fromfile(CALIB)
    cfg.merge_from_dict(dict(o.split('=') for o in data_options(data_root)))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=missing)
    cfg.work_dir = str(tmp_path / 'w')
    runner = Runner.from_cfg(cfg)
    with pytest.raises(FileNotFoundError) as err:
        runner.train()
    assert f'"{missing}" (set by init_cfg of backbone)' in str(err.value)


def test_demo_step_memory(data_root):
    # the demo table's memory columns (tools/seg_demo.py measures them so):
    # filt5L with and without the lean step, on a training batch, after a
    # first step
    import torch

    from mmgradfilt.benchmark.step import (FILTERED, LEAN, build_model,
                                           measure_step)
    from mmgradfilt.hooks import recipe_from_config
    cfg = Config.fromfile(FILT)
    cfg.train_dataloader.dataset.data_root = data_root
    model = build_model(cfg)
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    figures = []
    for variant in (FILTERED, LEAN):
        step = variant.prepare(model, recipe_from_config(cfg),
                               cfg.optim_wrapper, batch, torch.device('cpu'))
        step.run()
        measured = measure_step(step, torch.device('cpu'))
        figures.append((measured.saved_bytes, measured.saved_by_kind['conv'],
                        measured.peak_bytes))
    plain, lean = figures
    for saved, by_convs, peak in (plain, lean):
        assert 0 < by_convs < saved < peak
    # 1-bit masks and the banded loss
    assert lean[0] < plain[0] / 2
    assert lean[2] < plain[2]
