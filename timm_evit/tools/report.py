"""Reporting, for bench and sweep: their Markdown tables, the line under a table whose timings
spread widely, their JSON / CSV rows and their figures."""
import csv
import io
import json
import textwrap
from dataclasses import asdict, fields
from typing import List, Optional, Sequence

from ._io import pyplot
from .files import figure_writer, write_all_whole
from .measure import spread_note
from .sweep import SweepRow

__all__ = ['markdown_table', 'bench_table', 'bench_spread_note', 'rows_as_dicts', 'rows_figure', 'sweep_table',
           'sweep_spread_note', 'sweep_paths', 'write_sweep']


def bench_spread_note(rows, repeats: int) -> Optional[str]:
    """``spread_note`` for bench's rows."""
    spreads = {}
    for r in rows:
        what = "timm's model's time" if r.keep_rate is None else f'the speed-up at keep_rate {r.keep_rate:g}'
        spreads[f'{what}, {r.attn} attention, batch {r.batch_size}'] = r.spread
        if r.latency_spread is not None:
            spreads[f'{what}, {r.attn} attention, batch 1'] = r.latency_spread
    return spread_note(spreads, repeats)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells as text): the table bench and sweep print."""
    lines = [_markdown_line(header), '|---' * len(header) + '|']
    return '\n'.join(lines + [_markdown_line(row) for row in rows])


def _markdown_line(cells: Sequence[str]) -> str:
    return '| ' + ' | '.join(cells) + ' |'


def bench_table(rows) -> str:
    """A Markdown table (speed-ups over the plain model in the same runtime; in onnxruntime also over
    the plain model in torch fp32)."""
    latency = rows[0].latency_ms is not None
    vs_torch = rows[0].speedup_vs_torch is not None
    header = ['model', 'attn', 'keep_rate', 'fuse', 'tokens per stage', 'GMACs', 'MAC ratio', 'img/s', 'speed-up',
              'spread', 'efficiency'] + (['batch-1 ms', 'latency speed-up', 'spread'] if latency else [])
    if vs_torch:
        header += ['speed-up vs torch fp32'] + (['latency speed-up vs torch fp32'] if latency else [])
    lines = []
    for r in rows:
        keep = '-' if r.keep_rate is None else f'{r.keep_rate:g}'
        fuse = '-' if r.fuse_token is None else ('no' if not r.fuse_token else 'size' if r.fusion == 'size' else 'yes')
        line = [r.model, r.attn, keep, fuse, ', '.join(map(str, r.tokens)), f'{r.gmacs:.2f}', f'{r.mac_ratio:.2f}x',
                f'{r.images_per_s:.1f}', f'{r.speedup:.2f}x', _percent(r.spread), f'{r.efficiency:.2f}']
        if latency:
            line += [f'{r.latency_ms:.1f}', f'{r.latency_speedup:.2f}x', _percent(r.latency_spread)]
        if vs_torch:
            line += [f'{r.speedup_vs_torch:.2f}x'] + ([f'{r.latency_speedup_vs_torch:.2f}x'] if latency else [])
        lines.append(line)
    return markdown_table(header, lines)


def _percent(spread: Optional[float]) -> str:
    return '-' if spread is None else f'{100 * spread:.0f} %'


def rows_as_dicts(rows) -> List[dict]:
    """The rows as dicts (for JSON and CSV)."""
    return [asdict(r) for r in rows]


def rows_figure(rows, title: str = ''):
    """Speed-up and GMACs against keep rate, as a matplotlib figure (close it with
    ``pyplot().close(fig)``)."""
    plt = pyplot()
    fig, (ax_speed, ax_macs) = plt.subplots(1, 2, figsize=(10, 4))
    evit_rows = [r for r in rows if r.keep_rate is not None]
    for impl in dict.fromkeys(r.attn for r in evit_rows):
        sel = sorted((r for r in evit_rows if r.attn == impl), key=lambda r: r.keep_rate)
        ax_speed.plot([r.keep_rate for r in sel], [r.speedup for r in sel], 'o-', label=f'measured, {impl} attention')
    sel = sorted({r.keep_rate: r for r in evit_rows}.values(), key=lambda r: r.keep_rate)
    ax_speed.plot([r.keep_rate for r in sel], [r.mac_ratio for r in sel], 'ko-', label='MAC ratio')
    ax_macs.plot([r.keep_rate for r in sel], [r.gmacs for r in sel], 'o-', label='keep_rate')
    ax_speed.set(xlabel='keep_rate', ylabel='throughput / plain timm model', title='speed-up (same run)')
    ax_speed.legend(fontsize=7)
    plain = [r.gmacs for r in rows if r.keep_rate is None]
    if plain:
        ax_macs.axhline(plain[0], color='k', ls='--', label='plain model')
    ax_macs.set(xlabel='keep_rate', ylabel='GMACs per image', title='GMACs')
    ax_macs.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 130), fontsize=8)
    fig.tight_layout()
    return fig


def sweep_spread_note(rows, repeats: int) -> Optional[str]:
    """``bench.spread_note`` for sweep's rows (None where speed was not measured)."""
    if not rows or rows[0].spread is None:
        return None
    spreads = {"timm's model's time": rows[0].plain_spread}
    spreads.update({f'the speed-up at keep_rate {r.keep_rate:g}': r.spread for r in rows})
    return spread_note(spreads, repeats)


def sweep_table(rows) -> str:
    """A Markdown table (see ``bench.markdown_table``), speed-up against the plain model of the rows
    (in the same runtime); for an onnxruntime sweep also the PyTorch model's top-1 and the images
    whose top-1 class the export changed."""
    header = ['keep_rate', 'top-1', 'top-5', 'GMACs']
    lines = [[f'{r.keep_rate:g}', f'{r.top1:.2f}', f'{r.top5:.2f}', f'{r.gmacs:.3g}'] for r in rows]
    if rows[0].images_per_s is not None:   # speed measured
        header += ['img/s', f'speed-up vs {rows[0].plain_model}', 'spread']
        for line, r in zip(lines, rows):
            line += [f'{r.images_per_s:.1f}', f'{r.speedup_vs_plain:.2f}x', f'{100 * r.spread:.0f} %']
    if rows[0].runtime != 'torch':
        header += ['top-1 in PyTorch', 'top-1 class changed']
        for line, r in zip(lines, rows):
            line += [f'{r.torch_top1:.2f}', f'{r.changed_predictions} of {r.num_images}']
    return markdown_table(header, lines)


def sweep_paths(prefix: str, plot: bool = True) -> List[str]:
    """The files ``write_sweep`` writes: ``prefix``.csv, .json and (with ``plot``) .png."""
    return [prefix + suffix for suffix in ('.csv', '.json', '.png')[:3 if plot else 2]]


def write_sweep(rows, prefix: str, title: str = '', plot: bool = True,
                make_folders: bool = False) -> List[str]:
    """``prefix``.csv, .json and (with ``plot``) .png, all written whole or none of them (see
    ``write_all_whole``, also for ``make_folders``); returns the paths."""
    dicts = [asdict(r) for r in rows]
    names = list(dicts[0]) if dicts else [f.name for f in fields(SweepRow)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, lineterminator='\n')
    writer.writeheader()
    writer.writerows(dicts)
    table = json.dumps({'setting': title, 'rows': dicts}, indent=2)
    csv_path, json_path, *png_path = sweep_paths(prefix, plot)
    outputs = {csv_path: lambda f: f.write(text.getvalue().encode('utf-8')),
               json_path: lambda f: f.write(table.encode('utf-8'))}
    plt = pyplot() if plot else None
    fig = _accuracy_figure(plt, rows, title) if plot else None
    if fig is not None:
        outputs[png_path[0]] = figure_writer(fig)
    try:
        write_all_whole(outputs, make_folders=make_folders)
    finally:
        if fig is not None:
            plt.close(fig)
    return list(outputs)


def _accuracy_figure(plt, rows, title: str):
    """Top-1 against GMACs per image (what a keep rate costs) and against throughput (what it gives,
    on the same batch), each point annotated with its keep rate."""
    timed = rows[0].images_per_s is not None
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4), squeeze=False)
    ax_macs = axes[0][0]
    panels = [(ax_macs, [r.gmacs for r in rows])]
    ax_macs.set(xlabel='GMACs per image', ylabel='top-1 (%)', title='accuracy against GMACs')
    if timed:   # the speed panel only where speed was measured (enough repeats)
        ax_speed = axes[0][1]
        panels.append((ax_speed, [r.images_per_s for r in rows]))
        ax_speed.set(xlabel='images / s (same run, same batch)', ylabel='top-1 (%)',
                     title='accuracy against throughput')
    for ax, xs in panels:
        ax.plot(xs, [r.top1 for r in rows], 'o-', label='keep_rate')
        for r, x in zip(rows, xs):
            ax.annotate(f'{r.keep_rate:g}', (x, r.top1), textcoords='offset points', xytext=(4, 4), fontsize=8)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    return fig
