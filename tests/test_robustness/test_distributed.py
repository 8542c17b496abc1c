"""Two-process ``torchrun`` (gloo, CPU) training with filters and frozen layers.

Run as a script, this file is the worker that ``torchrun`` starts on each rank.
"""
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from mmgradfilt import GradFilterConv2d

NPROC = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_two_process_gloo_run(seg_config_file, tmp_path):
    pytest.importorskip('mmseg')  # the worker trains an MMSeg model
    work_dir = str(tmp_path / 'work_dir')
    cmd = [sys.executable, '-m', 'torch.distributed.run',
           f'--nproc_per_node={NPROC}', '--master_addr=127.0.0.1',
           f'--master_port={_free_port()}', __file__, seg_config_file,
           work_dir]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    # the hook's report comes once, from rank 0, on the console and in the log
    assert output.count('Gradient filter on 5 conv(s)') == 1, output[-5000:]
    assert 'Wrapped the model in DDP again after freezing' in output
    assert 'find_unused_parameters' not in output

    ranks = [torch.load(osp.join(work_dir, f'grads_rank{r}.pt'))
             for r in range(NPROC)]
    for rank in ranks:
        assert rank['filtered'] == [
            'decode_head.aspp_modules.0.conv', 'decode_head.aspp_modules.1.conv',
            'decode_head.aspp_modules.2.conv', 'decode_head.aspp_modules.3.conv',
            'decode_head.bottleneck.conv']
        assert rank['find_unused_parameters'] is False
        assert len(rank['steps']) == 4
    # each rank trained on its own half of the data ...
    assert ranks[0]['inputs'] != ranks[1]['inputs']
    trainable = ranks[0]['trainable']
    assert trainable and not any(n.startswith('backbone.') for n in trainable)
    for step0, step1 in zip(ranks[0]['steps'], ranks[1]['steps']):
        # ... and got the same all-reduced gradient; frozen ones got none
        assert set(step0) == set(step1) == set(trainable)
        for name in trainable:
            assert torch.equal(step0[name], step1[name]), name
            assert step0[name].abs().sum() > 0, name
    for rank in ranks:
        assert rank['frozen_with_grad'] == []


class GradRecorder(Hook):
    """Record the gradients the optimizer steps with, on every rank."""

    def __init__(self):
        self.steps, self.inputs, self.frozen_with_grad = [], [], set()

    def before_train(self, runner):
        self.model = runner.model.module
        runner.optim_wrapper.optimizer.register_step_pre_hook(self.record)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.inputs.append([float(x.float().sum())
                            for x in data_batch['inputs']])

    def record(self, optimizer, args, kwargs):
        params = dict(self.model.named_parameters())
        self.steps.append({n: p.grad.clone() for n, p in params.items()
                           if p.requires_grad})
        self.frozen_with_grad.update(
            n for n, p in params.items()
            if not p.requires_grad and p.grad is not None)


def _worker(config_file: str, work_dir: str) -> None:
    """Train the config on this rank and save what the test checks."""
    # MMEngine's init_dist calls torch.cuda.set_device; on CPU start gloo
    # here and the Runner uses this process group
    dist.init_process_group('gloo')
    cfg = Config.fromfile(config_file)
    cfg.work_dir = work_dir
    cfg.launcher = 'pytorch'
    # a CPU module takes no device_ids (the Runner would set the local rank)
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel',
                                 device_ids=None)
    runner = Runner.from_cfg(cfg)
    recorder = GradRecorder()
    runner.register_hook(recorder, priority='LOWEST')
    runner.train()
    model = runner.model.module
    torch.save(
        dict(filtered=[n for n, m in model.named_modules()
                       if isinstance(m, GradFilterConv2d)],
             trainable=[n for n, p in model.named_parameters()
                        if p.requires_grad],
             find_unused_parameters=runner.model.find_unused_parameters,
             steps=recorder.steps,
             inputs=recorder.inputs,
             frozen_with_grad=sorted(recorder.frozen_with_grad)),
        osp.join(work_dir, f'grads_rank{dist.get_rank()}.pt'))
    dist.destroy_process_group()


if __name__ == '__main__':
    _worker(*sys.argv[1:])
