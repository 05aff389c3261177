"""Benchmark EViT against timm's plain model: tokens per stage, GMACs, throughput ratio, as rows
(``BenchRow``; measured as ``measure`` measures, reported by ``report``)."""
import contextlib
import os
import statistics
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..checkpoints import require_finite_forward, weights_source
from .data import first_images
from .measure import (
    count_gmacs, cudnn_benchmark, dynamo, input_tokens, min_warmup, model_at_keep_rate, set_fused_attn, speedup_spread,
    time_interleaved_samples, tokens_per_stage,
)
from .models import check_device, create_evit_model, merge_model_kwargs
from .preflight import check_batch_fits, out_of_memory_as_error
from .plain import ModelSpec, create_plain_counterpart, model_spec

__all__ = ['BenchRow', 'BenchSettings', 'run_bench', 'DTYPES', 'COMPILE_MODES', 'RUNTIMES', 'check_runtime', 'require_distinct_keep_rates']

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


@dataclass(frozen=True)
class BenchSettings:
    """What a bench run measures, beside the model: built once (by the CLI from its options, or by a
    caller) and checked once (``checked``). See ``run_bench`` for what each setting does."""
    keep_rates: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    fuse_token: Optional[bool] = None
    batch_size: int = 32
    repeats: int = 5
    warmup: int = 2
    attn: Sequence[str] = ('math', 'fused')
    dtype: str = 'fp32'
    compile: Optional[str] = None
    device: str = 'cpu'
    latency: bool = True
    pretrained: bool = False
    model_kwargs: Optional[dict] = None
    runtime: str = 'torch'
    quantize: Optional[str] = None
    data_dir: Optional[str] = None
    split: str = 'validation'
    checkpoint: Optional[str] = None
    crop_pct: Optional[float] = None
    is_checked: bool = field(default=False, compare=False)

    def checked(self) -> 'BenchSettings':
        """These settings where every one can be served (a ValueError naming the option otherwise),
        with the warm-up a compile mode needs; checked once, however often asked."""
        if self.is_checked:
            return self
        require_distinct_keep_rates(self.keep_rates)
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}')
        if any(a not in ('math', 'fused') for a in self.attn):
            raise ValueError(f"attn entries must be 'math' or 'fused', got {list(self.attn)!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f'compile must be None (eager) or one of {list(COMPILE_MODES)}, got {self.compile!r}')
        check_runtime(self.runtime, self.compile, self.device, self.dtype, self.quantize)
        check_device(self.device)
        if self.crop_pct is not None and (self.data_dir is None or not 0 < self.crop_pct <= 1):
            raise ValueError(f'--crop-pct takes a fraction in (0, 1] and needs --data-dir, got {self.crop_pct!r}')
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise ValueError(f'--checkpoint {self.checkpoint!r} is not a file')
        return replace(self, warmup=max(self.warmup, min_warmup(self.compile)), is_checked=True)


def run_bench(model: Union[str, ModelSpec], settings: Optional[BenchSettings] = None, show_progress: bool = True,
              **setting_values) -> List[BenchRow]:
    """Rows for the plain timm model and for ``model`` (a name, or its ``ModelSpec``) at each keep
    rate, per attention path, as ``settings`` say (``BenchSettings``; or their values as keywords).

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
    ImageFolder, in timm's order, through the model's eval transform: ``data.first_images``)
    instead of random noise (batch 1: the first of them).
    """
    from tqdm import tqdm

    if settings is None:
        settings = BenchSettings(**setting_values)
    elif setting_values:
        raise TypeError(f'run_bench takes settings or their values, not both: {sorted(setting_values)}')
    settings = settings.checked()
    spec = model_spec(model)
    dev = torch.device(settings.device)
    keep_rates, batch_size, repeats, warmup = settings.keep_rates, settings.batch_size, settings.repeats, settings.warmup
    attn, dtype, compile, latency = settings.attn, settings.dtype, settings.compile, settings.latency
    runtime, quantize, checkpoint = settings.runtime, settings.quantize, settings.checkpoint
    model_kwargs = merge_model_kwargs(settings.model_kwargs, fuse_token=settings.fuse_token)
    evit = create_evit_model(spec, pretrained=settings.pretrained, checkpoint=checkpoint, **model_kwargs).eval()
    input_size = (evit.in_chans, *evit.patch_embed.img_size)
    check_batch_fits(batch_size, input_size, DTYPES[dtype], dev)   # before allocating it
    fuse_token = evit.fuse_token
    plain = create_plain_counterpart(spec, evit, **model_kwargs)  # same weights
    images = _bench_images(evit, batch_size, settings.data_dir, settings.split, settings.crop_pct)
    source = weights_source(spec.name, settings.pretrained, checkpoint)

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
    compile_cache = dynamo().config.patch(cache_size_limit=64) if compile else contextlib.nullcontext()
    progress = tqdm(total=steps, desc=f'bench {spec.name}', unit='fwd', disable=not show_progress)
    with out_of_memory_as_error(batch_size, dev), compile_cache, cudnn_benchmark(dev.type == 'cuda'), progress as bar:
        for impl in attn:
            for model in (plain, *at_rate.values()):
                set_fused_attn(model, impl == 'fused')
            seconds, samples = {}, {}
            runners = _forwards({'plain': plain, **at_rate}, runtime, wrap,   # exported after the attention switch
                                status=lambda text: bar.set_description(f'bench {spec.name}: {text}'),
                                quantize=quantize)
            if runtime == 'onnxruntime':   # what every deployment is weighed against: timm's model in torch fp32
                runners['torch fp32'] = plain
            bar.set_description(f'bench {spec.name}')
            for size, x in batches.items():
                forwards = {key: partial(run, x) for key, run in runners.items()}
                samples[size] = time_interleaved_samples(forwards, repeats, warmup, dev, progress=bar.update)
                seconds[size] = {key: statistics.median(t) for key, t in samples[size].items()}
            if compile:
                dynamo().reset()  # the attention switch is baked into the compiled graphs

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
                                speedup_spread(samples[batch_size], key), speedup_spread(samples[1], key) if latency else None)

            rows.append(row(spec.plain_name, None, None, [input_tokens(plain, x1)], plain_gmacs[impl], 'plain'))
            rows.extend(row(spec.label, r, fuse_token, tokens[r], gmacs[impl][r], r, evit.fusion)
                        for r in keep_rates)
    return rows


def _bench_images(model: torch.nn.Module, batch_size: int, data_dir: Optional[str], split: str,
                  crop_pct: Optional[float] = None) -> torch.Tensor:
    """The images every row is measured on, fp32 on the CPU: the first ``batch_size`` of ``data_dir``
    (see ``data.first_images``, ``crop_pct`` as there), or random noise of the model's input size without it."""
    if data_dir is None:
        return torch.randn(batch_size, model.in_chans, *model.patch_embed.img_size)
    return first_images(model, data_dir, split, batch_size, crop_pct)


