"""Plan what to train, and at which gradient-filter radius, for a memory
budget.

Measures on this machine, at the given batch and input size, what training
the last k conv layers of the config's model costs (bytes saved for
backward, peak memory, backward FLOPs; each layer vanilla and filtered at
each radius) and how close each layer's filtered weight gradient is to the
exact one on the config's data and weights; picks the plan that trains the
most conv layers within every budget, measures its whole step for real and
writes it as a config (``DIR/config.py``) with ``plan.json``, ``plan.csv``
and ``plan.png``.
"""
import argparse
import copy
import dataclasses
import itertools
import math
import os.path as osp
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmengine.runner.utils import set_random_seed
from mmengine.utils import ProgressBar, mkdir_or_exist

from mmgradfilt.analysis.costs import measure_prefix
from mmgradfilt.analysis.plan import (Budget, Layer, Plan, PrefixCosts,
                                      choose_plan, fit_radii, freeze_rules,
                                      min_figures, plan_config, trace_layers)
from mmgradfilt.analysis.quality import layer_cosines
from mmgradfilt.analysis.weights import check_weights, load_weights
from mmgradfilt.benchmark.step import (TrainStep, build_model, measure_step,
                                       synthetic_batch, train_input_size)
from mmgradfilt.cli import (add_cfg_options, check_analysis_args,
                            quiet_third_party, read_config)
from mmgradfilt.hooks import GradientFilterHook
from mmgradfilt.report import MB, Column, Table, pair_label, pyplot, \
    save_figure, write_json

# settings of a GradientFilterHook the plan keeps from the config's own
HOOK_SETTINGS = ('norm_eval', 'lean_memory', 'filter_norm')
# plans measured over budget before the planner gives up
MAX_ATTEMPTS = 5


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


def hook_settings(cfg: Config) -> Dict:
    """The settings of the config's own GradientFilterHook that plans keep."""
    for hook in cfg.get('custom_hooks', []):
        if hook.get('type') in ('GradientFilterHook', GradientFilterHook):
            return {k: hook[k] for k in HOOK_SETTINGS if k in hook}
    return {}


def check_config(cfg: Config, path: str) -> None:
    if not isinstance(cfg.get('model'), dict):
        raise SystemExit(f'{path} has no model: nothing to plan')
    if cfg.get('default_scope') not in ('mmseg', 'mmpretrain'):
        raise SystemExit(f'{path}: default_scope '
                         f'{cfg.get("default_scope")!r}; only mmseg and '
                         'mmpretrain configs can be planned')


def fidelity_batches(cfg: Config, args: argparse.Namespace, batch: Dict):
    """The batches the fidelity is measured on (built now, so that missing
    data stops the planner before it measures anything)."""
    if args.synthetic_data:
        return [batch]
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    # worker processes cost more to start than a few batches take
    loader_cfg.update(num_workers=0, persistent_workers=False)
    try:
        loader = Runner.build_dataloader(loader_cfg, seed=args.seed)
    # MMSeg asserts that a dataset's ann_file exists
    except (FileNotFoundError, AssertionError) as e:
        raise SystemExit(f'training data: {e} (or pass --synthetic-data)'
                         ) from None
    return itertools.islice(iter(loader), args.batches)


def describe(plan: Plan) -> str:
    """The filtered layers' radii, counted: ``'3 at r2, 1 at r4'``."""
    radii = [pair_label(r) for r in plan.radii.values() if r]
    if not radii:
        return 'none'
    counts = {r: radii.count(r) for r in dict.fromkeys(sorted(
        radii, key=lambda r: int(r.split('x')[0])))}
    return ', '.join(f'{n} at r{r}' for r, n in counts.items())


FRONT_COLUMNS = [
    Column('', 'mark'), Column('trained convs', 'trained_convs'),
    Column('deepest trained', 'deepest_trained'),
    Column('filtered', 'filtered'),
    Column('saved MB', 'saved_predicted_MB', '.2f'),
    Column('saved MB meas.', 'saved_measured_MB', '.2f'),
    Column('peak MB', 'peak_predicted_MB', '.2f'),
    Column('peak MB meas.', 'peak_measured_MB', '.2f'),
    Column('bwd GFLOPs', 'backward_GFLOPs', '.3f'),
    Column('mean dW cos', 'mean_weight_cos', '.3f'),
    Column('fits', 'fits'),
]

LEGEND = '\n'.join([
    'one row per number of trained conv layers (the last ones of the forward '
    'pass, with their norms; the classifier always trains): its best plan '
    'within the budget, else its smallest',
    '*: the chosen plan; x: chosen but measured over the budget',
    'saved: bytes kept for backward in one training forward; peak: allocator '
    'peak of a step; predicted from per-layer costs, measured on the whole '
    'step (-: not measured)',
    'bwd GFLOPs: conv layers\' backward; mean dW cos: weight-gradient cosine, '
    'filtered vs exact, over the trained layers (vanilla counts 1)',
])


def plan_row(plan: Plan, mark: str, fits: bool,
             measured: Optional[Dict] = None) -> List:
    measured = measured or {}
    return [mark, plan.trained,
            plan.layers[-1].path if plan.layers else '(classifier only)',
            describe(plan), plan.saved_bytes / MB,
            measured['saved_bytes'] / MB if measured else None,
            plan.peak_bytes / MB,
            measured['peak_bytes'] / MB if measured else None,
            plan.backward_flops / 1e9, plan.mean_cosine,
            'yes' if fits else 'no']


def plan_json(plan: Plan, cosines: Dict) -> Dict:
    return dict(
        trained_convs=plan.trained,
        layers=[dict(path=layer.path, norm=layer.norm,
                     radius=plan.radii[layer.path],
                     weight_cos=cosines.get(layer.path, {}).get(
                         plan.radii[layer.path])
                     if plan.radii[layer.path] else 1.0)
                for layer in plan.layers],
        filter_install=plan.filter_install,
        predicted=dict(saved_bytes=plan.saved_bytes,
                       peak_bytes=plan.peak_bytes,
                       backward_flops=plan.backward_flops,
                       mean_weight_cos=plan.mean_cosine))


def prefix_json(prefix: PrefixCosts) -> Dict:
    return dict(
        trained_convs=prefix.trained, saved_bytes=prefix.saved_bytes,
        peak_bytes=prefix.peak_bytes, backward_flops=prefix.backward_flops,
        fixed_bytes=prefix.fixed_bytes,
        storages=[dict(bytes=b, radius=r and pair_label(r),
                       convs=sorted(c)) for b, r, c in prefix.storages],
        layer_flops={p: {pair_label(r) if r else 'vanilla': f
                         for r, f in v.items()}
                     for p, v in prefix.layer_flops.items()},
        all_filtered=dict(saved_bytes=prefix.filtered_saved_bytes,
                          peak_bytes=prefix.filtered_peak_bytes))


def plot_front(path: str, prefixes: Sequence[PrefixCosts],
               layers: Sequence[Layer], front: Sequence[Plan],
               chosen: Plan, budget: Budget, title: str) -> None:
    """Saved MB against trained conv layers: vanilla, smallest and front
    plans, the budget, the chosen plan marked."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    ks = [p.trained for p in prefixes]
    ax.plot(ks, [p.saved_bytes / MB for p in prefixes], 'o-', color='gray',
            label='all vanilla')
    ax.plot(ks, [min_figures(p, layers).saved_bytes / MB for p in prefixes],
            's--', color='tab:blue', label='smallest (every radius)')
    ax.plot([p.trained for p in front], [p.saved_bytes / MB for p in front],
            'd-', color='tab:green',
            label='front: best within budget, else smallest')
    ax.axhline(budget.saved_bytes / MB, color='tab:red', linestyle=':',
               label='budget')
    ax.plot([chosen.trained], [chosen.saved_bytes / MB], '*', markersize=16,
            color='tab:orange', label='chosen')
    ax.set_xlabel('trained conv layers (last k, + classifier)')
    ax.set_ylabel('saved for backward, MB (predicted)')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def measure_plan(model: torch.nn.Module, hook: GradientFilterHook,
                 cfg: Config, batch: Dict, device: torch.device) -> Dict:
    """The plan's whole step, measured: saved bytes and peak."""
    model = copy.deepcopy(model)
    hook.apply(model)
    step = TrainStep(model.to(device).train(), cfg.optim_wrapper, batch)
    result = measure_step(step, [], device, iters=1)
    return dict(saved_bytes=result['saved_bytes'],
                peak_bytes=result['peak_bytes'])


def over(measured: Dict, budget: Budget) -> Dict[str, float]:
    """``{figure: measured / limit}`` of the measured figures over budget."""
    ratios = {}
    for key, limit in (('saved_bytes', budget.saved_bytes),
                       ('peak_bytes', budget.peak_bytes)):
        if limit is not None and measured[key] > limit:
            ratios[key] = measured[key] / limit
    return ratios


def smallest_message(prefix: PrefixCosts, layers: Sequence[Layer],
                     why: str) -> str:
    least = min_figures(prefix, layers)
    return (f'no plan fits the budget: {why}; the smallest plan, the '
            f'classifier alone, needs {least.saved_bytes / MB:.2f} MB saved '
            f'for backward, a {least.peak_bytes / MB:.2f} MB peak and '
            f'{least.backward_flops / 1e9:.3f} backward GFLOPs')


def measure_prefixes(model: torch.nn.Module, layers: Sequence[Layer],
                     hook_for: Callable, cfg: Config, batch: Dict,
                     device: torch.device, budget: Budget
                     ) -> Tuple[List[PrefixCosts], Optional[PrefixCosts]]:
    """The costs of each prefix of ``layers`` that could fit ``budget``, and
    the first that cannot (None if all could): a longer prefix keeps
    everything a shorter one does, and more."""
    bar = ProgressBar(len(layers) + 1)
    prefixes = []
    for k in range(len(layers) + 1):
        prefix = measure_prefix(model, hook_for(layers[:k]), layers, k,
                                cfg.optim_wrapper, batch, device)
        bar.update()
        if not min_figures(prefix, layers).fits(budget):
            print()
            return prefixes, prefix
        prefixes.append(prefix)
    print()
    return prefixes, None


def choose_measured(prefixes: Sequence[PrefixCosts], layers: Sequence[Layer],
                    cosines: Dict, budget: Budget, min_cosine: float,
                    measure: Callable[[Plan], Dict]
                    ) -> Tuple[Optional[Plan], Optional[Dict], List]:
    """The chosen plan whose measured step fits ``budget``, its measured
    figures and the plans measured over budget before it. After a miss, the
    next choice is made under the budget shrunk by the miss's factor, so
    it predicts correspondingly less."""
    target, rejected = budget, []
    for _ in range(MAX_ATTEMPTS):
        chosen, _ = choose_plan(prefixes, layers, cosines, target, min_cosine)
        if chosen is None:
            break
        measured = measure(chosen)
        ratios = over(measured, budget)
        if not ratios:
            return chosen, measured, rejected
        rejected.append((chosen, measured))
        target = dataclasses.replace(target, **{
            key: getattr(budget, key) * getattr(chosen, key) / measured[key]
            for key in ratios})
    return None, None, rejected


def chosen_table(chosen: Plan, cosines: Dict) -> Table:
    """The chosen plan's layers: norm, radius, weight-gradient cosine."""
    rows = []
    for layer in chosen.layers:
        radius = chosen.radii[layer.path]
        rows.append([layer.path, layer.norm or '-',
                     pair_label(radius) if radius else 'vanilla',
                     cosines[layer.path][radius] if radius else None])
    return Table([Column('trained layer', 'layer'), Column('norm', 'norm'),
                  Column('radius', 'radius'),
                  Column('dW cos', 'weight_cos', '.3f')], rows)


def front_table(front: Sequence[Plan], chosen: Plan, measured: Dict,
                rejected: Sequence, budget: Budget) -> Table:
    """The front, the chosen and rejected plans marked with their measured
    figures; the chosen plan last if it is not on the front (chosen under a
    budget shrunk after a miss)."""
    marks = [('*', chosen, measured)] + [('x', p, m) for p, m in rejected]
    rows = []
    for plan in front:
        mark, result = next(((mark, m) for mark, p, m in marks
                             if (p.trained, p.radii) ==
                             (plan.trained, plan.radii)), ('', None))
        rows.append(plan_row(plan, mark, plan.fits(budget), result))
    if not any(r[0] == '*' for r in rows):
        rows.append(plan_row(chosen, '*', True, measured))
    return Table(FRONT_COLUMNS, rows)


def main() -> None:
    quiet_third_party()
    args = parse_args()
    start = time.perf_counter()
    cfg = read_config(args)
    check_config(cfg, args.config)
    base = Config.fromfile(args.config)
    if args.batch_size:
        cfg.train_dataloader.batch_size = args.batch_size
    batch_size = cfg.train_dataloader.batch_size
    found = train_input_size(cfg)
    if args.input_size is None and found is None:
        raise SystemExit(f'{args.config} gives no training image size: pass '
                         '--input-size H W')
    size = tuple(args.input_size) if args.input_size else found[0]
    budget = Budget(args.max_saved_mb * MB,
                    args.max_peak_mb and args.max_peak_mb * MB,
                    args.max_backward_gflops and args.max_backward_gflops * 1e9)
    settings = hook_settings(cfg)
    device = torch.device(args.device)
    set_random_seed(args.seed)

    # every input checked before anything is measured
    model = build_model(cfg)
    checkpoint = args.checkpoint or cfg.get('load_from')
    try:
        check_weights(model, checkpoint, cfg)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    batch = synthetic_batch(cfg, batch_size, size)
    batches = fidelity_batches(cfg, args, batch)

    weights = load_weights(model, checkpoint)
    model.to(device).train()
    # the costs' model pads its inputs to the planned size
    cost_model = copy.deepcopy(model)
    if getattr(cost_model.data_preprocessor, 'size', None) is not None:
        cost_model.data_preprocessor.size = size
    data = cost_model.data_preprocessor(batch, True)
    layers, classifier, skipped = trace_layers(
        cost_model, lambda: cost_model(**data, mode='loss'))
    layers = layers[:args.max_layers]
    fit_radii(layers, args.radius)

    def hook_for(plan_layers, filter_install=()):
        return GradientFilterHook(
            filter_install=filter_install,
            freeze_layers=freeze_rules(model, plan_layers, classifier),
            **settings)

    print(f'{len(layers)} candidate conv layers, classifier {classifier}; '
          f'measuring the step of each prefix ({batch_size} x {size[0]}x'
          f'{size[1]}, {device.type})')
    prefixes, stop = measure_prefixes(cost_model, layers, hook_for, cfg,
                                      batch, device, budget)
    if not prefixes:
        raise SystemExit(smallest_message(stop, layers, 'not even the '
                                          'classifier alone fits'))
    if stop is not None:
        print(f'stopped at {stop.trained} trained layers: even filtered, '
              f'they need {min_figures(stop, layers).saved_bytes / MB:.2f} MB '
              'saved for backward; longer prefixes need more')
    reach = prefixes[-1].trained
    print(f'measuring gradient fidelity of the last {reach} layers '
          f'({weights}, {"synthetic" if args.synthetic_data else "training"}'
          ' data)')
    fidelity_model = copy.deepcopy(model)
    hook_for(layers[:reach]).apply(fidelity_model)
    batches = list(batches)
    bar = ProgressBar(len(batches))
    cosines = layer_cosines(fidelity_model.train(), layers[:reach], batches,
                            bar.update)
    del fidelity_model
    print()

    chosen, measured, rejected = choose_measured(
        prefixes, layers, cosines, budget, args.min_cosine,
        lambda plan: measure_plan(
            cost_model, hook_for(plan.layers, plan.filter_install), cfg,
            batch, device))
    if chosen is None:
        raise SystemExit(smallest_message(
            prefixes[0], layers, f'the {len(rejected)} plans chosen measured '
            'over it'))
    _, front = choose_plan(prefixes, layers, cosines, budget, args.min_cosine)
    seconds = time.perf_counter() - start

    table = front_table(front, chosen, measured, rejected, budget)
    name = osp.splitext(osp.basename(args.config))[0]
    limits = [f'saved <= {args.max_saved_mb:g} MB'] + (
        [f'peak <= {args.max_peak_mb:g} MB'] if args.max_peak_mb else []) + (
        [f'backward <= {args.max_backward_gflops:g} GFLOPs']
        if args.max_backward_gflops else [])
    print(f'{osp.basename(args.config)}, batch {batch_size} x {size[0]}x'
          f'{size[1]} on {device.type}, {", ".join(limits)}, filtered '
          f'layers\' dW cos >= {args.min_cosine:g} ({weights})')
    print(table.text())
    print()
    print(LEGEND)
    print()
    print(f'chosen: {chosen.trained} conv layers + {classifier}; saved '
          f'{chosen.saved_bytes / MB:.2f} MB predicted, '
          f'{measured["saved_bytes"] / MB:.2f} MB measured; peak '
          f'{chosen.peak_bytes / MB:.2f} MB predicted, '
          f'{measured["peak_bytes"] / MB:.2f} MB measured')
    if chosen.layers:
        print(chosen_table(chosen, cosines).text())
    print(f'planned in {seconds:.1f} s')

    out_dir = args.out or osp.join('work_dirs', 'plan', name)
    mkdir_or_exist(out_dir)
    freeze = freeze_rules(model, chosen.layers, classifier)
    hook_cfg = dict(type='GradientFilterHook',
                    filter_install=chosen.filter_install,
                    freeze_layers=freeze, **settings)
    extra = [f'# written by tools/plan.py: {", ".join(limits)} at batch '
             f'{batch_size} x {size[0]}x{size[1]} on {device.type}; '
             'see plan.json']
    if args.cfg_options:
        extra.append(f'# planned with --cfg-options {args.cfg_options}')
    if args.checkpoint:
        extra.append(f'load_from = {args.checkpoint!r}')
    if batch_size != base.train_dataloader.batch_size:
        extra.append(f'train_dataloader = dict(batch_size={batch_size})')
    with open(osp.join(out_dir, 'config.py'), 'w') as f:
        f.write(plan_config(osp.abspath(args.config), hook_cfg,
                            bool(base.get('custom_hooks')), extra))
    write_json(osp.join(out_dir, 'plan.json'), dict(
        config=args.config, weights=weights,
        data='synthetic' if args.synthetic_data else 'training',
        input_size=list(size), batch_size=batch_size, device=device.type,
        radii=args.radius, min_cosine=args.min_cosine,
        budget=dict(saved_MB=args.max_saved_mb, peak_MB=args.max_peak_mb,
                    backward_GFLOPs=args.max_backward_gflops),
        classifier=classifier, skipped=skipped,
        candidates=[dict(path=layer.path, norm=layer.norm,
                         in_shape=layer.in_shape, out_shape=layer.out_shape,
                         radii=[pair_label(r) for r in layer.radii],
                         weight_cos={pair_label(r): c for r, c in
                                     cosines.get(layer.path, {}).items()})
                    for layer in layers],
        measured_prefixes=[prefix_json(p) for p in prefixes],
        stopped_at=stop and stop.trained,
        front=[plan_json(p, cosines) for p in front],
        chosen=dict(**plan_json(chosen, cosines), freeze_layers=freeze,
                    measured=measured),
        rejected=[dict(**plan_json(p, cosines), measured=m)
                  for p, m in rejected],
        seconds=seconds))
    table.write_csv(osp.join(out_dir, 'plan.csv'))
    plot_front(osp.join(out_dir, 'plan.png'), prefixes, layers, front, chosen,
               budget, f'{name}\nbatch {batch_size} x {size[0]}x{size[1]}, '
               f'{", ".join(limits)}')
    print(f'plan written to {osp.abspath(out_dir)} (config.py, plan.json, '
          'plan.csv, plan.png)')


if __name__ == '__main__':
    main()
