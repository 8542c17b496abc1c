"""Plan what to train, and at which gradient-filter radius, for a memory
budget.

Measures on this machine, at the given batch and input size, what training
the last k conv layers of the config's model costs and how close each
layer's filtered weight gradient is to the exact one
(:func:`mmgradfilt.analysis.planner.plan_budget`); prints the plans and
writes the chosen one as a config (``DIR/config.py``) with ``plan.json``,
``plan.csv`` and ``plan.png``.
"""
import argparse
import math
import os.path as osp
import time

from mmengine.config import Config
from mmengine.utils import ProgressBar, mkdir_or_exist

from mmgradfilt.analysis.plan import Budget, plan_config
from mmgradfilt.analysis.planner import (LEGEND, PlanError, PlanResult,
                                         Reporter, plan_budget)
from mmgradfilt.cli import (add_cfg_options, check_analysis_args,
                            quiet_third_party, read_config)
from mmgradfilt.report import MB, write_json


def budget_mb(name: str):
    """An argparse type: a finite number > 0, the error naming the value."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{name} must be a number, got {text!r}') from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(
                f'{name} must be a positive number, got {text!r}')
        return value
    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Choose the conv layers to train and their gradient-'
        'filter radii for a memory budget; write the plan as a config')
    parser.add_argument('config', help='config file (mmseg or mmpretrain)')
    parser.add_argument('--max-saved-mb', type=budget_mb('--max-saved-mb'),
                        required=True, metavar='M',
                        help='budget: MiB the training step saves for '
                        'backward')
    parser.add_argument('--max-peak-mb', type=budget_mb('--max-peak-mb'),
                        metavar='P', help='budget: peak MiB of a training '
                        'step above the model and its optimizer state')
    parser.add_argument('--max-backward-gflops',
                        type=budget_mb('--max-backward-gflops'), metavar='F',
                        help='budget: GFLOPs of the conv layers\' backward')
    parser.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'),
                        help='image size of the costs (default: the config\'s '
                        'training size)')
    parser.add_argument('--batch-size', type=int, metavar='N',
                        help='default: the config\'s train_dataloader.'
                        'batch_size')
    parser.add_argument('--radius', type=int, nargs='+', default=[2, 4, 8],
                        metavar='R', help='candidate radii (default: '
                        '%(default)s)')
    parser.add_argument('--max-layers', type=int, metavar='K',
                        help='consider the last K conv layers only (default: '
                        'all)')
    parser.add_argument('--checkpoint', help='weights of the fidelity '
                        'measure; default: the config\'s load_from, else its '
                        'own initialisation')
    parser.add_argument('--min-cosine', type=float, default=0.5,
                        help='least weight-gradient cosine of a filtered '
                        'layer (default: %(default)s)')
    parser.add_argument('--batches', type=int, default=4,
                        help='training batches of the fidelity measure '
                        '(default: %(default)s)')
    parser.add_argument('--synthetic-data', action='store_true',
                        help='measure fidelity on random images and labels '
                        'instead of the config\'s training data (no dataset '
                        'needed; says little about real data)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the data order and augmentation')
    parser.add_argument('--out', metavar='DIR', help='output folder '
                        '(default: work_dirs/plan/<config name>)')
    add_cfg_options(parser)
    args = parser.parse_args()
    # the value named, before the shared checks' general message
    for radius in args.radius:
        if radius < 1:
            parser.error(f'--radius values must be >= 1, got {radius}')
    check_analysis_args(parser, args)
    for name in ('batch_size', 'batches', 'max_layers'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got '
                         f'{value}')
    if args.input_size and min(args.input_size) < 1:
        parser.error(f'--input-size must be positive, got {args.input_size}')
    if not -1 <= args.min_cosine <= 1:
        parser.error(f'--min-cosine must be in [-1, 1], got {args.min_cosine}')
    return args


class Console(Reporter):
    """The planner's lines and progress bars on the terminal, each bar's
    line ended before the next line."""

    def __init__(self) -> None:
        self.bar = None

    def say(self, text: str) -> None:
        self.end_bar()
        print(text)

    def progress(self, total: int):
        self.end_bar()
        self.bar = ProgressBar(total)
        return self.bar.update

    def end_bar(self) -> None:
        if self.bar is not None:
            print()
            self.bar = None


def write_plan(args: argparse.Namespace, result: PlanResult, limits: str,
               seconds: float) -> str:
    """The plan's config, plan.json, plan.csv and plan.png; their folder."""
    name = osp.splitext(osp.basename(args.config))[0]
    out_dir = args.out or osp.join('work_dirs', 'plan', name)
    mkdir_or_exist(out_dir)
    base = Config.fromfile(args.config)
    size, batch_size = result.input_size, result.batch_size
    shape = f'batch {batch_size} x {size[0]}x{size[1]}'
    extra = [f'# written by tools/plan.py: {limits} at {shape} on '
             f'{result.device}; see plan.json']
    if args.cfg_options:
        extra.append(f'# planned with --cfg-options {args.cfg_options}')
    if args.checkpoint:
        extra.append(f'load_from = {args.checkpoint!r}')
    if batch_size != base.train_dataloader.batch_size:
        extra.append(f'train_dataloader = dict(batch_size={batch_size})')
    with open(osp.join(out_dir, 'config.py'), 'w') as f:
        f.write(plan_config(osp.abspath(args.config), result.hook_cfg,
                            bool(base.get('custom_hooks')), extra))
    write_json(osp.join(out_dir, 'plan.json'),
               dict(config=args.config, **result.to_json(), seconds=seconds))
    result.front_table().write_csv(osp.join(out_dir, 'plan.csv'))
    result.plot(osp.join(out_dir, 'plan.png'), f'{name}\n{shape}, {limits}')
    return out_dir


def main() -> None:
    quiet_third_party()
    args = parse_args()
    start = time.perf_counter()
    budget = Budget(args.max_saved_mb * MB,
                    args.max_peak_mb and args.max_peak_mb * MB,
                    args.max_backward_gflops and args.max_backward_gflops * 1e9)
    console = Console()
    try:
        result = plan_budget(
            read_config(args), budget, input_size=args.input_size,
            batch_size=args.batch_size, radii=args.radius,
            max_layers=args.max_layers, checkpoint=args.checkpoint,
            min_cosine=args.min_cosine, batches=args.batches,
            synthetic_data=args.synthetic_data, device=args.device,
            seed=args.seed, reporter=console)
    except PlanError as e:
        console.end_bar()
        raise SystemExit(str(e)) from None
    console.end_bar()
    seconds = time.perf_counter() - start

    chosen, measured = result.chosen, result.measured
    limits = ', '.join([f'saved <= {args.max_saved_mb:g} MB'] + (
        [f'peak <= {args.max_peak_mb:g} MB'] if args.max_peak_mb else []) + (
        [f'backward <= {args.max_backward_gflops:g} GFLOPs']
        if args.max_backward_gflops else []))
    size = result.input_size
    print(f'{osp.basename(args.config)}, batch {result.batch_size} x '
          f'{size[0]}x{size[1]} on {result.device}, {limits}, filtered '
          f'layers\' dW cos >= {args.min_cosine:g} ({result.weights})')
    print(result.front_table().text())
    print()
    print(LEGEND)
    print()
    print(f'chosen: {chosen.trained} conv layers + {result.classifier}; saved '
          f'{chosen.saved_bytes / MB:.2f} MB predicted, '
          f'{measured["saved_bytes"] / MB:.2f} MB measured; peak '
          f'{chosen.peak_bytes / MB:.2f} MB predicted, '
          f'{measured["peak_bytes"] / MB:.2f} MB measured')
    if chosen.layers:
        print(result.chosen_table().text())
    print(f'planned in {seconds:.1f} s')
    out_dir = write_plan(args, result, limits, seconds)
    print(f'plan written to {osp.abspath(out_dir)} (config.py, plan.json, '
          'plan.csv, plan.png)')


if __name__ == '__main__':
    main()
