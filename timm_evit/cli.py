"""``timm-evit`` command line (also ``python -m timm_evit``)."""
import argparse
import json
import os
import platform
import sys
from typing import List, Optional

import torch


def _keep_rates(text: str) -> List[float]:
    try:
        rates = [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        rates = []
    if not rates or any(not 0. < r <= 1. for r in rates):
        raise argparse.ArgumentTypeError(f'--keep-rates takes comma-separated floats in (0, 1], got {text!r}')
    return rates


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
    return value


def _machine(device: str) -> str:
    if device.startswith('cuda'):
        return f'{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}'
    return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
            f'{torch.get_num_threads()} torch threads, torch {torch.__version__}')


def _write_whole(path: str, text: str) -> None:
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def bench_main(args: argparse.Namespace) -> int:
    import timm
    from .bench import format_rows, plot_rows, rows_as_dicts, run_bench

    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("timm-evit bench: --plot needs matplotlib: pip install 'timm-evit[plot]'", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    attn = ('math', 'fused') if args.attn == 'both' else (args.attn,)
    if args.compile:
        args.warmup = max(args.warmup, 1)  # the warm-up compiles
    try:
        rows = run_bench(
            args.model, args.keep_rates, fuse_token=not args.no_fuse, batch_size=args.batch_size,
            repeats=args.repeats, warmup=args.warmup, attn=attn, dtype=args.dtype, compile=args.compile,
            device=args.device, latency=not args.no_latency, pretrained=args.pretrained)
    except ValueError as e:
        print(f'timm-evit bench: {e}', file=sys.stderr)
        return 2
    header = (f'{args.model} vs {rows[0].model}, batch {args.batch_size}, {args.dtype}, '
              f'{"torch.compile" if args.compile else "eager"}, {args.device}: {_machine(args.device)}, '
              f'timm {timm.__version__}; median of {args.repeats} interleaved repeats after {args.warmup} warm-up')
    print(f'# {header}')
    print(format_rows(rows))
    if args.json:
        _write_whole(args.json, json.dumps({'setting': header, 'rows': rows_as_dicts(rows)}, indent=2))
    if args.plot:
        plot_rows(rows, args.plot, title=header)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-evit', description='EViT token reorganisation for timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    bench = sub.add_parser(
        'bench', help='tokens per stage, GMACs and throughput against the plain timm model, in one run')
    bench.add_argument('--model', default='evit_deit_small',
                       choices=['evit_deit_tiny', 'evit_deit_small', 'evit_deit_base'])
    bench.add_argument('--keep-rates', type=_keep_rates, default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5],
                       help='comma-separated keep rates (default: 1,0.9,0.8,0.7,0.6,0.5)')
    bench.add_argument('--no-fuse', action='store_true', help='drop inattentive tokens instead of fusing them')
    bench.add_argument('--batch-size', type=_positive_int, default=32)
    bench.add_argument('--repeats', type=_positive_int, default=5)
    bench.add_argument('--warmup', type=int, default=2)
    bench.add_argument('--attn', choices=['math', 'fused', 'both'], default='both',
                       help="timm attention path for both models: 'fused' (SDPA, timm's default), 'math', or both")
    bench.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32', help='weights and inputs')
    bench.add_argument('--compile', action='store_true', help='torch.compile every model (compiled in the warm-up)')
    bench.add_argument('--device', default='cpu', help="'cpu' or 'cuda[:N]'")
    bench.add_argument('--no-latency', action='store_true', help='skip the batch-1 latency measurement')
    bench.add_argument('--threads', type=_positive_int, default=None, help="torch threads (default: torch's)")
    bench.add_argument('--pretrained', action='store_true', help='use pretrained weights (must be cached offline)')
    bench.add_argument('--json', metavar='PATH', help='also write the rows as JSON')
    bench.add_argument('--plot', metavar='PNG', help='also draw speed-up and GMACs against keep rate (needs matplotlib)')
    bench.set_defaults(func=bench_main)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
