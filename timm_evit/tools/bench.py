"""Benchmark EViT against timm's plain model: tokens per stage, GMACs, throughput ratio.

Speed is only reported as a ratio measured in one run: the plain timm model and the EViT model
(same weights, same attention implementation, same batch, dtype and device) are timed
interleaved, after a warm-up, and the median of the repeats is taken.
"""
import contextlib
import copy
import math
import os
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ._io import pyplot
from ..checkpoints import require_finite_forward, weights_source
from .models import check_device, create_evit_model, merge_model_kwargs
from .preflight import check_batch_fits, out_of_memory_as_error
from .plain import create_plain_counterpart, evit_label, plain_model_name

__all__ = [
    'BenchRow', 'model_at_keep_rate', 'set_fused_attn', 'count_gmacs', 'tokens_per_stage', 'time_interleaved', 'run_bench',
    'markdown_table', 'format_rows', 'rows_as_dicts', 'rows_figure', 'DTYPES', 'COMPILE_MODES', 'min_warmup',
    'RUNTIMES', 'check_runtime', 'input_tokens', 'require_distinct_keep_rates', 'time_interleaved_samples', 'speedups',
    'relative_spread', 'spread_note', 'rows_spread_note', 'MIN_SPEED_REPEATS', 'WIDE_SPREAD',
]

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
RUNTIMES = ('torch', 'onnxruntime')


@dataclass
class BenchRow:
    model: str
    keep_rate: Optional[float]        # None for the plain timm model
    fuse_token: Optional[bool]
    attn: str                         # 'fused' (SDPA) or 'math'
    dtype: str
    compile_mode: Optional[str]       # None: eager; else the torch.compile mode
    device: str
    batch_size: int
    tokens: List[int]                 # non-class tokens at the input, then after each reorganising block
    gmacs: float                      # per image
    mac_ratio: float                  # plain GMACs / these GMACs: what time would give if it followed MACs
    images_per_s: float
    speedup: float                    # throughput / plain throughput, same run
    efficiency: float                 # speedup / mac_ratio
    latency_ms: Optional[float] = None          # batch 1, median
    latency_speedup: Optional[float] = None     # plain latency / this latency, same run
    runtime: str = 'torch'                      # or 'onnxruntime': the ONNX exports of both models
    fusion: Optional[str] = None                # EViT's fusion ('paper', 'size'); None for the plain model
    quantize: Optional[str] = None              # 'int8': both ONNX exports quantized (onnxruntime only)
    speedup_vs_torch: Optional[float] = None    # onnxruntime: throughput / the plain model's in torch fp32, same run
    latency_speedup_vs_torch: Optional[float] = None   # the same at batch 1
    spread: Optional[float] = None              # the repeats' spread (``relative_spread``) of the speed-up; of
                                                # its own time for the plain model
    latency_spread: Optional[float] = None      # the same at batch 1


def check_runtime(runtime: str, compile: Optional[str], device: str, dtype: str,
                  quantize: Optional[str] = None) -> None:
    """A ValueError naming the option that ``runtime`` cannot serve: onnxruntime runs the fp32
    ONNX export (or, with ``quantize``, its int8 quantization) on the CPU (its CPU execution
    provider), without torch.compile."""
    if runtime not in RUNTIMES:
        raise ValueError(f'--runtime takes one of {", ".join(RUNTIMES)}, got {runtime!r}')
    if quantize is not None and runtime != 'onnxruntime':
        raise ValueError(f'--quantize {quantize} times onnxruntime\'s quantized export: add --runtime onnxruntime')
    if runtime == 'torch':
        return
    if compile is not None:
        raise ValueError('--compile is for --runtime torch: onnxruntime runs the exported ONNX graph as it is')
    if device.split(':')[0] != 'cpu':
        raise ValueError(f'--runtime onnxruntime runs on the CPU only here: --device must be cpu, got {device!r}')
    if dtype != 'fp32':
        raise ValueError(f'--runtime onnxruntime times the fp32 export: --dtype must be fp32, got {dtype!r}')
    from .export import require_exporter, require_onnxruntime, require_quantizer
    require_exporter('onnx', '--runtime onnxruntime')   # before the long work: the packages are there
    require_onnxruntime()
    require_quantizer(quantize)


def _forwards(models: Dict[object, torch.nn.Module], runtime: str, wrap: Callable,
              status: Callable[[str], None] = lambda text: None,
              quantize: Optional[str] = None) -> Dict[object, Callable]:
    """Each model's forward in ``runtime``: torch (``wrap``: eager or torch.compile), or onnxruntime on
    the model's ONNX export (dynamic batch: one export serves every batch size; ``quantize``: the
    export quantized). ``status`` hears what takes long before the first forward (each export takes
    seconds)."""
    if runtime == 'onnxruntime':
        from .export import onnxruntime_forward
        forwards = {}
        for key, model in models.items():
            status(f'exporting {key if key == "plain" else f"keep_rate {key:g}"} to ONNX'
                   + (f' and quantizing to {quantize}' if quantize else ''))
            forwards[key] = onnxruntime_forward(model, quantize=quantize)
        return forwards
    return {key: wrap(model) for key, model in models.items()}


def set_fused_attn(model: torch.nn.Module, fused: bool) -> None:
    """Switch every timm attention module of ``model`` between SDPA (fused) and the math path."""
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = fused


def _cpu_fused_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's own formula for its fused attention kernels (two matmuls), which it does not register
    # for the CPU kernel
    return sdpa_flop_count(query, key, value)


def count_gmacs(model: torch.nn.Module, x: torch.Tensor, fused_attn: Optional[bool] = None,
                **forward_kwargs) -> float:
    """Multiply-accumulates per image of ``model(x, **forward_kwargs)`` in GMACs, counted by
    torch.utils.flop_counter on the attention path ``fused_attn`` (None: the model's own setting),
    so that what a score computes beside the fused kernel counts where it runs. The model's
    attention setting is restored afterwards."""
    # The counter's module tracker hooks every module input that requires grad; a view of a
    # parameter made without grad (timm's attention pool expands its latent query) cannot be
    # hooked, so the weights are counted with requires_grad off.
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in requires_grad:
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention_flops})
    try:
        with _attention_path(model, fused_attn), torch.inference_mode(), counter:
            model(x, **forward_kwargs)
    finally:
        for p, value in requires_grad.items():
            p.requires_grad_(value)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


def tokens_per_stage(model: torch.nn.Module, x: torch.Tensor, keep_rate: Optional[float]) -> List[int]:
    """Non-class token counts measured from the model: at the input, then after each reorganising block."""
    with torch.inference_mode():
        kwargs = {} if keep_rate is None else {'keep_rate': keep_rate}
        tokens = model.forward_intermediates(x[:1], output_fmt='NLC', intermediates_only=True, **kwargs)
    layers = getattr(model, 'reorg_layers', ())
    return [input_tokens(model, x)] + [tokens[i].shape[1] for i in layers]


@contextlib.contextmanager
def _attention_path(model: torch.nn.Module, fused_attn: Optional[bool]):
    """``model`` on the attention path ``fused_attn`` (None: its own) for the block, restored after."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    if fused_attn is not None:
        set_fused_attn(model, fused_attn)
    try:
        yield
    finally:
        for module, value in fused.items():
            module.fused_attn = value


def input_tokens(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Patch tokens of images ``x``: the patch grid, padded where the model pads (``dynamic_img_pad``)."""
    return math.prod(model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))


def model_at_keep_rate(model: torch.nn.Module, keep_rate: float) -> torch.nn.Module:
    """A copy of ``model`` at ``keep_rate`` (shares nothing with it)."""
    model = copy.deepcopy(model)
    model.set_keep_rate(keep_rate)
    return model


def _dynamo():
    import torch._dynamo as dynamo  # imported only when compiling
    return dynamo


def min_warmup(compile_mode: Optional[str]) -> int:
    """Warm-up calls a compile mode needs before its timings mean anything: the first call
    compiles; CUDA graph trees ('reduce-overhead') record on a later one."""
    if compile_mode is None:
        return 0
    return 3 if compile_mode == 'reduce-overhead' else 1


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN picks its fastest convolution for each shape, as timm's train.py and validate.py
    have it: left off, it may take a slow one for the patch embedding, a fixed cost that EViT
    cannot reduce (seen on an H200 in bf16: 16 % of DeiT-S's forward at batch 256)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# A speed figure needs repeats enough to show how far they spread; below this, none is given (sweep)
# or it is marked as unchecked (bench, where the user asked for that many).
MIN_SPEED_REPEATS = 5
# Repeats whose speed-ups range over more than this (relative to their median) were timed on a
# machine busy with something else for a while (a quiet 2-core machine stays within a few %).
WIDE_SPREAD = 0.10


def time_interleaved(
        forwards: Dict[object, Callable[[], object]],
        repeats: int,
        warmup: int,
        device: torch.device = torch.device('cpu'),
        progress: Optional[Callable[[], None]] = None,
) -> Dict[object, float]:
    """Median seconds per call of each function, run interleaved so drifts hit all alike."""
    samples = time_interleaved_samples(forwards, repeats, warmup, device, progress)
    return {name: statistics.median(t) for name, t in samples.items()}


def time_interleaved_samples(
        forwards: Dict[object, Callable[[], object]],
        repeats: int,
        warmup: int,
        device: torch.device = torch.device('cpu'),
        progress: Optional[Callable[[], None]] = None,
) -> Dict[object, List[float]]:
    """Seconds of each call of each function, per repeat (after ``warmup`` untimed rounds), run
    interleaved: repeat i of every function ran next to the others' repeat i."""
    times = {name: [] for name in forwards}
    with torch.inference_mode():
        for step in range(warmup + repeats):
            for name, fn in forwards.items():
                _synchronize(device)
                start = time.perf_counter()
                fn()
                _synchronize(device)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
                if progress:
                    progress()
    return times


def speedups(plain: Sequence[float], other: Sequence[float]) -> List[float]:
    """Per-repeat speed-ups of ``other`` over ``plain`` (seconds per repeat, interleaved): each
    repeat against its neighbour, so that a busy moment weighs on both sides of its own ratio."""
    return [p / o for p, o in zip(plain, other)]


def relative_spread(values: Sequence[float]) -> float:
    """How far repeated measurements range: (largest - smallest) / median."""
    return (max(values) - min(values)) / statistics.median(values)


def spread_note(spreads: Dict[str, float], repeats: int) -> Optional[str]:
    """A line for the reader of a speed table, or None where nothing needs saying: too few repeats
    to show a spread, or a spread so wide (any of ``spreads``, label -> ``relative_spread``) that
    the machine was busy while timing."""
    if repeats < MIN_SPEED_REPEATS:
        return (f'{repeats} repeat(s): too few to show how far the timings spread; give --repeats '
                f'{MIN_SPEED_REPEATS} or more before using these speed figures')
    wide = {label: spread for label, spread in spreads.items() if spread > WIDE_SPREAD}
    if not wide:
        return None
    label, spread = max(wide.items(), key=lambda item: item[1])
    return (f'the repeats spread widely ({label}: {100 * spread:.0f} % of the median; a quiet machine stays '
            f'within {100 * WIDE_SPREAD:.0f} %): something else was running while timing; rerun before using '
            f'these speed figures (more --repeats narrow it)')


def require_distinct_keep_rates(keep_rates: Sequence[float]) -> None:
    """A ValueError naming ``--keep-rates`` and the first rate listed twice: each rate is measured
    once, and two rows from one measurement would look like two measurements that agree."""
    _require_distinct(keep_rates, '--keep-rates', 'keep rate')


def _require_distinct(values: Sequence[float], option: str, noun: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f'{option} lists {value:g} twice: give each {noun} once')
        seen.add(value)


def run_bench(
        model_name: str = 'evit_deit_small',
        keep_rates: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
        fuse_token: Optional[bool] = None,
        batch_size: int = 32,
        repeats: int = 5,
        warmup: int = 2,
        attn: Sequence[str] = ('math', 'fused'),
        dtype: str = 'fp32',
        compile: Optional[str] = None,
        device: str = 'cpu',
        latency: bool = True,
        pretrained: bool = False,
        show_progress: bool = True,
        model_kwargs: Optional[dict] = None,
        runtime: str = 'torch',
        quantize: Optional[str] = None,
        data_dir: Optional[str] = None,
        split: str = 'validation',
        checkpoint: Optional[str] = None,
        crop_pct: Optional[float] = None,
) -> List[BenchRow]:
    """Rows for the plain timm model and for ``model_name`` at each keep rate, per attention path.

    ``latency`` also times batch 1 (interleaved the same way). With ``compile`` (a torch.compile
    mode, one of COMPILE_MODES), every model and keep rate is compiled during the warm-up (at least
    one warm-up step; three for 'reduce-overhead', whose CUDA graphs are recorded on a later call).
    On CUDA, cuDNN's benchmark mode is on for the run (``cudnn_benchmark``).
    ``model_kwargs`` change the architecture of both models alike (e.g. ``img_size``, ``depth``).
    ``fuse_token`` None: the model's own (``model_kwargs``' or the default).
    ``runtime`` 'onnxruntime' exports every model to ONNX (per attention path) and times the
    exports in onnxruntime on the CPU instead (fp32, no ``compile``); GMACs and tokens are torch's.
    ``quantize='int8'`` (onnxruntime only) times both exports quantized as ``export --quantize int8``
    writes them. An onnxruntime run also times the plain model in torch fp32 eager in the same
    interleaved run: each row also gives its speed-up over that (``speedup_vs_torch``).

    ``data_dir``: every row is measured on the first ``batch_size`` images of its ``split`` (an
    ImageFolder, in timm's order, through the model's eval transform: ``sweep.first_images``)
    instead of random noise (batch 1: the first of them).
    """
    from tqdm import tqdm

    plain_name = plain_model_name(model_name)[0]
    require_distinct_keep_rates(keep_rates)
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    if any(a not in ('math', 'fused') for a in attn):
        raise ValueError(f"attn entries must be 'math' or 'fused', got {list(attn)!r}")
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f'compile must be None (eager) or one of {list(COMPILE_MODES)}, got {compile!r}')
    check_runtime(runtime, compile, device, dtype, quantize)
    dev = check_device(device)
    warmup = max(warmup, min_warmup(compile))

    if crop_pct is not None and (data_dir is None or not 0 < crop_pct <= 1):
        raise ValueError(f'--crop-pct takes a fraction in (0, 1] and needs --data-dir, got {crop_pct!r}')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ValueError(f'--checkpoint {checkpoint!r} is not a file')
    model_kwargs = merge_model_kwargs(model_kwargs, fuse_token=fuse_token)
    evit = create_evit_model(model_name, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs).eval()
    input_size = (evit.in_chans, *evit.patch_embed.img_size)
    check_batch_fits(batch_size, input_size, DTYPES[dtype], dev)   # before allocating it
    fuse_token = evit.fuse_token
    plain = create_plain_counterpart(model_name, evit, **model_kwargs)  # same weights
    images = _bench_images(evit, batch_size, data_dir, split, crop_pct)
    source = weights_source(model_name, pretrained, checkpoint)

    # GMACs and token counts do not depend on dtype or device: count them once, fp32 on the CPU.
    x1 = images[:1]
    for r in keep_rates:   # before the long run: a model computing NaN is not benchmarked as if it worked
        require_finite_forward(evit, x1, f'{source} at keep_rate {r:g}', keep_rate=r)
    plain_gmacs = {impl: count_gmacs(plain, x1, impl == 'fused') for impl in attn}
    gmacs = {impl: {r: count_gmacs(evit, x1, impl == 'fused', keep_rate=r) for r in keep_rates} for impl in attn}
    tokens = {r: tokens_per_stage(evit, x1, r) for r in keep_rates}

    with out_of_memory_as_error(batch_size, dev):
        plain.to(device=dev, dtype=DTYPES[dtype])
        batches = {batch_size: images.to(device=dev, dtype=DTYPES[dtype])}
        if latency:
            batches[1] = batches[batch_size][:1].clone()
        # One model per keep rate (shared-nothing copies): the rate is then a constant of each
        # compiled graph rather than a float argument that dynamo would make symbolic.
        at_rate = {r: model_at_keep_rate(evit, r).to(device=dev, dtype=DTYPES[dtype]) for r in keep_rates}
    wrap = partial(torch.compile, dynamic=False, mode=compile) if compile else (lambda model: model)

    rows = []
    steps = len(attn) * len(batches) * (len(keep_rates) + 1 + (runtime == 'onnxruntime')) * (repeats + warmup)
    # Compiling one function per keep rate and batch size needs more than dynamo's default cache.
    compile_cache = _dynamo().config.patch(cache_size_limit=64) if compile else contextlib.nullcontext()
    progress = tqdm(total=steps, desc=f'bench {model_name}', unit='fwd', disable=not show_progress)
    with out_of_memory_as_error(batch_size, dev), compile_cache, cudnn_benchmark(dev.type == 'cuda'), progress as bar:
        for impl in attn:
            for model in (plain, *at_rate.values()):
                set_fused_attn(model, impl == 'fused')
            seconds, samples = {}, {}
            runners = _forwards({'plain': plain, **at_rate}, runtime, wrap,   # exported after the attention switch
                                status=lambda text: bar.set_description(f'bench {model_name}: {text}'),
                                quantize=quantize)
            if runtime == 'onnxruntime':   # what every deployment is weighed against: timm's model in torch fp32
                runners['torch fp32'] = plain
            bar.set_description(f'bench {model_name}')
            for size, x in batches.items():
                forwards = {key: partial(run, x) for key, run in runners.items()}
                samples[size] = time_interleaved_samples(forwards, repeats, warmup, dev, progress=bar.update)
                seconds[size] = {key: statistics.median(t) for key, t in samples[size].items()}
            if compile:
                _dynamo().reset()  # the attention switch is baked into the compiled graphs

            def row(name, keep_rate, fuse, row_tokens, row_gmacs, key, fusion=None):
                ips = batch_size / seconds[batch_size][key]
                plain_ips = batch_size / seconds[batch_size]['plain']
                mac_ratio = plain_gmacs[impl] / row_gmacs
                lat = seconds[1][key] * 1e3 if latency else None
                lat_speedup = seconds[1]['plain'] * 1e3 / lat if latency else None
                vs_torch = lat_vs_torch = None
                if runtime == 'onnxruntime':
                    vs_torch = seconds[batch_size]['torch fp32'] / seconds[batch_size][key]
                    lat_vs_torch = seconds[1]['torch fp32'] / seconds[1][key] if latency else None
                return BenchRow(name, keep_rate, fuse, impl, dtype, compile, str(dev), batch_size, row_tokens,
                                row_gmacs, mac_ratio, ips, ips / plain_ips, ips / plain_ips / mac_ratio, lat,
                                lat_speedup, runtime, fusion, quantize, vs_torch, lat_vs_torch,
                                _spread(samples[batch_size], key), _spread(samples[1], key) if latency else None)

            rows.append(row(plain_name, None, None, [input_tokens(plain, x1)], plain_gmacs[impl], 'plain'))
            rows.extend(row(evit_label(model_name), r, fuse_token, tokens[r], gmacs[impl][r], r, evit.fusion)
                        for r in keep_rates)
    return rows


def _spread(samples: Dict[object, List[float]], key: object) -> float:
    """The spread of ``key``'s speed-ups over the plain model, repeat by repeat; of the plain
    model's own times for the plain model."""
    if key == 'plain':
        return relative_spread(samples['plain'])
    return relative_spread(speedups(samples['plain'], samples[key]))


def rows_spread_note(rows: List[BenchRow], repeats: int) -> Optional[str]:
    """``spread_note`` for bench's rows."""
    spreads = {}
    for r in rows:
        what = "timm's model's time" if r.keep_rate is None else f'the speed-up at keep_rate {r.keep_rate:g}'
        spreads[f'{what}, {r.attn} attention, batch {r.batch_size}'] = r.spread
        if r.latency_spread is not None:
            spreads[f'{what}, {r.attn} attention, batch 1'] = r.latency_spread
    return spread_note(spreads, repeats)


def _bench_images(model: torch.nn.Module, batch_size: int, data_dir: Optional[str], split: str,
                  crop_pct: Optional[float] = None) -> torch.Tensor:
    """The images every row is measured on, fp32 on the CPU: the first ``batch_size`` of ``data_dir``
    (see ``sweep.first_images``, ``crop_pct`` as there), or random noise of the model's input size without it."""
    if data_dir is None:
        return torch.randn(batch_size, model.in_chans, *model.patch_embed.img_size)
    from .sweep import first_images   # (sweep imports this module)
    return first_images(model, data_dir, split, batch_size, crop_pct)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells as text): the table bench and sweep print."""
    lines = [_markdown_line(header), '|---' * len(header) + '|']
    return '\n'.join(lines + [_markdown_line(row) for row in rows])


def _markdown_line(cells: Sequence[str]) -> str:
    return '| ' + ' | '.join(cells) + ' |'


def format_rows(rows: List[BenchRow]) -> str:
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


def rows_as_dicts(rows: List[BenchRow]) -> List[dict]:
    """The rows as dicts (for JSON and CSV)."""
    return [asdict(r) for r in rows]


def rows_figure(rows: List[BenchRow], title: str = ''):
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
