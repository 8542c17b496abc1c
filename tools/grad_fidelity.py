"""How close the filtered gradients of a config's layers are to exact ones.

Runs training passes of the config's model (its checkpoint, freezing and
gradient filters, as in training) over batches of its training data and
reports, per filtered conv, the cosine similarity and relative error of the
filtered weight and input gradients against the exact gradients of the same
input and output gradient. With ``--filter-norm``, also the same conv behind
a filtered BatchNorm (``filter_norm=True``) and that BN's weight and bias
gradients, on the same batches.
"""
import argparse
import itertools
import logging
import os.path as osp
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner, load_checkpoint
from mmengine.runner.utils import set_random_seed
from mmengine.utils import ProgressBar, mkdir_or_exist

from mmgradfilt.analysis.fidelity import (FIDELITY_LEGEND,
                                          FILTER_NORM_LEGEND, fidelity_table,
                                          measure_fidelity,
                                          norm_fidelity_table, plot_fidelity)
from mmgradfilt.benchmark.step import build_model, gradient_filter_hook
from mmgradfilt.cli import (add_cfg_options, check_analysis_args,
                            quiet_third_party, read_config)
from mmgradfilt.hooks import PretrainedCheckHook
from mmgradfilt.hooks.pretrained_check_hook import (CHECKPOINT_HINT,
                                                    missing_checkpoints_error,
                                                    pretrained_checkpoints)
from mmgradfilt.report import write_json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Filtered vs exact gradients of a config\'s layers')
    parser.add_argument('config', help='config file with a GradientFilterHook')
    parser.add_argument('--checkpoint', metavar='PTH',
                        help='weights to load (default: the config\'s '
                        'load_from, else its own initialisation, pretrained '
                        'backbone included)')
    parser.add_argument('--batches', type=int, default=8, metavar='N',
                        help='training batches to average over (default: '
                        '%(default)s)')
    parser.add_argument('--radius', type=int, nargs='+', metavar='R',
                        help='radii to compare on the same recorded '
                        'gradients (default: each layer\'s own)')
    parser.add_argument('--filter-norm', action='store_true',
                        help='also measure each conv behind a filtered '
                        'BatchNorm (filter_norm=True) and that BN\'s weight '
                        'and bias gradients; the training passes run exact '
                        'BatchNorms')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'],
                        help='device to run on (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the data order and augmentation '
                        '(default: %(default)s)')
    parser.add_argument('--out', metavar='DIR',
                        help='output folder for JSON, CSV and PNG (default: '
                        'work_dirs/grad_fidelity/<config name>)')
    add_cfg_options(parser)
    args = parser.parse_args()
    check_analysis_args(parser, args)
    if args.batches < 1:
        parser.error('--batches must be >= 1')
    return args


def checkpoint_hint(cfg: Config) -> str:
    """How to obtain a missing checkpoint: the hint of the config's
    ``PretrainedCheckHook`` (what its training run would say), else the
    default one."""
    hooks = [*cfg.get('default_hooks', {}).values(),
             *cfg.get('custom_hooks', [])]
    for hook in hooks:
        if isinstance(hook, dict) and hook.get('type') in (
                'PretrainedCheckHook', PretrainedCheckHook):
            return hook.get('hint', CHECKPOINT_HINT)
    return CHECKPOINT_HINT


def trained_model(cfg: Config, checkpoint: Optional[str],
                  device: torch.device, exact_norms: bool = False):
    """The config's model with ``checkpoint`` loaded (else initialised as the
    config says, pretrained parts included), then its gradient filters and
    freezing applied, in training mode; with ``exact_norms``, its
    BatchNorms left exact whatever the hook's ``filter_norm``."""
    model = build_model(cfg)
    wanted = ([('--checkpoint or load_from', checkpoint)]
              if checkpoint else pretrained_checkpoints(model))
    error = missing_checkpoints_error(wanted, checkpoint_hint(cfg))
    if error is not None:
        raise SystemExit(str(error))
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu',
                        logger='current')
    else:
        if not wanted:
            print_log('no checkpoint and no pretrained parts: gradients of '
                      'randomly initialised weights', logger='current',
                      level=logging.WARNING)
        model.init_weights()
    hook = gradient_filter_hook(cfg)
    if exact_norms:
        hook.filter_norm = False
    hook.apply(model)
    return model.to(device).train()


def main() -> None:
    quiet_third_party()
    args = parse_args()
    cfg = read_config(args)
    checkpoint = args.checkpoint or cfg.get('load_from')
    set_random_seed(args.seed)
    device = torch.device(args.device)
    try:
        model = trained_model(cfg, checkpoint, device, args.filter_norm)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=args.seed)
    except FileNotFoundError as e:
        raise SystemExit(f'training data: {e}') from None
    batches = itertools.islice(iter(loader), args.batches)
    bar = ProgressBar(args.batches)
    rows = measure_fidelity(model, batches, args.radius, bar.update,
                            args.filter_norm)
    print()
    if not rows:
        raise SystemExit('no filtered conv got a gradient from the loss')
    table = fidelity_table(rows, args.filter_norm)
    norm_table = norm_fidelity_table(rows) if args.filter_norm else None
    weights = checkpoint or 'the config\'s initialisation'
    print(f'{osp.basename(args.config)}, {weights}: filtered vs exact '
          f'gradients of the same input and output gradient, means over '
          f'{rows[0]["batches"]} training batches')
    print(table.text())
    if norm_table is not None:
        print()
        print(norm_table.text() if norm_table.rows else
              'no BatchNorm after a filtered conv that filter_norm=True '
              'would filter')
    print()
    print(FIDELITY_LEGEND)
    if norm_table is not None:
        print(FILTER_NORM_LEGEND)
    name = osp.splitext(osp.basename(args.config))[0]
    out_dir = args.out or osp.join('work_dirs', 'grad_fidelity', name)
    mkdir_or_exist(out_dir)
    write_json(osp.join(out_dir, 'fidelity.json'),
               dict(config=args.config, weights=weights,
                    batches=rows[0]['batches'], seed=args.seed,
                    filter_norm=args.filter_norm, layers=rows))
    table.write_csv(osp.join(out_dir, 'fidelity.csv'))
    if norm_table is not None:
        norm_table.write_csv(osp.join(out_dir, 'norm_fidelity.csv'))
    plot_fidelity(osp.join(out_dir, 'fidelity.png'), rows,
                  f'{name}\nfiltered vs exact weight gradients')
    print(f'results written to {osp.abspath(out_dir)}')


if __name__ == '__main__':
    main()
