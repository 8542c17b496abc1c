"""How close the gradients of a config's fine-tuning are to exact ones.

Builds the config's model (its checkpoint, else its own initialisation) as
the config trains it (gradient filters, filtered BatchNorms, the lean step,
its freezing) and the same model with every approximation off (the config's
freezing only), sharing one set of weights, and runs both on the same
training batches (:mod:`mmgradfilt.analysis.fidelity`). Per filtered conv
and filtered BatchNorm it reports the cosine similarity and relative error of
the weight and input gradients against the exact model's; ``--radius``
compares radii (every filter of the config at each) on the same batches.
"""
import argparse
import itertools
import os.path as osp

import torch
from mmengine.runner import Runner
from mmengine.runner.utils import set_random_seed
from mmengine.utils import ProgressBar, mkdir_or_exist

from mmgradfilt.analysis.fidelity import (FIDELITY_LEGEND, NORM_LEGEND,
                                          at_radii, configured_models, fidelity_table,
                                          measure_fidelity,
                                          norm_fidelity_table, plot_fidelity)
from mmgradfilt.analysis.weights import check_weights, load_weights
from mmgradfilt.benchmark.step import build_model
from mmgradfilt.cli import (add_cfg_options, check_analysis_args,
                            quiet_third_party, read_config)
from mmgradfilt.hooks.gradient_filter_hook import recipe_from_config
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
                        help='radii to compare on the same batches, every '
                        'filter of the config at each (default: each '
                        'layer\'s own)')
    parser.add_argument('--filter-norm', action='store_true',
                        help='measure with filtered BatchNorms after the '
                        'filtered convs (filter_norm=True, lean_memory=True) '
                        'whatever the config says')
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


def main() -> None:
    quiet_third_party()
    args = parse_args()
    cfg = read_config(args)
    checkpoint = args.checkpoint or cfg.get('load_from')
    set_random_seed(args.seed)
    device = torch.device(args.device)
    try:
        recipe = recipe_from_config(cfg)
        if args.filter_norm:
            recipe = recipe.replace(lean_memory=True, filter_norm=True)
        model = build_model(cfg)
        check_weights(model, checkpoint, cfg)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    weights = load_weights(model, checkpoint)
    model.to(device).train()
    try:
        exact, models = configured_models(
            model, at_radii(recipe, args.radius))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    try:
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=args.seed)
    except FileNotFoundError as e:
        raise SystemExit(f'training data: {e}') from None
    batches = itertools.islice(iter(loader), args.batches)
    bar = ProgressBar(args.batches)
    results = measure_fidelity(models, exact, batches, own=True,
                               progress=bar.update)
    print()
    rows = [row for key in models for row in results[key]]
    if not rows:
        raise SystemExit('no filtered layer got a gradient from the loss')
    table, norm_table = fidelity_table(rows), norm_fidelity_table(rows)
    print(f'{osp.basename(args.config)}, {weights}: the configured model\'s '
          'gradients against the exact model\'s (same weights and batches), '
          f'means over {rows[0]["batches"]} training batches')
    print(table.text())
    if norm_table.rows:
        print()
        print(norm_table.text())
    print()
    print(FIDELITY_LEGEND)
    if norm_table.rows:
        print(NORM_LEGEND)
    name = osp.splitext(osp.basename(args.config))[0]
    out_dir = args.out or osp.join('work_dirs', 'grad_fidelity', name)
    mkdir_or_exist(out_dir)
    write_json(osp.join(out_dir, 'fidelity.json'),
               dict(config=args.config, weights=weights,
                    batches=rows[0]['batches'], seed=args.seed,
                    recipe=recipe.to_config(), layers=rows))
    table.write_csv(osp.join(out_dir, 'fidelity.csv'))
    if norm_table.rows:
        norm_table.write_csv(osp.join(out_dir, 'norm_fidelity.csv'))
    plot_fidelity(osp.join(out_dir, 'fidelity.png'), rows,
                  f'{name}\nconfigured vs exact weight gradients')
    print(f'results written to {osp.abspath(out_dir)}')


if __name__ == '__main__':
    main()
