"""Checkpoints: filtered and vanilla models share keys; resume is exact."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner, load_checkpoint, save_checkpoint

from mmgradfilt import GradFilterConv2d

pytest.importorskip('mmseg')


class LossRecorder(Hook):
    """The training loss of each iteration, by iteration number."""

    def __init__(self):
        self.losses = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.losses[runner.iter + 1] = float(outputs['loss'])


def _train(cfg, work_dir, **options):
    """Train ``cfg`` in ``work_dir``; return the runner and its losses."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = osp.basename(work_dir)
    cfg.merge_from_dict(options)
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    return runner, recorder.losses


@pytest.fixture(scope='module')
def filtered_run(seg_cfg, tmp_path_factory):
    """4 iterations of the filtered config, checkpoints at 2 and 4."""
    return _train(seg_cfg, tmp_path_factory.mktemp('filtered_run'))


def test_filtered_checkpoint_loads_into_vanilla_model(filtered_run,
                                                      build_seg_model,
                                                      seg_batch):
    runner, _ = filtered_run
    vanilla = build_seg_model(filtered=False)
    # strict: a missing or unexpected key raises
    load_checkpoint(vanilla, osp.join(runner.work_dir, 'iter_4.pth'),
                    strict=True)
    trained = runner.model.state_dict()
    assert vanilla.state_dict().keys() == trained.keys()
    for key, value in vanilla.state_dict().items():
        assert torch.equal(value, trained[key]), key
    vanilla.eval()
    runner.model.eval()
    data = vanilla.data_preprocessor(seg_batch, False)
    with torch.no_grad():
        expected = runner.model(data['inputs'], mode='tensor')
        assert torch.equal(vanilla(data['inputs'], mode='tensor'), expected)


def test_vanilla_checkpoint_loads_into_filtered_model(build_seg_model,
                                                      tmp_path):
    vanilla = build_seg_model(filtered=False)
    with torch.no_grad():
        for param in vanilla.parameters():
            param.add_(1)  # differ from the seeded initialisation
    save_checkpoint(vanilla.state_dict(), str(tmp_path / 'vanilla.pth'))
    filtered = build_seg_model(filtered=True)
    load_checkpoint(filtered, str(tmp_path / 'vanilla.pth'), strict=True)
    assert isinstance(filtered.decode_head.bottleneck.conv, GradFilterConv2d)
    for key, value in filtered.state_dict().items():
        assert torch.equal(value, vanilla.state_dict()[key]), key


def test_resume_gives_the_same_next_losses(seg_cfg, filtered_run, tmp_path):
    runner, losses = filtered_run
    resumed, resumed_losses = _train(
        seg_cfg, tmp_path / 'resumed', resume=True,
        load_from=osp.join(runner.work_dir, 'iter_2.pth'))
    assert resumed.iter == 4
    assert list(resumed_losses) == [3, 4]
    assert resumed_losses == {3: losses[3], 4: losses[4]}
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, runner.model.state_dict()[key]), key
