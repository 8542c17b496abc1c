"""Measure the training cost of gradient filtering on this device.

Config mode: builds the config's model as vanilla (the config's freezing, no
filter: PyTorch's backward), filtered (its GradientFilterHook without the
lean step), filtered+lean (the hook as configured, lean_memory=True),
with ``--filter-norm`` filtered+lean+norm (filter_norm=True), and
filtered+lean+cache (filtered+lean trained from FrozenFeatureCacheHook's
stored frontier once every entry is stored: the frozen part not run), and
times forward, backward and optimizer step on a synthetic batch of the
config's training size, with saved-activation memory (by kind of module),
peak memory (and the phase of the step that holds it) and backward FLOPs of
the filtered layers.

Layer mode (``--layers``): times single conv shapes, PyTorch's backward vs
the filtered one, for several radii.
"""
import argparse
import os.path as osp
import platform
from typing import Dict, Sequence

import torch
from mmengine.utils import ProgressBar, mkdir_or_exist

from mmgradfilt.benchmark.cached import CACHED, CachedStep, NotCacheable
from mmgradfilt.benchmark.layers import (bench_layers, layer_legend,
                                         layer_table, load_layer_suite)
from mmgradfilt.benchmark.tables import (TIMES, cache_notes, csv_table,
                                         layers_table, memory_table,
                                         peak_notes, plot_layers, plot_step,
                                         ratio, step_legend, step_table)
from mmgradfilt.benchmark.step import (LEAN_NORM, VARIANTS, Variant,
                                       build_variants, measure_step,
                                       step_size, synthetic_batch, time_steps)
from mmgradfilt.benchmark.timing import paired_ratio
from mmgradfilt.cli import (add_cfg_options, check_analysis_args,
                            quiet_third_party, read_config)
from mmgradfilt.report import write_json

LAYER_BATCH_SIZE = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Benchmark gradient filtering: vanilla (PyTorch\'s '
        'backward) vs filtered, on this device')
    parser.add_argument('config', nargs='?', help='config file (config mode)')
    parser.add_argument('--layers', nargs='?', const='builtin', metavar='FILE',
                        help='layer mode: the built-in suite, or a JSON file '
                        'with a list of ConvShape fields')
    parser.add_argument('--radius', type=int, nargs='+', default=[2, 4, 7, 8],
                        metavar='R', help='layer mode: radii to time (default: '
                        '%(default)s)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'],
                        help='device to measure on (default: %(default)s)')
    parser.add_argument('--dtype', default='float32',
                        choices=['float32', 'float16', 'bfloat16'],
                        help='layer mode: data type (default: %(default)s)')
    parser.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'),
                        help='config mode: image size (default: the '
                        'config\'s training size: the last RandomCrop '
                        'crop_size, RandomResizedCrop scale or fixed Resize '
                        'scale of its train pipeline, else its crop_size, '
                        'else its data preprocessor\'s size)')
    parser.add_argument('--batch-size', type=int, metavar='N',
                        help='default: the config\'s '
                        'train_dataloader.batch_size in config mode, '
                        f'{LAYER_BATCH_SIZE} in layer mode')
    parser.add_argument('--filter-norm', action='store_true',
                        help='config mode: also measure filtered+lean+norm, '
                        'the hook with filter_norm=True (patch-statistics '
                        'BatchNorms), unless filtered+lean has it already '
                        '(to see the exact lean step then, give the hook '
                        'filter_norm=False with --cfg-options)')
    parser.add_argument('--no-cache', action='store_true',
                        help='config mode: do not measure filtered+lean+cache '
                        '(filtered+lean trained from FrozenFeatureCacheHook\'s '
                        'stored frontier, every entry stored)')
    parser.add_argument('--iters', type=int, default=10, metavar='N',
                        help='timed repeats (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=3, metavar='N',
                        help='untimed repeats first (default: %(default)s)')
    parser.add_argument('--threads', type=int, metavar='N',
                        help='CPU threads, torch.set_num_threads (default: '
                        'torch\'s)')
    parser.add_argument('--out', metavar='DIR',
                        help='output folder for JSON, CSV and PNG (default: '
                        'work_dirs/benchmark/<config name>, '
                        'work_dirs/benchmark/layers for the built-in suite, '
                        'work_dirs/benchmark/layers_<file name> for a file)')
    add_cfg_options(parser)
    args = parser.parse_args()
    if (args.config is None) == (args.layers is None):
        parser.error('give either a CONFIG or --layers')
    check_analysis_args(parser, args)
    if args.iters < 1 or args.warmup < 0 or (args.batch_size or 1) < 1:
        parser.error('--iters and --batch-size must be >= 1, --warmup >= 0')
    return args


def environment(args: argparse.Namespace, batch_size: int) -> dict:
    """What the numbers were measured on."""
    device = (torch.cuda.get_device_name() if args.device == 'cuda' else
              platform.processor() or platform.machine())
    return dict(device=args.device, device_name=device, torch=torch.__version__,
                threads=torch.get_num_threads(), batch_size=batch_size,
                iters=args.iters, warmup=args.warmup)


def variant_ratios(result: Dict, variants: Sequence[Variant]) -> Dict:
    """For each model after vanilla: vanilla / model for times (paired),
    saved and peak memory; for the lean ones also their step time /
    filtered's (paired); for the cached one filtered+lean's step time / its
    own (paired)."""
    van = result['vanilla']
    ratios = {}
    for variant in variants[1:]:
        res = result[variant.key]
        ratios[variant.key] = dict(
            {t: paired_ratio(van[t], res[t]) for t in TIMES},
            saved=ratio(van['saved_bytes'], res['saved_bytes']),
            peak=ratio(van['peak_bytes'], res['peak_bytes']))
        if 'step_kernel_ms' in res:
            ratios[variant.key]['step_kernel'] = ratio(
                van['step_kernel_ms'], res['step_kernel_ms'])
        if variant.key != 'filtered':
            ratios[variant.key]['step_vs_filtered'] = paired_ratio(
                res['step'], result['filtered']['step'])
        if variant.step is CachedStep:
            ratios[variant.key]['speedup_vs_lean'] = paired_ratio(
                result['lean']['step'], res['step'])
    return ratios


def run_config(args: argparse.Namespace, device: torch.device,
               out_dir: str) -> None:
    cfg = read_config(args)
    try:
        size, batch_size, what = step_size(cfg, args.input_size,
                                           args.batch_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    env = environment(args, batch_size)
    variants = (*VARIANTS, *([LEAN_NORM] if args.filter_norm else []),
                *([] if args.no_cache else [CACHED]))
    batch = synthetic_batch(cfg, batch_size, size)
    try:
        steps, paths, settings = build_variants(cfg, device, size, batch,
                                                variants)
    except NotCacheable as e:
        print(f'{CACHED.label} not measured: {e}')
        variants = tuple(v for v in variants if v is not CACHED)
        steps, paths, settings = build_variants(cfg, device, size, batch,
                                                variants)
    if args.filter_norm and settings['lean']['filter_norm']:
        # the config's lean step filters its norms already: the same model
        print('--filter-norm: filtered+lean has filter_norm=True already')
        variants = tuple(v for v in variants if v is not LEAN_NORM)
        del steps[LEAN_NORM.key]
    labels = ', '.join(v.label for v in variants)
    print(f'{osp.basename(args.config)}: {what}, {args.device} '
          f'({env["device_name"]}, {env["threads"]} threads), {args.iters} '
          f'timed steps after {args.warmup} warm-up, {labels} in turn')
    result = dict(config=args.config, input_size=size, env=env,
                  filtered_layers=paths,
                  variants=[dict(v.to_dict(), settings=settings.get(v.key))
                            for v in variants])
    bar = ProgressBar(len(steps) * (args.warmup + args.iters))
    timings = time_steps(steps, device, args.iters, args.warmup, bar.update)
    print()
    for key, step in steps.items():
        measured = measure_step(step, device, paths, iters=args.iters)
        result[key] = dict(timings[key], **measured.to_dict(paths))
        if isinstance(step, CachedStep):
            result[key].update(step.cache_info())
    result['ratios'] = variant_ratios(result, variants)
    peak_kind = ('torch.cuda.max_memory_allocated' if device.type == 'cuda'
                 else 'the CPU allocator\'s peak (torch.profiler memory '
                 'events)')
    print(step_table(result).text())
    print()
    print('Where the memory goes:')
    print(memory_table(result).text())
    print('\n'.join(peak_notes(result) + cache_notes(result)))
    print()
    print(layers_table(result).text())
    print()
    print(step_legend(result, peak_kind))
    write_json(osp.join(out_dir, 'benchmark.json'), result)
    csv_table(result).write_csv(osp.join(out_dir, 'benchmark.csv'))
    plot_step(osp.join(out_dir, 'benchmark.png'), result,
              f'{osp.basename(args.config)} ({args.device})')


def run_layers(args: argparse.Namespace, device: torch.device,
               out_dir: str) -> None:
    try:
        shapes = load_layer_suite(
            None if args.layers == 'builtin' else args.layers)
    except (OSError, ValueError) as e:
        raise SystemExit(f'--layers: {e}') from None
    dtype = getattr(torch, args.dtype)
    batch_size = args.batch_size or LAYER_BATCH_SIZE
    env = environment(args, batch_size)
    print(f'layer suite: batch {batch_size}, {args.dtype}, {args.device} '
          f'({env["device_name"]}, {env["threads"]} threads), {args.iters} '
          f'timed runs after {args.warmup} warm-up, vanilla and filtered in '
          'turn')
    bar = ProgressBar(len(shapes) * len(args.radius))
    results = bench_layers(shapes, args.radius, batch_size, device, dtype,
                           args.iters, args.warmup,
                           osp.join(out_dir, 'layers.json'), env, bar.update)
    print()
    table = layer_table(results)
    print(table.text())
    print()
    print(layer_legend(args.iters))
    table.write_csv(osp.join(out_dir, 'layers.csv'))
    plot_layers(osp.join(out_dir, 'layers.png'), results,
                f'filtered conv backward vs PyTorch ({args.device}, '
                f'{args.dtype}, batch {batch_size})')


def output_dir(args: argparse.Namespace) -> str:
    """``--out``, else a folder under work_dirs/benchmark/ named after the
    config or the layer file."""
    if args.out:
        return args.out
    if args.config is not None:
        name = osp.splitext(osp.basename(args.config))[0]
    elif args.layers == 'builtin':
        name = 'layers'
    else:
        name = 'layers_' + osp.splitext(osp.basename(args.layers))[0]
    return osp.join('work_dirs', 'benchmark', name)


def main() -> None:
    quiet_third_party()
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = output_dir(args)
    mkdir_or_exist(out_dir)
    if args.config is None:
        run_layers(args, device, out_dir)
    else:
        run_config(args, device, out_dir)
    print(f'results written to {osp.abspath(out_dir)}')


if __name__ == '__main__':
    main()
