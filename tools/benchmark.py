"""Measure the training cost of gradient filtering on this device.

Config mode: builds the config's model twice, vanilla (the config's freezing,
no filter) and filtered (as its GradientFilterHook says), and times forward,
backward and optimizer step, with saved-activation memory, peak memory and
backward FLOPs of the filtered layers.

Layer mode (``--layers``): times single conv shapes, PyTorch's backward vs
the filtered one, for several radii.
"""
import argparse
import os
import os.path as osp
import platform

import torch
from mmengine.utils import ProgressBar, mkdir_or_exist

from mmgradfilt.benchmark.layers import (bench_layer, layer_table,
                                         load_layer_suite)
from mmgradfilt.benchmark.report import (layer_sum, plot_layers, plot_step,
                                         step_tables, write_csv, write_json)
from mmgradfilt.benchmark.step import (PHASES, TrainStep, build_models,
                                       measure_step, synthetic_batch,
                                       time_steps)
from mmgradfilt.benchmark.timing import paired_ratio
from mmgradfilt.cli import add_cfg_options, check_analysis_args, read_config
from mmgradfilt.report import format_table


def parse_args():
    parser = argparse.ArgumentParser(
        description='Benchmark gradient filtering: vanilla vs filtered')
    parser.add_argument('config', nargs='?', help='config file (config mode)')
    parser.add_argument('--layers', nargs='?', const='builtin',
                        help='layer mode: the built-in suite, or a JSON file '
                        'with a list of ConvShape fields')
    parser.add_argument('--radius', type=int, nargs='+', default=[2, 4, 7, 8],
                        help='layer mode: radii to time')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtype', default='float32',
                        choices=['float32', 'float16', 'bfloat16'],
                        help='layer mode: data type')
    parser.add_argument('--input-size', type=int, nargs=2, default=[512, 512],
                        metavar=('H', 'W'), help='config mode: image size')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--iters', type=int, default=10,
                        help='timed repeats')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed repeats first')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--out', help='output folder for JSON, CSV and PNG; '
                        'defaults to work_dirs/benchmark/<config or layers>')
    add_cfg_options(parser)
    args = parser.parse_args()
    if (args.config is None) == (args.layers is None):
        parser.error('give either a CONFIG or --layers')
    check_analysis_args(parser, args)
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error('--iters and --batch-size must be >= 1, --warmup >= 0')
    return args


def environment(args) -> dict:
    """What the numbers were measured on."""
    device = (torch.cuda.get_device_name() if args.device == 'cuda' else
              platform.processor() or platform.machine())
    return dict(device=args.device, device_name=device, torch=torch.__version__,
                threads=torch.get_num_threads(), batch_size=args.batch_size,
                iters=args.iters, warmup=args.warmup)


def run_config(args, device: torch.device, out_dir: str) -> None:
    cfg = read_config(args)
    size = tuple(args.input_size)
    vanilla, filtered, paths = build_models(cfg, device, size)
    batch = synthetic_batch(cfg, args.batch_size, size)
    result = dict(config=args.config, input_size=size, env=environment(args),
                  filtered_layers=paths)
    steps = {key: TrainStep(model, cfg.optim_wrapper, batch)
             for key, model in (('vanilla', vanilla), ('filtered', filtered))}
    bar = ProgressBar(len(steps) * (args.warmup + args.iters))
    timings = time_steps(steps, device, args.iters, args.warmup, bar.update)
    print()
    for key, step in steps.items():
        result[key] = dict(timings[key],
                           **measure_step(step, paths, device, args.iters))
    van, fil = result['vanilla'], result['filtered']
    result['ratios'] = dict(
        {p: paired_ratio(van[p], fil[p]) for p in (*PHASES, 'step')},
        saved=van['saved_bytes'] / fil['saved_bytes'],
        peak=van['peak_bytes'] / fil['peak_bytes'],
        layer_saved=layer_sum(van, 'saved_bytes') /
        max(layer_sum(fil, 'saved_bytes'), 1),
        layer_flops=layer_sum(van, 'backward_flops') /
        layer_sum(fil, 'backward_flops'))
    peak_kind = ('torch.cuda.max_memory_allocated' if device.type == 'cuda'
                 else 'CPU allocator peak from torch.profiler memory events')
    print(f'{osp.basename(args.config)}: batch {args.batch_size}, '
          f'{size[0]}x{size[1]}, {args.device} ({result["env"]["device_name"]}'
          f', {result["env"]["threads"]} threads), medians [quartiles] of '
          f'{args.iters} steps after {args.warmup} warm-up, taken in turn '
          '(time ratios: medians of the steps\' ratios); peak: '
          f'{peak_kind}')
    print(step_tables(result))
    write_json(osp.join(out_dir, 'benchmark.json'), result)
    write_csv(osp.join(out_dir, 'benchmark.csv'),
              ['model', *PHASES, 'step', 'saved_bytes', 'peak_bytes'],
              [[k, *(result[k][p]['median'] for p in (*PHASES, 'step')),
                result[k]['saved_bytes'], result[k]['peak_bytes']]
               for k in ('vanilla', 'filtered')])
    plot_step(osp.join(out_dir, 'benchmark.png'), result,
              f'{osp.basename(args.config)} ({args.device})')


def run_layers(args, device: torch.device, out_dir: str) -> None:
    try:
        shapes = load_layer_suite(
            None if args.layers == 'builtin' else args.layers)
    except (OSError, ValueError) as e:
        raise SystemExit(f'--layers: {e}') from None
    dtype = getattr(torch, args.dtype)
    env = environment(args)
    json_path = osp.join(out_dir, 'layers.json')
    bar = ProgressBar(len(shapes) * len(args.radius))
    results = []
    for shape in shapes:
        for radius in args.radius:
            results.append(bench_layer(shape, radius, args.batch_size, device,
                                       dtype, args.iters, args.warmup))
            # on disk as measured: a crash or Ctrl-C loses one layer at most
            write_json(json_path, dict(env=env, results=results,
                                       complete=False))
            bar.update()
    print()
    print(f'layer suite: batch {args.batch_size}, {args.dtype}, {args.device} '
          f'({env["device_name"]}, {env["threads"]} threads), medians of '
          f'{args.iters} runs after {args.warmup} warm-up, taken in turn; '
          'ratios: medians of the runs\' ratios')
    headers, rows = layer_table(results)
    print(format_table(headers, rows))
    write_json(json_path, dict(env=env, results=results, complete=True))
    write_csv(osp.join(out_dir, 'layers.csv'), headers, rows)
    plot_layers(osp.join(out_dir, 'layers.png'), results,
                f'filtered conv backward vs PyTorch ({args.device}, '
                f'{args.dtype}, batch {args.batch_size})')


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = ('layers' if args.config is None else
            osp.splitext(osp.basename(args.config))[0])
    out_dir = args.out or osp.join('work_dirs', 'benchmark', name)
    mkdir_or_exist(out_dir)
    if args.config is None:
        run_layers(args, device, out_dir)
    else:
        run_config(args, device, out_dir)
    print(f'results written to {os.path.abspath(out_dir)}')


if __name__ == '__main__':
    main()
