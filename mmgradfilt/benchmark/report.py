"""Benchmark output: terminal tables, JSON, CSV and a PNG chart."""
import csv
import json
import os
from typing import Dict, List, Sequence

from ..report import format_table

MB = 2.0**20


def _ms(stats: Dict) -> str:
    return f"{stats['median']:.1f} [{stats['q1']:.1f}-{stats['q3']:.1f}]"


def layer_sum(result: Dict, key: str) -> float:
    """Sum of ``key`` over the filtered layers of one model's result."""
    return sum(layer[key] for layer in result['layers'].values())


def step_tables(result: Dict) -> str:
    """The step summary and the per-layer table of a config benchmark."""
    rows = []
    for key in ('vanilla', 'filtered'):
        r = result[key]
        rows.append([
            key, _ms(r['forward']), _ms(r['backward']), _ms(r['optimizer']),
            _ms(r['step']),
            f"{layer_sum(r, 'saved_bytes') / MB:.2f}",
            f"{r['saved_bytes'] / MB:.1f}", f"{r['peak_bytes'] / MB:.1f}",
            f"{layer_sum(r, 'backward_flops') / 1e9:.3f}"
        ])
    ratio = result['ratios']
    rows.append(['vanilla/filtered', f"{ratio['forward']:.2f}x",
                 f"{ratio['backward']:.2f}x", f"{ratio['optimizer']:.2f}x",
                 f"{ratio['step']:.2f}x", f"{ratio['layer_saved']:.1f}x",
                 f"{ratio['saved']:.2f}x", f"{ratio['peak']:.2f}x",
                 f"{ratio['layer_flops']:.1f}x"])
    headers = ['model', 'forward ms', 'backward ms', 'optimizer ms', 'step ms',
               'layers saved MB', 'all saved MB', 'peak MB',
               'layers bwd GFLOPs']
    if 'step_kernel_ms' in result['vanilla']:
        headers.append('step kernel ms')
        van, fil = (result[k]['step_kernel_ms'] for k in ('vanilla', 'filtered'))
        rows[0].append(f'{van:.2f}')
        rows[1].append(f'{fil:.2f}')
        rows[2].append(f'{van / fil:.2f}x')
    summary = format_table(headers, rows)
    layer_rows = [[
        path, f"{result['vanilla']['layers'][path]['saved_bytes'] / MB:.3f}",
        f"{layer['saved_bytes'] / MB:.3f}",
        f"{result['vanilla']['layers'][path]['backward_flops'] / 1e9:.3f}",
        f"{layer['backward_flops'] / 1e9:.4f}"
    ] for path, layer in result['filtered']['layers'].items()]
    layers = format_table(['filtered layer', 'saved MB', 'saved MB (filt)',
                           'bwd GFLOPs', 'bwd GFLOPs (filt)'], layer_rows)
    return f'{summary}\n\n{layers}'


def write_json(path: str, data) -> None:
    """Write ``data`` whole or not at all: a crash mid-write keeps the old file."""
    with open(path + '.tmp', 'w') as f:
        json.dump(data, f, indent=2)
    os.replace(path + '.tmp', path)


def write_csv(path: str, headers: Sequence[str],
              rows: List[Sequence]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_step(path: str, result: Dict, title: str) -> None:
    """Stacked phase times and peak memory, vanilla vs filtered."""
    plt = _pyplot()
    keys = ['vanilla', 'filtered']
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 4))
    bottom = [0.0, 0.0]
    for phase in ('forward', 'backward', 'optimizer'):
        values = [result[k][phase]['median'] for k in keys]
        ax_t.bar(keys, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_t.set_ylabel('median time per step (ms)')
    ax_t.legend()
    ax_m.bar(keys, [result[k]['peak_bytes'] / MB for k in keys],
             color='tab:gray', label='peak')
    ax_m.bar(keys, [result[k]['saved_bytes'] / MB for k in keys],
             color='tab:purple', label='saved for backward')
    ax_m.set_ylabel('memory (MB)')
    ax_m.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pair_label(values) -> str:
    """``4`` for an int or a square pair, ``2x4`` otherwise."""
    if isinstance(values, int):
        return str(values)
    return (str(values[0]) if values[0] == values[1] else
            '{}x{}'.format(*values))


def _radius_label(radius) -> str:
    return f'r={pair_label(radius)}'


def _bar_groups(rows: Sequence[Dict], label_key: str, value_key: str):
    """A figure and its axes with one group of bars per ``label_key`` value,
    one bar per radius (in the order the rows give them)."""
    names = list(dict.fromkeys(r[label_key] for r in rows))
    radii = list(dict.fromkeys(_radius_label(r['radius']) for r in rows))
    fig, ax = _pyplot().subplots(figsize=(max(6, 1.2 * len(names)), 4.5))
    width = 0.8 / len(radii)
    for i, radius in enumerate(radii):
        value = {r[label_key]: r[value_key] for r in rows
                 if _radius_label(r['radius']) == radius}
        ax.bar([j + i * width for j in range(len(names))],
               [value.get(n) or 0 for n in names], width, label=radius)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha='right', fontsize=8)
    ax.legend()
    return fig, ax


def _save(fig, ax, path: str, title: str) -> None:
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_layers(path: str, results: Sequence[Dict], title: str) -> None:
    """Backward speed-up per layer and radius (log scale)."""
    fig, ax = _bar_groups(sorted(results, key=lambda r: r['radius']), 'name',
                          'backward_speedup')
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_yscale('log')
    ax.set_ylabel('backward speed-up vs PyTorch (x)')
    _save(fig, ax, path, title)


def plot_fidelity(path: str, rows: Sequence[Dict], title: str) -> None:
    """Cosine of the filtered and exact weight gradients per layer and radius."""
    fig, ax = _bar_groups(rows, 'layer', 'weight_cos')
    ax.set_ylim(min(0.0, *(r['weight_cos'] for r in rows)), 1.0)
    ax.set_ylabel('cosine, filtered vs exact weight gradient')
    _save(fig, ax, path, title)
