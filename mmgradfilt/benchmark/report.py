"""What the benchmark prints and draws beyond the layer suite's table: a
config's step table, per-layer table, the CSV table of both, their legend,
and the charts. The writers and chart helpers are :mod:`mmgradfilt.report`'s."""
from typing import Dict, List, Optional

from ..report import (MB, Column, Table, format_table, pyplot, radius_bars,
                      save_figure)
from .step import PHASES

TIMES = (*PHASES, 'step')
MODELS = ('vanilla', 'filtered')


def layer_sum(result: Dict, key: str) -> float:
    """Sum of ``key`` over the filtered layers of one model's result."""
    return sum(layer[key] for layer in result['layers'].values())


def ratio(vanilla: Optional[float],
          filtered: Optional[float]) -> Optional[float]:
    """``vanilla / filtered``; None where either is missing or filtered is 0."""
    if vanilla is None or not filtered:
        return None
    return vanilla / filtered


def compared(header: str, name: str, unit: str, fmt: str, ratio_header: str,
             ratio_name: str) -> List[Column]:
    """The three columns of one quantity: vanilla, filtered and
    vanilla/filtered (``ratio_name``: ``speedup`` for times, ``ratio``
    otherwise)."""
    return [
        Column(f'{header} {unit} (vanilla)', f'{name}_vanilla_{unit}', fmt),
        Column(f'{header} {unit} (filtered)', f'{name}_filtered_{unit}', fmt),
        Column(ratio_header, f'{name}_{ratio_name}_x', '.2f', 'x'),
    ]


LAYER_COLUMNS = [
    Column('filtered layer', 'layer'),
    *compared('saved', 'saved', 'MB', '.3f', 'saved ratio', 'ratio'),
    *compared('bwd', 'backward', 'GFLOPs', '.4f', 'bwd FLOPs ratio',
              'flops_ratio'),
]


def _memory(van: Dict, fil: Dict) -> List[Optional[float]]:
    """Saved MB and backward GFLOPs, each vanilla, filtered and their ratio."""
    saved = [van['saved_bytes'] / MB, fil['saved_bytes'] / MB]
    flops = [van['backward_flops'] / 1e9, fil['backward_flops'] / 1e9]
    return [*saved, ratio(*saved), *flops, ratio(*flops)]


def _sums(result: Dict) -> Dict:
    return {k: layer_sum(result, k) for k in ('saved_bytes', 'backward_flops')}


def layers_table(result: Dict) -> Table:
    """Per filtered layer, then their sum: the bytes autograd saves for
    backward in the layer and its analytic backward FLOPs."""
    van, fil = (result[k] for k in MODELS)
    rows = [[path, *_memory(van['layers'][path], layer)]
            for path, layer in fil['layers'].items()]
    rows.append(['filtered layers (sum)', *_memory(_sums(van), _sums(fil))])
    return Table(LAYER_COLUMNS, rows)


def _ms(stats: Dict) -> str:
    return f"{stats['median']:.1f} [{stats['q1']:.1f}-{stats['q3']:.1f}]"


def step_table(result: Dict) -> str:
    """The whole step, printed: phase medians [quartiles], saved and peak
    memory of each model, and a row of vanilla/filtered ratios."""
    headers = ['model', *(f'{p} ms' for p in TIMES), 'saved MB', 'peak MB']
    rows = [[key, *(_ms(result[key][p]) for p in TIMES),
             f"{result[key]['saved_bytes'] / MB:.1f}",
             f"{result[key]['peak_bytes'] / MB:.1f}"] for key in MODELS]
    ratios = result['ratios']
    rows.append(['vanilla/filtered',
                 *(f'{ratios[k]:.2f}x' for k in (*TIMES, 'saved', 'peak'))])
    if 'step_kernel_ms' in result['vanilla']:
        headers.append('step kernel ms')
        kernel = [result[k]['step_kernel_ms'] for k in MODELS]
        rows[0].append(f'{kernel[0]:.2f}')
        rows[1].append(f'{kernel[1]:.2f}')
        rows[2].append(f'{ratio(*kernel):.2f}x')
    return format_table(headers, rows)


def csv_table(result: Dict) -> Table:
    """Everything of the printed tables as numbers: a row for the whole
    model (times, peak, saved), then the rows of :func:`layers_table`
    (their time and peak cells empty: measured for the whole step only)."""
    van, fil = (result[k] for k in MODELS)
    step_columns = LAYER_COLUMNS[:1]
    values: List[Optional[float]] = ['whole model']
    for phase in TIMES:
        step_columns += compared(phase, phase, 'ms', '.1f',
                                 f'{phase} speedup', 'speedup')
        values += [van[phase]['median'], fil[phase]['median'],
                   result['ratios'][phase]]
    if 'step_kernel_ms' in van:
        step_columns += compared('step kernel', 'step_kernel', 'ms', '.2f',
                                 'step kernel speedup', 'speedup')
        kernel = [van['step_kernel_ms'], fil['step_kernel_ms']]
        values += [*kernel, ratio(*kernel)]
    step_columns += compared('peak', 'peak', 'MB', '.1f', 'peak ratio',
                             'ratio')
    peak = [van['peak_bytes'] / MB, fil['peak_bytes'] / MB]
    values += [*peak, ratio(*peak)]
    extra = len(step_columns) - 1
    saved = [van['saved_bytes'] / MB, fil['saved_bytes'] / MB]
    rows = [[*values, *saved, ratio(*saved), None, None, None]]
    rows += [[row[0], *[None] * extra, *row[1:]]
             for row in layers_table(result).rows]
    return Table([*step_columns, *LAYER_COLUMNS[1:]], rows)


def step_legend(result: Dict, peak_kind: str) -> str:
    """What the columns of :func:`step_table` and :func:`layers_table` mean."""
    iters = result['filtered']['step']['n']
    return '\n'.join([
        'vanilla:  the config\'s model with the config\'s freezing and no '
        'gradient filter (PyTorch\'s backward)',
        'filtered: the same model with the config\'s GradientFilterHook '
        'applied (the filtered layers above)',
        f'ms: median [quartiles] over {iters} timed steps; step = forward + '
        'backward + optimizer',
        'vanilla/filtered, speedup, ratio: vanilla / filtered (for times, '
        'the median of the steps\' ratios); above 1 the filter is faster or '
        'needs less',
        'saved MB: tensors autograd keeps for backward in one forward pass '
        '(in the model, or in the layer)',
        f'peak MB: {peak_kind}, above what was live before the step',
        'bwd GFLOPs: analytic, the input and weight gradients of the layer '
        '(1 GFLOP = 1e9 FLOPs)',
    ])


def plot_step(path: str, result: Dict, title: str) -> None:
    """Stacked phase times and peak memory, vanilla vs filtered."""
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 4))
    bottom = [0.0, 0.0]
    for phase in PHASES:
        values = [result[k][phase]['median'] for k in MODELS]
        ax_t.bar(MODELS, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_t.set_ylabel('median time per step (ms)')
    ax_t.legend()
    ax_m.bar(MODELS, [result[k]['peak_bytes'] / MB for k in MODELS],
             color='tab:gray', label='peak')
    ax_m.bar(MODELS, [result[k]['saved_bytes'] / MB for k in MODELS],
             color='tab:purple', label='saved for backward')
    ax_m.set_ylabel('memory (MB)')
    ax_m.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def plot_layers(path: str, results: List[Dict], title: str) -> None:
    """Backward speed-up per layer and radius (log scale)."""
    fig, ax = radius_bars(sorted(results, key=lambda r: r['radius']), 'name',
                          'backward_speedup')
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_yscale('log')
    ax.set_ylabel('backward speed-up, vanilla / filtered (x)')
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
