"""The offline segmentation demo, end to end, on a CPU in minutes.

1. writes the digits data (``tools/dataset_converters/digits_seg.py``);
2. calib: trains a tiny DeepLabV3 from scratch on the source domain and saves
   its checkpoint under ``checkpoints/`` (skipped when it exists);
3. evaluates it on the shifted domain (no adaptation);
4. fine-tunes it on the shifted domain with vanilla back-propagation
   (enc5L) and with gradient filtering (filt5L) on the same 5 layers, both
   without the lean step (``lean_memory=False``), then filt5L with it (its
   config's default), and filt5L with it and ``FrozenFeatureCacheHook``
   (the frozen part's output stored in the first pass over the data, read
   afterwards);
5. plans with ``tools/plan.py`` what to train within half the saved bytes
   of enc5L, and fine-tunes that plan the same way;
6. prints a table: mIoU, train time per iteration (MMEngine's log), the
   wall clock of the whole fine-tuning run, the bytes autograd keeps for
   backward in one training forward pass (in total and by convs) and the
   peak memory of a training step.

Every step is an ordinary ``tools/train.py`` / ``tools/test.py`` command,
printed before it runs.
"""
import argparse
import glob
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Tuple

CONFIG_DIR = 'configs/demo_seg'
CALIB = 'deeplabv3_r18-tiny-d8_calib_1xb8-1k_digits-64x64'
FULL = 'deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64'
ENC5L = 'deeplabv3_r18-tiny-d8_enc5L_1xb8-300_digits-shift-64x64'
FILT5L = 'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64'
FILT5L_CACHE = 'deeplabv3_r18-tiny-d8_filt5L-cache_1xb8-300_digits-shift-64x64'
# table row -> (config, whether it trains and is measured with its
# GradientFilterHook's lean step, as configured, or without it)
VARIANTS = {
    'enc5L (vanilla BP, last 5 convs)': (ENC5L, False),
    'filt5L (gradient filter, same 5 convs)': (FILT5L, False),
    'filt5L + lean (the config\'s default)': (FILT5L, True),
}
PLAN_LABEL = 'plan for half of enc5L\'s saved bytes (tools/plan.py)'
CACHE_LABEL = 'filt5L + lean + cache'
MB = 2.0**20
# the demo configs' GradientFilterHook is their first custom hook
WITHOUT_LEAN = ['custom_hooks.0.lean_memory=False',
                'custom_hooks.0.filter_norm=False']
MEMORY_NOTE = (
    'enc5L and filt5L train and are measured without the lean step '
    '(lean_memory=False: PyTorch\'s step around the filtered convs), '
    'filt5L + lean as its config says, the plan as tools/plan.py wrote it '
    '(lean). filt5L + lean + cache adds FrozenFeatureCacheHook (views=1, '
    'float16) to filt5L + lean, its store emptied first: its time includes '
    'the pass that fills the store. Wall clock: the whole tools/train.py '
    'run (start-up, data loading, training, validation, checkpoint). '
    'Memory: one training step on a batch of 8, tools/benchmark.py\'s '
    'measurement (for the cache, a step that reads the store).')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data-root', default='data/digits_seg')
    parser.add_argument(
        '--work-dir', default='work_dirs/seg_demo',
        help='where the runs and the result table go')
    parser.add_argument(
        '--recalib', action='store_true',
        help='train the calib checkpoint again even if it exists')
    return parser.parse_args()


def run(cmd: List[str]) -> None:
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd[1:]] if cmd[0] == 'python' else cmd,
                   check=True)


def config(name: str) -> str:
    return osp.join(CONFIG_DIR, name + '.py')


def last_scalars(work_dir: str) -> List[dict]:
    """The scalars MMEngine logged in the latest run under ``work_dir``."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data',
                                      'scalars.json')))
    with open(files[-1]) as f:
        return [json.loads(line) for line in f]


def train_time(scalars: List[dict]) -> float:
    """Mean logged train time per iteration, the first log interval left out
    (warm-up)."""
    times = [s['time'] for s in scalars if 'loss' in s][1:]
    return sum(times) / len(times)


def miou(scalars: List[dict]) -> float:
    return [s['mIoU'] for s in scalars if 'mIoU' in s][-1]


def test_miou(work_dir: str) -> float:
    """mIoU that ``tools/test.py`` logged in its latest run."""
    files = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    with open(files[-1]) as f:
        return json.load(f)['mIoU']


def step_memory(cfg_file: str, data_root: str, lean: bool,
                cached: bool = False) -> Tuple[int, int, int]:
    """What one training step of the config's model on one training batch
    needs, after its GradientFilterHook's surgery as ``tools/benchmark.py``
    does it: as configured (``lean``: the lean step by default; ``cached``:
    reading its frozen part's output from the cache) or without the lean
    step. The bytes autograd saves for backward in the forward
    pass, in total and by convs (each storage once: filtered convs that pool
    one input share the pooled tensor), and the step's peak."""
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    import mmgradfilt  # noqa: F401
    from mmgradfilt.benchmark.cached import CACHED
    from mmgradfilt.benchmark.step import (FILTERED, LEAN, build_model,
                                           measure_step)
    from mmgradfilt.cli import quiet_third_party
    from mmgradfilt.hooks import recipe_from_config
    quiet_third_party()
    cfg = Config.fromfile(cfg_file)
    cfg.train_dataloader.dataset.data_root = data_root
    cpu = torch.device('cpu')
    model = build_model(cfg)  # in the config's scope, which the data needs
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    variant = CACHED if cached else LEAN if lean else FILTERED
    step = variant.prepare(
        model, recipe_from_config(cfg), cfg.optim_wrapper, batch, cpu)
    step.run()  # optimizer state exists, as in training
    result = measure_step(step, cpu)
    return (result.saved_bytes, result.saved_by_kind['conv'],
            result.peak_bytes)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    data_opt = [f'train_dataloader.dataset.data_root={args.data_root}',
                f'val_dataloader.dataset.data_root={args.data_root}',
                f'test_dataloader.dataset.data_root={args.data_root}']
    if not osp.isdir(osp.join(args.data_root, 'img_dir')):
        run(['python', 'tools/dataset_converters/digits_seg.py',
             args.data_root])
    ckpt = osp.join('checkpoints', CALIB, 'iter_1000.pth')
    if args.recalib or not osp.isfile(ckpt):
        run(['python', 'tools/train.py', config(CALIB), '--work-dir',
             osp.join(args.work_dir, CALIB), '--cfg-options', *data_opt])
    else:
        print(f'Using the existing calib checkpoint {ckpt} (--recalib to '
              'train it again)')
    run(['python', 'tools/test.py', config(FULL), ckpt, '--work-dir',
         osp.join(args.work_dir, 'calib_on_shift'), '--cfg-options',
         *data_opt])
    rows: Dict[str, list] = {
        'calib, not adapted': [
            test_miou(osp.join(args.work_dir, 'calib_on_shift')),
            None, None, None, None, None]
    }
    def fine_tune(label: str, cfg_file: str, work_dir: str, lean: bool,
                  cached: bool = False) -> None:
        started = time.perf_counter()
        run(['python', 'tools/train.py', cfg_file, '--work-dir', work_dir,
             '--cfg-options', f'load_from={ckpt}', *data_opt,
             *([] if lean else WITHOUT_LEAN)])
        wall = time.perf_counter() - started
        scalars = last_scalars(work_dir)
        rows[label] = [miou(scalars), train_time(scalars), wall,
                       *step_memory(cfg_file, args.data_root, lean, cached)]

    for label, (name, lean) in VARIANTS.items():
        fine_tune(label, config(name),
                  osp.join(args.work_dir, name + ('_lean' if lean else '')),
                  lean)
    cache_dir = osp.join(args.work_dir, FILT5L_CACHE)
    # an empty store: the run computes and stores every entry first
    shutil.rmtree(osp.join(cache_dir, 'frozen_feature_cache'),
                  ignore_errors=True)
    fine_tune(CACHE_LABEL, config(FILT5L_CACHE), cache_dir, True, True)
    # the planner's budget: half of what vanilla enc5L keeps for backward
    budget = rows[next(iter(VARIANTS))][3] / 2 / MB
    plan_dir = osp.join(args.work_dir, 'plan')
    run(['python', 'tools/plan.py', config(FULL), '--max-saved-mb',
         f'{budget:.4f}', '--checkpoint', ckpt, '--out', plan_dir,
         '--cfg-options', *data_opt])
    fine_tune(PLAN_LABEL, osp.join(plan_dir, 'config.py'),
              osp.join(args.work_dir, 'plan_train'), True)

    lines = ['| run on the shifted domain | mIoU (%) | train time / iter (s) '
             '| fine-tuning wall clock (s) '
             '| saved for backward, total (KiB) | by convs (KiB) '
             '| peak of a step (KiB) |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for label, cells in rows.items():
        cells = ['-' if c is None else
                 (f'{c:.2f}' if i == 0 else f'{c:.4f}' if i == 1 else
                  f'{c:.1f}' if i == 2 else f'{c / 1024:.0f}')
                 for i, c in enumerate(cells)]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    lines += ['', MEMORY_NOTE]
    table = '\n'.join(lines)
    minutes = (time.perf_counter() - start) / 60
    print(f'\n{table}\n\nDemo took {minutes:.1f} min.')
    os.makedirs(args.work_dir, exist_ok=True)
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(f'{table}\n\nDemo took {minutes:.1f} min.\n')


if __name__ == '__main__':
    main()
