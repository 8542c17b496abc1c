"""Train a model from an OpenMMLab 2.0 config (MMSeg, MMPretrain, ...).

The same steps as MMSeg's and MMPretrain's ``tools/train.py``: the config's
``default_scope`` picks the toolbox, and ``custom_imports`` imports
mmgradfilt, so ``mim train mmseg CONFIG`` runs the same configs.
"""
import argparse
import logging

from mmengine.config import Config
from mmengine.logging import print_log

from mmgradfilt.cli import (add_runner_args, build_runner, load_config,
                            parse_runner_args, quiet_third_party)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--resume',
        action='store_true',
        help='resume from the latest checkpoint in the work_dir automatically')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the actual batch size '
        '(the config\'s auto_scale_lr.base_batch_size)')
    add_runner_args(parser, 'the dir to save logs and models')
    return parse_runner_args(parser)


def merge_args(cfg: Config, args: argparse.Namespace) -> Config:
    """Apply the training options to the config."""
    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.',
                      logger='current', level=logging.WARNING)
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise ValueError('--auto-scale-lr needs auto_scale_lr='
                             'dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True
    cfg.resume = args.resume
    return cfg


def main() -> None:
    quiet_third_party()
    args = parse_args()
    cfg = merge_args(load_config(args), args)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
