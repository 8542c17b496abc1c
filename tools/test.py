"""Evaluate a checkpoint with an OpenMMLab 2.0 config (mIoU, accuracy, ...).

The config's ``test_dataloader`` and ``test_evaluator`` decide the data and
the metric (``IoUMetric`` for MMSeg configs); the metrics are logged and
printed.
"""
import argparse

from mmgradfilt.cli import (add_runner_args, build_runner, load_config,
                            parse_runner_args, quiet_third_party)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    add_runner_args(parser, 'the dir to save logs and evaluation results')
    return parse_runner_args(parser)


def main() -> None:
    quiet_third_party()
    args = parse_args()
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    runner = build_runner(cfg)
    metrics = runner.test()
    print(', '.join(f'{k}: {v}' for k, v in metrics.items()))


if __name__ == '__main__':
    main()
