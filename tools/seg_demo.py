"""The offline segmentation demo, end to end, on a CPU in minutes.

1. writes the digits data (``tools/dataset_converters/digits_seg.py``);
2. calib: trains a tiny DeepLabV3 from scratch on the source domain and saves
   its checkpoint under ``checkpoints/`` (skipped when it exists);
3. evaluates it on the shifted domain (no adaptation);
4. fine-tunes it on the shifted domain with vanilla back-propagation
   (enc5L) and with gradient filtering (filt5L) on the same 5 layers;
5. prints a table: mIoU, train time per iteration (MMEngine's log), and the
   bytes autograd keeps for backward in one training forward pass (in total
   and by the trained convs).

Every step is an ordinary ``tools/train.py`` / ``tools/test.py`` command,
printed before it runs.
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, List, Tuple

CONFIG_DIR = 'configs/demo_seg'
CALIB = 'deeplabv3_r18-tiny-d8_calib_1xb8-1k_digits-64x64'
FULL = 'deeplabv3_r18-tiny-d8_full_1xb8-300_digits-shift-64x64'
VARIANTS = {
    'enc5L (vanilla BP, last 5 convs)':
    'deeplabv3_r18-tiny-d8_enc5L_1xb8-300_digits-shift-64x64',
    'filt5L (gradient filter, same 5 convs)':
    'deeplabv3_r18-tiny-d8_filt5L_1xb8-300_digits-shift-64x64',
}


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


def saved_bytes(cfg_file: str, data_root: str) -> Tuple[int, int]:
    """Bytes autograd saves for backward in one training forward pass of the
    config's model (after its hooks' surgery) on one training batch: in
    total, and by the convs that train."""
    import torch.nn as nn
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import HOOKS, init_default_scope
    from mmengine.runner import Runner

    import mmgradfilt  # noqa: F401
    from mmgradfilt.benchmark.memory import SavedTensorMeter
    cfg = Config.fromfile(cfg_file)
    cfg.train_dataloader.dataset.data_root = data_root
    init_default_scope(cfg.default_scope)
    from mmseg.registry import MODELS
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    for hook_cfg in cfg.get('custom_hooks', []):
        HOOKS.build(hook_cfg).apply(model)
    batch = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
    data = model.data_preprocessor(batch, training=True)
    convs = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.weight.requires_grad}
    model.train()
    with SavedTensorMeter(model, convs) as meter:
        model.loss(data['inputs'], data['data_samples'])
    return meter.total_bytes, sum(meter.module_bytes.values())


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
            None, None, None]
    }
    for label, name in VARIANTS.items():
        work_dir = osp.join(args.work_dir, name)
        run(['python', 'tools/train.py', config(name), '--work-dir', work_dir,
             '--cfg-options', f'load_from={ckpt}', *data_opt])
        scalars = last_scalars(work_dir)
        rows[label] = [miou(scalars), train_time(scalars),
                       *saved_bytes(config(name), args.data_root)]

    lines = ['| run on the shifted domain | mIoU (%) | train time / iter (s) '
             '| saved for backward, total (KiB) | by the trained convs (KiB) |',
             '| --- | --- | --- | --- | --- |']
    for label, (m, *cells) in rows.items():
        cells = ['-' if c is None else (f'{c:.4f}' if i == 0 else
                                        f'{c / 1024:.0f}')
                 for i, c in enumerate(cells)]
        lines.append(f'| {label} | {m:.2f} | ' + ' | '.join(cells) + ' |')
    table = '\n'.join(lines)
    minutes = (time.perf_counter() - start) / 60
    print(f'\n{table}\n\nDemo took {minutes:.1f} min.')
    os.makedirs(args.work_dir, exist_ok=True)
    with open(osp.join(args.work_dir, 'results.md'), 'w') as f:
        f.write(f'{table}\n\nDemo took {minutes:.1f} min.\n')


if __name__ == '__main__':
    main()
