"""Checkpoints: filtered and vanilla models share keys; resume is exact, through
mmgradfilt's weights-only loader."""
import copy
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner, load_checkpoint, save_checkpoint

from mmgradfilt import GradFilterConv2d

pytest.importorskip('mmseg', reason='needs MMSegmentation')


class LossRecorder(Hook):
    """The training loss and learning rate of each iteration, by iteration
    number."""

    def __init__(self):
        self.losses = {}
        self.lrs = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.losses[runner.iter + 1] = float(outputs['loss'])
        self.lrs[runner.iter + 1] = runner.optim_wrapper.get_lr()['lr'][0]


def _train(cfg, work_dir, **options):
    """Train ``cfg`` in ``work_dir``; return the runner and its recorder."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = osp.basename(work_dir)
    cfg.merge_from_dict(copy.deepcopy(options))  # merging pops `_delete_`
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    return runner, recorder


# The resumed half of each schedule changes the learning rate, so a scheduler or
# optimizer state not restored changes the losses.
ITER_SGD = dict(
    param_scheduler=[
        dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2),
        dict(type='MultiStepLR', milestones=[3], by_epoch=False),
    ]
)
EPOCH_ADAMW = dict(
    optim_wrapper=dict(
        optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=0.01)
    ),
    param_scheduler=[dict(type='PolyLR', eta_min=1e-4, by_epoch=True, end=2)],
    # 2 epochs of 2 iterations, checkpoints after each
    train_dataloader=dict(
        sampler=dict(_delete_=True, type='DefaultSampler', shuffle=False),
        dataset=dict(indices=4),
    ),
    train_cfg=dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs=2),
    default_hooks=dict(
        checkpoint=dict(by_epoch=True, interval=1),
        logger=dict(log_metric_by_epoch=True),
    ),
)


@pytest.fixture(scope='module')
def filtered_run(seg_cfg, tmp_path_factory):
    """4 iterations of the filtered config (SGD with momentum, a warm-up and a
    step), checkpoints at 2 and 4."""
    return _train(seg_cfg, tmp_path_factory.mktemp('filtered_run'), **ITER_SGD)


@pytest.fixture(scope='module')
def epoch_run(seg_cfg, tmp_path_factory):
    """2 epochs of 2 iterations of the filtered config with AdamW and PolyLR."""
    return _train(seg_cfg, tmp_path_factory.mktemp('epoch_run'), **EPOCH_ADAMW)


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


@pytest.mark.parametrize(
    'run, options, checkpoint',
    [
        ('filtered_run', ITER_SGD, 'iter_2.pth'),
        ('epoch_run', EPOCH_ADAMW, 'epoch_1.pth'),
    ],
    ids=['iter-sgd-multistep', 'epoch-adamw-poly'],
)
def test_resume_gives_the_same_next_losses(
    seg_cfg, request, tmp_path, run, options, checkpoint
):
    runner, recorder = request.getfixturevalue(run)
    resumed, resumed_recorder = _train(
        seg_cfg,
        tmp_path / 'resumed',
        resume=True,
        load_from=osp.join(runner.work_dir, checkpoint),
        **options,
    )
    assert resumed.iter == 4
    assert list(resumed_recorder.losses) == [3, 4]
    assert resumed_recorder.losses == {i: recorder.losses[i] for i in (3, 4)}
    assert resumed_recorder.lrs == {i: recorder.lrs[i] for i in (3, 4)}
    assert len({recorder.lrs[i] for i in (2, 3, 4)}) == 2  # it steps near the resume
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, runner.model.state_dict()[key]), key
    # the message hub's history came back too (numpy buffers in the checkpoint)
    for key in ('train/loss', 'train/lr'):
        history = resumed.message_hub.get_scalar(key).data[0]
        assert np.array_equal(history, runner.message_hub.get_scalar(key).data[0])
        assert len(history) == 4
