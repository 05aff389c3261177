"""``timm-evit`` command line (also ``python -m timm_evit``)."""
import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import threading
from typing import List, Optional

import torch

from ..options import EVIT_ARGS
from .bench import COMPILE_MODES, RUNTIMES, require_distinct_keep_rates
from .measure import MIN_SPEED_REPEATS
from .export import FORMATS, QUANTIZATIONS
from .plain import PLAIN_COUNTERPARTS


# sweep's keep rates where none are given, and bench --full's
DEFAULT_KEEP_RATES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
# a bare `timm-evit bench`: the paper's middle and low rate on timm's default attention (about a minute on 2 cores)
QUICK_BENCH_KEEP_RATES = [0.7, 0.5]
QUICK_BENCH_ATTN = 'fused'


def _float_list(text: str, option: str, require_distinct) -> List[float]:
    try:
        values = [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0. < v <= 1. for v in values):
        raise argparse.ArgumentTypeError(f'{option} takes comma-separated floats in (0, 1], got {text!r}')
    try:
        require_distinct(values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'{e}, got {text!r}') from e
    return values


def _budget_in_model_kwargs(args: argparse.Namespace, command: str) -> Optional[str]:
    """Why ``--model-kwargs`` cannot hold a keep rate for ``command``, which measures the keep rates of
    --keep-rates row by row (one there would be silently replaced), or None."""
    given = dict(args.model_kwargs)
    if 'keep_rate' in given:
        return (f'{command} measures the keep rates of --keep-rates row by row: give --model-kwargs '
                f'keep_rate={given["keep_rate"]!r} as --keep-rates {given["keep_rate"]!r}')
    return None


def _path(text: str) -> str:
    """A path option's value: refused where it names nothing (an empty path wrote nothing, silently)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f'needs a path, got {text!r}')
    return text


def _keep_rates(text: str) -> List[float]:
    return _float_list(text, '--keep-rates', require_distinct_keep_rates)


def _resolve_keep_rates(args: argparse.Namespace) -> None:
    """--keep-rates where not given: the default list."""
    if args.keep_rates is None:
        args.keep_rates = list(DEFAULT_KEEP_RATES)


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


def bench_main(args: argparse.Namespace) -> int:
    from ._io import pyplot
    from .bench import BenchSettings, run_bench
    from .files import figure_writer, write_all_whole
    from .plain import parse_model_name
    from .report import bench_spread_note, bench_table, rows_as_dicts, rows_figure

    if args.plot and not _need_matplotlib('bench'):  # fail before the long run, not after it
        return 2
    try:
        inputs = {'--checkpoint': args.checkpoint}
        if args.data_dir:
            from .data import image_files
            inputs['--data-dir'] = image_files(args.data_dir, args.split)
        _check_output_files({'--json': args.json, '--plot': args.plot}, inputs=inputs)
    except ValueError as e:
        return _user_error('bench', e)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = _budget_in_model_kwargs(args, 'bench')
    if problem:
        return _user_error('bench', problem)
    _resolve_bench_scope(args)
    try:   # the model name parsed once, the settings checked once: before the header says what they are
        spec = parse_model_name(args.model)
        settings = BenchSettings(
            keep_rates=args.keep_rates, fuse_token=False if args.no_fuse else None, batch_size=args.batch_size,
            repeats=args.repeats, warmup=args.warmup, attn=('math', 'fused') if args.attn == 'both' else (args.attn,),
            dtype=args.dtype, compile=args.compile, device=args.device, latency=not args.no_latency,
            pretrained=args.pretrained, model_kwargs=dict(args.model_kwargs), runtime=args.runtime,
            quantize=args.quantize, data_dir=args.data_dir, split=args.split, checkpoint=args.checkpoint,
            crop_pct=args.crop_pct).checked()
        header = _bench_header(args, spec, settings)
    except ValueError as e:
        return _user_error('bench', e)
    print(f'# {header}', flush=True)   # what is measured, before the minutes it takes
    try:
        rows = run_bench(spec, settings)
    except ValueError as e:
        return _user_error('bench', e)
    print(bench_table(rows))
    note = bench_spread_note(rows, args.repeats)
    if note:
        print(f'# {note}')
    outputs, figures = {}, []
    if args.json:
        text = json.dumps({'setting': header, 'rows': rows_as_dicts(rows), 'note': note}, indent=2)
        outputs[args.json] = lambda f: f.write(text.encode('utf-8'))
    if args.plot:
        figures.append(rows_figure(rows, title=header))
        outputs[args.plot] = figure_writer(figures[-1], dpi=120)
    try:
        write_all_whole(outputs, make_folders=True)  # both or neither
    except ValueError as e:
        return _user_error('bench', e)
    finally:
        for fig in figures:
            pyplot().close(fig)
    return 0


def _resolve_bench_scope(args: argparse.Namespace) -> None:
    """bench's keep rates and attention paths where not given: a quick look (QUICK_BENCH_*), or
    with --full the whole table (DEFAULT_KEEP_RATES on both attention paths)."""
    args.quick = not args.full and (args.keep_rates is None or args.attn is None)
    if args.keep_rates is None:
        args.keep_rates = list(DEFAULT_KEEP_RATES if args.full else QUICK_BENCH_KEEP_RATES)
    if args.attn is None:
        args.attn = 'both' if args.full else QUICK_BENCH_ATTN


def _bench_header(args: argparse.Namespace, spec, settings) -> str:
    """What a bench run measures, said before it starts: the models (``spec``, a ``ModelSpec``), keep
    rates, attention paths, batch, repeats, runtime and machine (``settings``, checked ``BenchSettings``)."""
    import timm
    evit = spec.label
    plain = (f"timm's {spec.plain_name} (same weights)" if spec.plain_name != spec.label
             else f'{evit} at keep_rate 1.0 (plain)')
    architecture = ''.join(f' {k}={v!r}' for k, v in args.model_kwargs if k not in EVIT_ARGS)   # the plain model's
    if architecture:
        plain += ' with' + architecture
    paths = ' and '.join({'math': 'math', 'fused': 'fused (SDPA)'}[a] for a in settings.attn) + ' attention'
    images = f'the first images of {settings.data_dir} ({settings.split})' if settings.data_dir else 'random images'
    batches = f'batch {settings.batch_size}' + (' and batch 1 (latency)' if settings.latency else '')
    header = (f'{evit} at keep rates {", ".join(f"{r:g}" for r in settings.keep_rates)} vs {plain}; '
              f'{paths}; {batches} of {images}; {settings.dtype}, {_runtime(args)}; '
              f'median of {settings.repeats} interleaved repeats after {settings.warmup} warm-up; '
              f'{settings.device}: {_machine(settings.device)}, timm {timm.__version__}')
    if args.quick:
        header += '; --full for keep rates 1 to 0.5 on both attention paths'
    return header


def _runtime(args: argparse.Namespace) -> str:
    if args.runtime == 'onnxruntime':
        from .export import require_onnxruntime
        onnxruntime = require_onnxruntime()   # a one-line ValueError where it is missing
        export = 'ONNX export quantized to int8 (dynamic)' if args.quantize else 'ONNX export'
        if args.command == 'bench':
            export += ', beside the plain model in torch fp32'
        return f'onnxruntime {onnxruntime.__version__} ({export}, CPU, {torch.get_num_threads()} intra-op threads)'
    return f'torch.compile (mode {args.compile})' if args.compile else 'eager'


def export_main(args: argparse.Namespace) -> int:
    from .export import check_exportable, example_images, exported_writer, require_exporter, require_quantizer
    from .files import write_all_whole
    from .models import create_evit_model, merge_model_kwargs
    from .plain import parse_model_name
    from ..checkpoints import one_line, require_finite_forward, weights_source

    out = args.out or args.model + (f'_{args.quantize}' if args.quantize else '') + FORMATS[args.format]
    source = weights_source(args.model, args.pretrained, args.checkpoint)
    try:
        require_exporter(args.format)
        require_quantizer(args.quantize, args.format)
        spec = parse_model_name(args.model)   # the names bench takes
        _check_output_files({'--out': out}, inputs={'--checkpoint': args.checkpoint})
        kwargs = merge_model_kwargs(dict(args.model_kwargs), keep_rate=args.keep_rate, img_size=args.img_size,
                                    fuse_token=False if args.no_fuse else None)
        model = create_evit_model(spec, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                  options={'img_size': '--img-size'} if args.img_size else None, **kwargs).eval()
        check_exportable(model, args.format)
        require_finite_forward(model, example_images(model), source)   # no file of NaN outputs
    except ValueError as e:
        return _user_error('export', e)
    try:
        writer = exported_writer(model, args.format, args.quantize)
    except Exception as e:  # the exporter's own failure: not the user's mistake, so exit code 1
        print(f'timm-evit export: exporting {args.model} to {args.format} failed: {one_line(str(e))}', file=sys.stderr)
        return 1
    try:
        write_all_whole({out: writer}, make_folders=True)   # a temporary file beside it, renamed once whole
    except ValueError as e:
        return _user_error('export', e)
    settings = (f'keep_rate {_keep_rates_text(model)} in blocks {model.reorg_layers}, '
                f'{_fusion_text(model)}, score {model.score!r}'
                + (', int8 (dynamic quantization: int8 weights, activations quantized per batch)' if args.quantize else ''))
    print(f'wrote {out}: {args.model}, {settings} (fixed in the graph); input [batch, {model.in_chans}, '
          f'{", ".join(map(str, model.patch_embed.img_size))}], batch axis dynamic')
    return 0


def _check_output_files(files: dict, inputs: Optional[dict] = None) -> None:
    """Every output file (option -> path, list of paths, or None) writable, no two the same, and
    none of them an input file (option -> path, list of paths, or None), links included: before
    any work. Every command's outputs are checked here."""
    from .files import check_writable, same_file_as
    given = [(option, path) for option, paths in files.items() for path in _listed(paths)]
    for option, path in given:
        check_writable(path, option)
    if len({os.path.abspath(p) for _, p in given}) < len(given):
        raise ValueError(f'{" and ".join(dict(given))} name the same file: give each its own')
    read = [(option, path) for option, paths in (inputs or {}).items() for path in _listed(paths)]
    for option, path in given:
        written_over = same_file_as(path, [p for _, p in read])
        if written_over is not None:
            input_option, input_path = read[written_over]
            raise ValueError(f'{option} would write {path!r}, which is {input_option} {input_path!r} (an input of '
                             f'this command, the same file): give another {option}')


def _listed(paths) -> List[str]:
    return [p for p in ([paths] if isinstance(paths, str) else paths or []) if p]


def _user_error(command: str, error: object) -> int:
    """A user's mistake: one line on stderr, exit code 2."""
    print(f'timm-evit {command}: {error}', file=sys.stderr)
    return 2


def _need_matplotlib(command: str) -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"timm-evit {command}: drawing needs matplotlib: pip install 'timm-evit[plot]'", file=sys.stderr)
        return False
    return True


def _fusion_text(model) -> str:
    """'no fusion', 'fusion' (the paper's) or 'size-aware fusion', for a message."""
    if not model.fuse_token:
        return 'no fusion'
    return 'size-aware fusion' if model.fusion == 'size' else 'fusion'


def _keep_rates_text(model) -> str:
    """The model's keep rates for a message, each once, in block order ('0.7' or '0.9, 0.7')."""
    return _values_text(model.keep_rate)


def _values_text(values) -> str:
    return ', '.join(f'{v:g}' for v in sorted(set(values), key=values.index))


def visualize_main(args: argparse.Namespace) -> int:
    from timm.data import create_transform
    from ._io import pyplot
    from .files import check_writable, figure_writer, write_all_whole
    from .models import create_evit_model, merge_model_kwargs
    from .data import eval_data_config
    from .visualize import load_image, masks_figure, picture_names, reorganisation, stage_names
    from ..checkpoints import require_finite_forward, weights_source

    if not _need_matplotlib('visualize'):
        return 2
    paths = [os.path.join(args.out, name) for name in picture_names(args.images)]
    try:
        images = [load_image(path) for path in args.images]  # every image readable before any work
        check_writable(args.out, '--out', folder=True)
        _check_output_files({'--out': paths}, inputs={'IMAGE': args.images, '--checkpoint': args.checkpoint})
        kwargs = merge_model_kwargs(dict(args.model_kwargs), keep_rate=args.keep_rate,
                                    img_size=args.img_size, fuse_token=False if args.no_fuse else None)
        model = create_evit_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                  whole_patches=True,   # patches drawn on pixels
                                  options={'img_size': '--img-size'} if args.img_size else None, **kwargs).eval()
    except ValueError as e:
        return _user_error('visualize', e)
    config = eval_data_config(model)  # the size the model was built at, not its pretrained_cfg's
    # The model's eval transform without normalisation, to show the very pixels the model sees.
    to_pixels = create_transform(**{**config, 'mean': (0., 0., 0.), 'std': (1., 1., 1.)})
    mean, std = torch.tensor(config['mean']).view(3, 1, 1), torch.tensor(config['std']).view(3, 1, 1)
    weights = 'pretrained' if args.pretrained else (args.checkpoint or 'random weights')
    title = (f'{args.model} ({weights}), keep_rate {_keep_rates_text(model)}, score {model.score!r}, '
             f'{_fusion_text(model)}' + (' (orange)' if model.fuse_token else '') + ', dropped greyed')

    source = weights_source(args.model, args.pretrained, args.checkpoint)

    def picture_writer(image):
        def write(f):  # drawn while writing: every picture is written, or none
            pixels = to_pixels(image)
            x = ((pixels - mean) / std)[None]
            require_finite_forward(model, x, source)   # masks chosen from NaN attention mean nothing
            masks, counts = reorganisation(model, x)
            fig = masks_figure(pixels, masks[0], stage_names(model), title=title, token_counts=counts[0])
            try:
                figure_writer(fig)(f)
            finally:
                pyplot().close(fig)
        return write

    outputs = {path: picture_writer(image) for path, image in zip(paths, images)}
    try:
        write_all_whole(outputs, make_folders=True)  # every picture or none
    except ValueError as e:
        return _user_error('visualize', e)
    print('\n'.join(outputs))
    return 0


def _sweep_prefix(out: Optional[str], model: str) -> str:
    """--out as a prefix; a folder (existing, or written with a trailing slash) gets the default name in it."""
    default = f'sweep_{model}'
    if not out:
        return default
    if out.endswith(('/', os.sep)) or os.path.isdir(out):
        return os.path.join(out, default)
    return out


def sweep_main(args: argparse.Namespace) -> int:
    from .files import check_writable
    from .data import image_files
    from .report import sweep_paths, sweep_spread_note, sweep_table, write_sweep
    from .plain import parse_model_name
    from .sweep import SweepSettings, pick_keep_rate, run_sweep

    if not args.no_plot and not _need_matplotlib('sweep'):
        return 2
    problem = _budget_in_model_kwargs(args, 'sweep')
    if problem:
        return _user_error('sweep', problem)
    _resolve_keep_rates(args)
    if args.max_drop is not None and 1.0 not in args.keep_rates:
        return _user_error('sweep', '--max-drop needs keep rate 1.0 in --keep-rates (the accuracy it is measured from)')
    if args.max_drop is not None and args.repeats < MIN_SPEED_REPEATS:
        return _user_error('sweep', f'--max-drop picks the fastest keep rate: it needs speed measured, with --repeats '
                           f'{MIN_SPEED_REPEATS} or more (got {args.repeats})')
    prefix = _sweep_prefix(args.out, args.model)
    setting = f'{args.model} on {args.data_dir} ({args.split}), batch {args.batch_size}, CPU: {_machine("cpu")}'
    try:
        check_writable(prefix, '--out')
        inputs = {'--data-dir': image_files(args.data_dir, args.split), '--checkpoint': args.checkpoint}
        _check_output_files({'--out': sweep_paths(prefix, plot=not args.no_plot)}, inputs=inputs)
        settings = SweepSettings(   # built once, checked once (what the runtime needs is installed)
            data_dir=args.data_dir, split=args.split, keep_rates=args.keep_rates, batch_size=args.batch_size,
            pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=args.num_classes,
            fuse_token=False if args.no_fuse else None, workers=args.workers, model_kwargs=dict(args.model_kwargs),
            crop_pct=args.crop_pct, repeats=args.repeats, runtime=args.runtime, quantize=args.quantize).checked()
        if args.runtime != 'torch':
            setting += ', ' + _runtime(args)
        rows = run_sweep(parse_model_name(args.model), settings)
        paths = write_sweep(rows, prefix, title=setting, plot=not args.no_plot, make_folders=True)
    except ValueError as e:
        return _user_error('sweep', e)
    print(f'# {setting}')
    if rows[0].plain_images_per_s is not None:
        print(f'# throughput beside timm\'s {rows[0].plain_model} (same weights, same run, median of {args.repeats} '
              f'interleaved repeats on the first batch): {rows[0].plain_images_per_s:.1f} img/s')
    print(sweep_table(rows))
    if rows[0].spread is None:
        print(f'# speed not measured: {args.repeats} repeat(s) are too few to show how far timings spread '
              f'(--repeats {MIN_SPEED_REPEATS} or more measure it)')
    elif sweep_spread_note(rows, args.repeats):
        print(f'# {sweep_spread_note(rows, args.repeats)}')
    print('wrote ' + ', '.join(paths))
    if args.max_drop is not None:
        best = pick_keep_rate(rows, args.max_drop)
        print(f'fastest within {args.max_drop:g} top-1 points of keep_rate 1.0: keep_rate {best.keep_rate:g} '
              f'(top-1 {best.top1:.2f}); use: --model-kwargs keep_rate={best.keep_rate:g}'
              + (' fuse_token=False' if args.no_fuse else ''))
    return 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
    return value


def _keep_rate(text: str) -> float:
    return _one_float(text, '--keep-rate')



def _one_float(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not 0. < value <= 1.:
        raise argparse.ArgumentTypeError(f'{option} takes one float in (0, 1], got {text!r}')
    return value


def _model_kwarg(text: str):
    """``key=value`` as timm's train.py --model-kwargs: the value read as a Python literal if it is one.
    Not timm's ``ParseKwargs``: it raises a traceback for a pair without ``=`` (and, in timm 1.0.26, for
    a value holding ``=`` or one that is not valid Python), where this is a one-line usage error."""
    import ast
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'--model-kwargs takes key=value pairs, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.
    if not value >= 0:
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}')
    return value


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other user error of the commands."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


# the models bench takes (see --model of bench); a name no tool takes is a one-line error
_MODEL_HELP = 'an evit_* name, or a timm ViT name converted with timm_evit.apply (as for bench)'


def _add_model_options(parser: argparse.ArgumentParser, model_help: str = _MODEL_HELP, checkpoint: bool = True,
                       model_kwargs_help: Optional[str] = None) -> None:
    """The model options the commands share, declared once: --model, --pretrained, --checkpoint (unless
    ``checkpoint`` is False), --no-fuse, and --model-kwargs where ``model_kwargs_help`` says what they change."""
    parser.add_argument('--model', default='evit_deit_small', metavar='MODEL', help=model_help)
    parser.add_argument('--pretrained', action='store_true', help='pretrained weights (must be cached offline)')
    if checkpoint:
        parser.add_argument('--checkpoint', type=_path, help='weights file to load instead (for example from timm\'s train.py)')
    parser.add_argument('--no-fuse', action='store_true', help='drop inattentive tokens instead of fusing them')
    if model_kwargs_help:
        parser.add_argument('--model-kwargs', nargs='*', type=_model_kwarg, default=[], metavar='KEY=VALUE',
                            help=model_kwargs_help)


def _add_keep_rates_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--keep-rates', type=_keep_rates, default=None,
                        help='comma-separated keep rates, each once (a repeated rate is refused, not '
                        'measured twice; default: 1,0.9,0.8,0.7,0.6,0.5)')


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog='timm-evit', description='EViT token reorganisation for timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    bench = sub.add_parser(
        'bench', help='tokens per stage, GMACs and throughput against the plain timm model, in one run')
    _add_model_options(
        bench,
        model_help=f'one of {", ".join(PLAIN_COUNTERPARTS)} (beside timm\'s DeiT; LV-ViT, not in timm, beside '
                   'itself at keep_rate 1.0), evit_<timm name> for any timm ViT that timm_evit.apply '
                   'supports (e.g. evit_deit3_small_patch16_224, beside timm\'s deit3_small_patch16_224), '
                   'or the timm name itself (e.g. vit_small_patch14_reg4_dinov2.lvd142m), converted with '
                   'timm_evit.apply, beside itself; each with or without a pretrained tag (e.g. '
                   'evit_deit_small.keep70_fuse_in1k, beside timm\'s deit_small_patch16_224 with its weights)',
        model_kwargs_help='architecture of both models, as for timm\'s train.py (e.g. img_size=64 depth=6)')
    bench.add_argument('--keep-rates', type=_keep_rates, default=None,
                       help='comma-separated keep rates, each once (a repeated rate is refused, not measured twice; '
                       f'default: {",".join(f"{r:g}" for r in QUICK_BENCH_KEEP_RATES)}, with --full '
                       f'{",".join(f"{r:g}" for r in DEFAULT_KEEP_RATES)})')
    bench.add_argument('--full', action='store_true',
                       help='the whole table: keep rates 1 to 0.5 on both attention paths (where --keep-rates and '
                       '--attn are not given; about 5 minutes on 2 cores, where the default takes about one)')
    bench.add_argument('--data-dir', type=_path, help='measure every row on the first --batch-size images of this ImageFolder '
                       '(timm\'s order, the model\'s eval transform) instead of random noise (batch 1: the first)')
    bench.add_argument('--split', default='validation', help='split folder of --data-dir (as for sweep)')
    bench.add_argument('--crop-pct', type=float, help='center-crop fraction of the eval transform of --data-dir '
                       "(as for sweep; default: the model's pretrained_cfg)")
    bench.add_argument('--batch-size', type=_positive_int, default=32)
    bench.add_argument('--repeats', type=_positive_int, default=5)
    bench.add_argument('--warmup', type=int, default=2)
    bench.add_argument('--attn', choices=['math', 'fused', 'both'], default=None,
                       help="timm attention path for both models: 'fused' (SDPA, timm's default), 'math', or both "
                       "(default: fused; with --full both)")
    bench.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32', help='weights and inputs')
    bench.add_argument('--compile', nargs='?', const='default', choices=COMPILE_MODES, metavar='MODE',
                       help='torch.compile every model, compiled in the warm-up; MODE is a torch.compile mode: '
                       f'{", ".join(COMPILE_MODES)} (default: default; reduce-overhead is CUDA graphs)')
    bench.add_argument('--device', default='cpu', help="'cpu' or 'cuda[:N]'")
    bench.add_argument('--runtime', choices=RUNTIMES, default='torch',
                       help="'torch', or 'onnxruntime': both models exported to ONNX (as timm-evit export does) and "
                       "timed in onnxruntime on the CPU, fp32, eager only (needs timm-evit[deploy]), beside the plain "
                       "model in torch fp32 (a second speed-up column)")
    bench.add_argument('--quantize', choices=QUANTIZATIONS,
                       help="with --runtime onnxruntime: time both models' ONNX exports quantized as export "
                       "--quantize writes them (beside the plain model in torch fp32, as every onnxruntime run)")
    bench.add_argument('--no-latency', action='store_true', help='skip the batch-1 latency measurement')
    bench.add_argument('--threads', type=_positive_int, default=None, help="torch threads (default: torch's)")
    bench.add_argument('--json', type=_path, metavar='PATH', help='also write the rows as JSON (missing folders are created)')
    bench.add_argument('--plot', type=_path, metavar='PNG', help='also draw speed-up and GMACs against keep rate '
                       '(needs matplotlib); with --json, both are written or neither')
    bench.set_defaults(func=bench_main)

    vis = sub.add_parser('visualize', help='draw which patches each reorganising block keeps, fuses or drops')
    vis.add_argument('images', nargs='+', type=_path, metavar='IMAGE')
    _add_model_options(vis, model_kwargs_help='model arguments, as for timm\'s train.py (e.g. score=mean '
                       '"reorg_layers=(3,6,9)")')
    vis.add_argument('--keep-rate', type=_keep_rate, help="default: the model's own (0.7)")
    vis.add_argument('--img-size', type=_positive_int, help='model input size (position embeddings resampled)')
    vis.add_argument('--out', type=_path, default='.', help='folder for the PNGs, created if missing (default: current folder); '
                     'each image gives NAME_evit.png, images of the same NAME NAME_1_evit.png, NAME_2_evit.png, ... '
                     'in the order given')
    vis.set_defaults(func=visualize_main)

    sweep = sub.add_parser('sweep', help='top-1, top-5, GMACs and throughput at several keep rates on an ImageFolder')
    _add_model_options(sweep, model_kwargs_help='model arguments, as for timm\'s train.py (e.g. img_size=64 '
                       '"reorg_layers=(1,3,5)")')
    sweep.add_argument('--data-dir', type=_path, required=True, help='ImageFolder root (class folders, or split folders of them)')
    sweep.add_argument('--split', default='validation',
                       help='split folder of --data-dir (or a timm synonym: val, eval, ...); a folder of class folders '
                       'alone is the validation split')
    _add_keep_rates_option(sweep)
    sweep.add_argument('--batch-size', type=_positive_int, default=32)
    sweep.add_argument('--num-classes', type=_positive_int,
                       help='classes of the checkpoint (default: 1000; or num_classes in --model-kwargs)')
    sweep.add_argument('--crop-pct', type=float, help="center-crop fraction of the eval transform, as validate.py's "
                       "(default: the model's pretrained_cfg)")
    sweep.add_argument('--repeats', type=_non_negative_int, default=10,
                       help='timed batches per model for throughput, interleaved with timm\'s model (median, and '
                       f'spread shown); below {MIN_SPEED_REPEATS} no speed is measured or printed (0: accuracy and '
                       'GMACs only)')
    sweep.add_argument('--workers', type=int, default=0)
    sweep.add_argument('--out', type=_path, help='output prefix for .csv, .json and .png, all written or none; missing folders '
                       'are created; a folder (or a path ending in /) gets sweep_MODEL.* in it (default: sweep_MODEL)')
    sweep.add_argument('--no-plot', action='store_true', help='skip the chart (no matplotlib needed)')
    sweep.add_argument('--runtime', choices=RUNTIMES, default='torch',
                       help="'onnxruntime': evaluate and time the ONNX export at each keep rate (one export per rate, "
                       "as export writes it), beside the PyTorch model's top-1 on the same images")
    sweep.add_argument('--quantize', choices=QUANTIZATIONS,
                       help='with --runtime onnxruntime: each export quantized as export --quantize writes it')
    sweep.add_argument('--max-drop', type=_non_negative_float,
                       help='print the fastest keep rate whose top-1 is within this many points of '
                       'keep rate 1.0')
    sweep.set_defaults(func=sweep_main)

    export = sub.add_parser(
        'export', help='write the model as an ONNX file or a torch.export program; the keep rate is fixed in the graph')
    _add_model_options(export, model_kwargs_help='model arguments, as for timm\'s train.py (e.g. num_classes=10 '
                       '"reorg_layers=(3,6,9)")')
    export.add_argument('--format', default='onnx', choices=list(FORMATS),
                        help="'onnx' (default; torch's dynamo exporter, needs timm-evit[deploy]) or 'export' "
                        "(a torch.export program written by torch.export.save, loaded by torch.export.load)")
    export.add_argument('--out', type=_path, metavar='PATH', help='the file to write (missing folders are created); written whole '
                        'or not at all (default: MODEL.onnx or MODEL.pt2 in the current folder)')
    export.add_argument('--keep-rate', type=_keep_rate,
                        help="fixed in the exported graph (token counts are constants of it; another keep rate needs "
                        "another export); default: the model's own (0.7)")
    export.add_argument('--img-size', type=_positive_int,
                        help='input size, fixed in the graph (position embeddings resampled); the batch axis is dynamic')
    export.add_argument('--quantize', choices=QUANTIZATIONS,
                        help="'int8': the ONNX file quantized by onnxruntime's dynamic quantization after its "
                        "recommended pre-processing (int8 weights, activations quantized per batch at run time: no "
                        "calibration data); default name MODEL_int8.onnx")
    export.set_defaults(func=export_main)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that it unwinds through every cleanup (temporary
    files) as Ctrl-C's KeyboardInterrupt does; a BaseException, which no ``except Exception`` takes."""


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``Terminated`` (once: a second one while unwinding would cut the cleanup short)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:   # the reader of stdout went away (| head): nothing more to say to it
        from .files import quiet_broken_pipe
        return quiet_broken_pipe()


def _main(argv: Optional[List[str]]) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_raises():
            return args.func(args)
    # Every file is written whole or not at all: an interrupt leaves none behind, so one line says it,
    # with the exit code a shell gives a process that the signal ended.
    except KeyboardInterrupt:
        return _interrupted(args.command, 'interrupted', 128 + int(signal.SIGINT))
    except Terminated:
        return _interrupted(args.command, 'terminated', 128 + int(signal.SIGTERM))


def _interrupted(command: str, what: str, code: int) -> int:
    print(f'timm-evit {command}: {what}', file=sys.stderr)
    return code


if __name__ == '__main__':
    sys.exit(main())
