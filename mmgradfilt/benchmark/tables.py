"""What the benchmark prints and draws beyond the layer suite's table: a
config's step table, where its memory goes (saved bytes by kind of module,
the peak by phase), its per-layer table, the CSV table of all of them, their
legend, and the charts. The writers and chart helpers are :mod:`mmgradfilt.report`'s."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..report import MB, Column, Table, pyplot, radius_bars, save_figure
from .memory import KINDS, STEP_PHASES
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


def variants(result: Dict) -> List[Dict]:
    """The measured variants (key, label, ...) in their order."""
    return result['variants']


def _ratios(result: Dict, key: str) -> Dict:
    """vanilla / variant ratios (and variant / filtered step times); empty
    for the vanilla model itself."""
    return result['ratios'].get(key, {})


def _has_lean_speedup(result: Dict) -> bool:
    """Whether a model has its step's speed-up against filtered+lean (the
    cached one)."""
    return any('speedup_vs_lean' in r for r in result['ratios'].values())


def _cached(result: Dict) -> List[Dict]:
    """The variants trained from a feature store (their result has
    ``cache_bytes_per_sample``)."""
    return [v for v in variants(result)
            if 'cache_bytes_per_sample' in result[v['key']]]


def cache_notes(result: Dict) -> List[str]:
    """One line per cached model: the frontier it reads, its bytes per
    sample, the modules it skips and the time of its reads."""
    lines = []
    for variant in _cached(result):
        res = result[variant['key']]
        tensors = ', '.join(
            f"{t['name']} {'x'.join(map(str, t['shape']))}"
            for t in res['frontier'])
        read = res.get('cache_read')
        lines.append(
            f"{variant['label']}: reads {tensors} from the store, "
            f"{res['cache_bytes_per_sample'] / 2**10:,.1f} KiB per sample in "
            f"{res['cache_dtype']}; skips {', '.join(res['skipped'])}" + (
                '' if read is None else
                f"; the read (part of its forward) {read['median']:.1f} ms"))
    return lines


def step_table(result: Dict) -> Table:
    """The whole step of each model, printed: phase medians [quartiles],
    the step time against vanilla and against filtered, saved and peak
    memory with their vanilla/model ratios and the phase of the peak."""
    kernels = 'step_kernel_ms' in result['vanilla']
    vs_lean = _has_lean_speedup(result)
    columns = [Column('model', 'model'),
               *(Column(f'{p} ms', p) for p in TIMES),
               Column('speedup', 'step_speedup', '.2f', 'x'),
               *([Column('speedup vs lean', 'step_speedup_vs_lean', '.2f', 'x')]
                 if vs_lean else []),
               Column('step vs filtered', 'step_vs_filtered', '.2f', 'x'),
               Column('saved MB', 'saved', '.1f'),
               Column('saved ratio', 'saved_ratio', '.2f', 'x'),
               Column('peak MB', 'peak', '.1f'),
               Column('peak ratio', 'peak_ratio', '.2f', 'x'),
               Column('peak phase', 'peak_phase')]
    if kernels:
        columns.append(Column('step kernel ms', 'step_kernel', '.2f'))
    rows = []
    for variant in variants(result):
        res, ratios = result[variant['key']], _ratios(result, variant['key'])
        row = [variant['label'], *(_ms(res[p]) for p in TIMES),
               ratios.get('step'),
               *([ratios.get('speedup_vs_lean')] if vs_lean else []),
               ratios.get('step_vs_filtered'),
               res['saved_bytes'] / MB, ratios.get('saved'),
               res['peak_bytes'] / MB, ratios.get('peak'), res['peak_phase']]
        if kernels:
            row.append(res['step_kernel_ms'])
        rows.append(row)
    return Table(columns, rows)


def memory_table(result: Dict) -> Table:
    """Where the memory goes, per model: saved bytes by kind of the module
    that saved them, and the peak of each phase of the step."""
    columns = [Column('model', 'model'),
               *(Column(f'saved {k} MB', k, '.2f') for k in KINDS),
               Column('saved MB', 'saved', '.2f'),
               *(Column(f'peak {p} MB', p, '.1f') for p in STEP_PHASES)]
    rows = []
    for variant in variants(result):
        res = result[variant['key']]
        rows.append([variant['label'],
                     *(res['saved_by_kind'][k] / MB for k in KINDS),
                     res['saved_bytes'] / MB,
                     *(_mb(res['phase_peak_bytes'][p]) for p in STEP_PHASES)])
    return Table(columns, rows)


def _mb(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / MB


def peak_notes(result: Dict) -> List[str]:
    """One line per model: its peak, the phase it falls in and the kind of
    module that saved the most; then, where a peak falls in the frozen
    forward, a line naming the lever for it (MMEngine's
    ``accumulative_counts``)."""
    lines, frozen = [], []
    for variant in variants(result):
        res = result[variant['key']]
        kinds = res['saved_by_kind']
        top = max(KINDS, key=lambda k: kinds[k])
        lines.append(
            f"{variant['label']}: peak {res['peak_bytes'] / MB:.1f} MB in the "
            f"{res['peak_phase']}; most saved by {top} modules "
            f"({kinds[top] / MB:.1f} of {res['saved_bytes'] / MB:.1f} MB)")
        if res['peak_phase'] == 'frozen forward':
            frozen.append(variant['label'])
    if frozen:
        lines.append(
            f"The peak of {', '.join(frozen)} is in the frozen layers' "
            'forward, which saves nothing for backward: neither the filter nor '
            'the lean step can lower it; a smaller batch per step can, with '
            'MMEngine\'s gradient accumulation '
            '(optim_wrapper=dict(accumulative_counts=N), '
            'train_dataloader.batch_size divided by N)')
    return lines


def csv_table(result: Dict) -> Table:
    """Everything of the printed tables as numbers: a row for the whole
    model (times, peak and its phases, saved and its kinds, for each model
    measured), then the rows of :func:`layers_table` (their time and peak
    cells empty: measured for the whole step only).

    A figure of the whole model is ``{name}_{model}_{unit}``; vanilla /
    filtered is ``{name}_speedup_x`` for times and ``{name}_ratio_x``
    otherwise, vanilla / another model ``{name}_{model}_speedup_x`` and
    ``{name}_{model}_ratio_x``.
    """
    keys = [v['key'] for v in variants(result)]
    later = keys[2:]  # the models after vanilla and filtered
    res = {k: result[k] for k in keys}
    cells: List[Tuple[Column, object]] = [(LAYER_COLUMNS[0], 'whole model')]

    def add(name: str, unit: str, fmt: str, ratio_name: str,
            value: Callable[[str], Optional[float]], models: Sequence[str],
            ratio_key: str) -> None:
        """Columns of ``value`` for ``models``, then vanilla/model ratios
        (``result['ratios'][model][ratio_key]``) for those after vanilla."""
        for k in models:
            cells.append((Column(f'{name} {unit} ({k})', f'{name}_{k}_{unit}',
                                 fmt), value(k)))
        for k in models:
            if k != 'vanilla':
                column = (f'{name}_{ratio_name}_x' if k == 'filtered' else
                          f'{name}_{k}_{ratio_name}_x')
                cells.append((Column(f'{name} {ratio_name} ({k})', column,
                                     '.2f', 'x'), _ratios(result, k)[ratio_key]))

    for phase in TIMES:
        add(phase, 'ms', '.1f', 'speedup',
            lambda k, p=phase: res[k][p]['median'],
            keys, phase)
    if 'step_kernel_ms' in res['vanilla']:
        add('step_kernel', 'ms', '.2f', 'speedup',
            lambda k: res[k]['step_kernel_ms'], keys, 'step_kernel')
    add('peak', 'MB', '.1f', 'ratio', lambda k: res[k]['peak_bytes'] / MB,
        keys, 'peak')
    cells += [(Column(f'step vs filtered ({k})', f'step_{k}_vs_filtered_x',
                      '.2f', 'x'), _ratios(result, k)['step_vs_filtered'])
              for k in later]
    cells += [(Column(f'step speedup vs lean ({k})',
                      f'step_{k}_speedup_vs_lean_x', '.2f', 'x'),
               _ratios(result, k)['speedup_vs_lean'])
              for k in later if 'speedup_vs_lean' in _ratios(result, k)]
    for v in _cached(result):
        k = v['key']
        cells += [(Column(f'cache per sample MB ({k})',
                          f'cache_per_sample_{k}_MB', '.4f'),
                   res[k]['cache_bytes_per_sample'] / MB),
                  (Column(f'cache read ms ({k})', f'cache_read_{k}_ms', '.2f'),
                   (res[k].get('cache_read') or {}).get('median'))]
    cells += [(Column(f'peak phase ({k})', f'peak_phase_{k}'),
               res[k]['peak_phase']) for k in keys]
    for phase in STEP_PHASES:
        cells += [(Column(f'peak {phase} MB ({k})',
                          f"peak_{phase.replace(' ', '_')}_{k}_MB", '.1f'),
                   _mb(res[k]['phase_peak_bytes'][phase])) for k in keys]
    for kind in KINDS:
        cells += [(Column(f'saved {kind} MB ({k})', f'saved_{kind}_{k}_MB',
                          '.3f'), res[k]['saved_by_kind'][kind] / MB)
                  for k in keys]
    # vanilla's and filtered's saved bytes go in the layer columns below
    add('saved', 'MB', '.3f', 'ratio', lambda k: res[k]['saved_bytes'] / MB,
        later, 'saved')
    saved = [res[k]['saved_bytes'] / MB for k in ('vanilla', 'filtered')]
    columns = [c for c, _ in cells] + LAYER_COLUMNS[1:]
    rows = [[*(v for _, v in cells), *saved, ratio(*saved), None, None, None]]
    rows += [[row[0], *[None] * (len(cells) - 1), *row[1:]]
             for row in layers_table(result).rows]
    return Table(columns, rows)


def step_legend(result: Dict, peak_kind: str) -> str:
    """What the columns of :func:`step_table`, :func:`memory_table` and
    :func:`layers_table` mean."""
    iters = result['vanilla']['step']['n']
    width = max(len(v['label']) for v in variants(result)) + 1
    return '\n'.join([
        *(f"{v['label'] + ':':<{width}} {v['description']}" + (
            '' if v['settings'] is None else ' ({})'.format(', '.join(
                f'{k}={x}' for k, x in v['settings'].items())))
          for v in variants(result)),
        f'ms: median [quartiles] over {iters} timed steps; step = forward + '
        'backward + optimizer',
        'speedup, ratio: vanilla / the model (for times, the median of the '
        'steps\' ratios); above 1 the model is faster or needs less',
        'step vs filtered: the model\'s step time / filtered\'s (median of '
        'the steps\' ratios), the cost of the lean step',
        *(['speedup vs lean: filtered+lean\'s step time / the model\'s '
           '(median of the steps\' ratios)'] if _has_lean_speedup(result)
          else []),
        'saved MB: tensors autograd keeps for backward in one forward pass '
        '(in the model, or in the layer)',
        'saved <kind> MB: by the innermost module running when a tensor was '
        'first saved: conv, norm, activation, loss (the decode head\'s '
        'loss_by_feat, the classification head\'s _get_loss), other; they '
        'add up to saved MB',
        f'peak MB: {peak_kind}, above what was live before the step; '
        'peak <phase> MB: the highest point in that phase: frozen forward '
        '(until the first trained module), trained forward, loss, backward, '
        'optimizer',
        'bwd GFLOPs: analytic, the input and weight gradients of the layer '
        '(1 GFLOP = 1e9 FLOPs)',
    ])


def plot_step(path: str, result: Dict, title: str) -> None:
    """Stacked phase times, saved bytes stacked by kind of module, and the
    peak of each phase, for each model."""
    plt = pyplot()
    labels = [v['label'] for v in variants(result)]
    res = [result[v['key']] for v in variants(result)]
    fig, (ax_t, ax_s, ax_p) = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, parts, values, ylabel in (
            (ax_t, PHASES, lambda r, p: r[p]['median'],
             'median time per step (ms)'),
            (ax_s, KINDS, lambda r, k: r['saved_by_kind'][k] / MB,
             'saved for backward (MB)')):
        bottom = [0.0] * len(res)
        for part in parts:
            heights = [values(r, part) for r in res]
            ax.bar(labels, heights, bottom=bottom, label=part)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    width = 0.8 / len(STEP_PHASES)
    for i, phase in enumerate(STEP_PHASES):
        ax_p.bar([j + i * width for j in range(len(res))],
                 [_mb(r['phase_peak_bytes'][phase]) or 0 for r in res], width,
                 label=phase)
    ax_p.set_xticks([j + 0.4 - width / 2 for j in range(len(res))])
    ax_p.set_xticklabels(labels)
    ax_p.set_ylabel('peak memory in the phase (MB)')
    ax_p.legend(fontsize=8)
    for ax in (ax_t, ax_s, ax_p):
        ax.tick_params(axis='x', labelsize=8, rotation=15)
    notes = [f"{v['label']}: trained from the stored frontier "
             f"({result[v['key']]['cache_bytes_per_sample'] / 2**10:,.1f} KiB "
             f"per sample, {result[v['key']]['cache_dtype']}), the frozen "
             'part upstream not run' for v in _cached(result)]
    fig.suptitle('\n'.join([title, *notes]))
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
