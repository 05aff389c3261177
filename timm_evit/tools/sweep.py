"""Choose a keep rate: accuracy, GMACs and throughput of one model at several keep rates on an ImageFolder."""
import os
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from timm.utils import accuracy

from ..checkpoints import require_finite, require_finite_forward, weights_source
from .bench import check_runtime, require_distinct_keep_rates
from .data import eval_data_config, image_loader, load_image_folder
from .measure import MIN_SPEED_REPEATS, count_gmacs, model_at_keep_rate, speedup_spread, time_interleaved_samples
from .models import create_evit_model, merge_model_kwargs
from .plain import ModelSpec, create_plain_counterpart, model_spec

__all__ = ['SweepRow', 'SweepSettings', 'evaluate', 'run_sweep', 'pick_keep_rate']


@dataclass
class SweepRow:
    keep_rate: float
    top1: float                       # percent
    top5: float                       # percent (top-k with k = number of classes if fewer than 5)
    gmacs: float                      # per image
    # Speed, None where not measured (fewer than MIN_SPEED_REPEATS repeats: no spread to show)
    images_per_s: Optional[float]
    speedup_vs_plain: Optional[float]  # throughput / throughput of timm's plain model, same run, same weights
    num_images: int
    plain_model: str                  # that plain model (ModelSpec.plain_name)
    plain_images_per_s: Optional[float]
    runtime: str = 'torch'            # or 'onnxruntime': the ONNX export at this keep rate was evaluated
    quantize: Optional[str] = None    # 'int8': that export quantized (export --quantize)
    torch_top1: Optional[float] = None          # onnxruntime: the PyTorch model's top-1 on the same images
    changed_predictions: Optional[int] = None   # onnxruntime: images whose top-1 class differs from PyTorch's
    spread: Optional[float] = None              # the repeats' spread of the speed-up (bench.relative_spread)
    plain_spread: Optional[float] = None        # the repeats' spread of the plain model's time


@torch.no_grad()
def evaluate(model, loader, keep_rate: float, progress=None, source: str = 'the model', runtime_forward=None):
    """(top-1 %, top-5 %, images, changed, PyTorch's top-1 %) of ``model`` at ``keep_rate`` over
    ``loader``; a ValueError naming
    ``source`` for non-finite values, in the first batch's every block (``require_finite_forward``)
    or in any batch's logits (a NaN logit is never ranked above the target: it would count as correct).

    ``runtime_forward`` (images -> logits, e.g. the onnxruntime session of this keep rate's export):
    the accuracy is that forward's, ``changed`` counts the images whose top-1 class differs from the
    PyTorch model's, and the last value is the PyTorch model's top-1 (both None without it)."""
    model.eval()
    correct1 = correct5 = total = torch_correct1 = 0.
    changed = 0 if runtime_forward is not None else None
    source = f'{source} at keep_rate {keep_rate:g}'
    for images, targets in loader:
        if not total:
            require_finite_forward(model, images, source, keep_rate=keep_rate)
        logits = model(images, keep_rate=keep_rate)
        require_finite(logits, 'logits', source)
        if runtime_forward is not None:
            torch_logits, logits = logits, torch.as_tensor(runtime_forward(images))
            require_finite(logits, 'logits', f'{source} in onnxruntime')
            changed += int((logits.argmax(dim=-1) != torch_logits.argmax(dim=-1)).sum())
            torch_correct1 += float(accuracy(torch_logits, targets, topk=(1,))[0]) * targets.shape[0] / 100
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[-1])))
        correct1 += float(top1) * targets.shape[0] / 100
        correct5 += float(top5) * targets.shape[0] / 100
        total += targets.shape[0]
        if progress:
            progress(targets.shape[0])
    torch_top1 = 100 * torch_correct1 / total if runtime_forward is not None else None
    return 100 * correct1 / total, 100 * correct5 / total, int(total), changed, torch_top1


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep measures, beside the model: built once (by the CLI from its options, or by a
    caller) and checked once (``checked``). See ``run_sweep``."""
    data_dir: str
    split: str = 'validation'
    keep_rates: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    batch_size: int = 32
    pretrained: bool = False
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    fuse_token: Optional[bool] = None
    workers: int = 0
    model_kwargs: Optional[dict] = None
    crop_pct: Optional[float] = None
    repeats: int = 10
    runtime: str = 'torch'
    quantize: Optional[str] = None
    is_checked: bool = field(default=False, compare=False)

    def checked(self) -> 'SweepSettings':
        """These settings where every one can be served (a ValueError naming the option otherwise);
        checked once, however often asked."""
        if self.is_checked:
            return self
        require_distinct_keep_rates(self.keep_rates)
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 0:
            raise ValueError(f'--repeats must be an integer >= 0, got {self.repeats!r}')
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f'--crop-pct must be in (0, 1], got {self.crop_pct!r}')
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise ValueError(f'--checkpoint {self.checkpoint!r} is not a file')
        check_runtime(self.runtime, None, 'cpu', 'fp32', self.quantize)
        return replace(self, is_checked=True)


def run_sweep(model: Union[str, ModelSpec], settings: Optional[SweepSettings] = None, show_progress: bool = True,
              **setting_values) -> List[SweepRow]:
    """Evaluate ``model`` (a name, or its ``ModelSpec``) at each keep rate as ``settings`` say
    (``SweepSettings``; or their values as keywords): timm's dataset, loader and eval transform of
    the model at the size it is built with (``data.eval_data_config``), with GMACs, and throughput measured in
    the same run as that of timm's plain model of the same architecture and weights, on the first
    batch of the data. ``num_classes`` and ``fuse_token`` may also be in ``model_kwargs`` (with the
    same value); None: the model's own. Each row sets its own keep rate for every call, over
    whatever ``model_kwargs`` give.

    ``runtime='onnxruntime'``: what is evaluated and timed is the model's ONNX export at each keep rate
    (one export per rate, the keep rate fixed in its graph, as ``timm-evit export`` writes it;
    ``quantize='int8'``: quantized as ``export --quantize int8``), beside the plain model exported the
    same way; each row also gives the PyTorch model's top-1 and how many images' top-1 class changed."""
    from tqdm import tqdm

    if settings is None:
        settings = SweepSettings(**setting_values)
    elif setting_values:
        raise TypeError(f'run_sweep takes settings or their values, not both: {sorted(setting_values)}')
    settings = settings.checked()
    spec = model_spec(model)   # a ValueError for a name no tool takes
    keep_rates, batch_size, repeats = settings.keep_rates, settings.batch_size, settings.repeats
    pretrained, checkpoint, runtime, quantize = settings.pretrained, settings.checkpoint, settings.runtime, settings.quantize
    model_kwargs = merge_model_kwargs(settings.model_kwargs, num_classes=settings.num_classes,
                                      fuse_token=settings.fuse_token)
    dataset = load_image_folder(settings.data_dir, settings.split)
    model = create_evit_model(spec, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs).eval()
    loader = image_loader(dataset, eval_data_config(model, settings.crop_pct), batch_size, settings.workers)

    plain = create_plain_counterpart(spec, model, **model_kwargs)
    runtime_forwards = {}
    if runtime == 'onnxruntime':   # one export per keep rate: the files a deployment would ship
        from .export import onnxruntime_forward
        runtime_forwards = {r: onnxruntime_forward(model_at_keep_rate(model, r), quantize=quantize)
                            for r in keep_rates}
        runtime_forwards['plain'] = onnxruntime_forward(plain, quantize=quantize)
    results = {}
    with tqdm(total=len(dataset) * len(keep_rates), desc=f'sweep {spec.name}', unit='img',
              disable=not show_progress) as bar:
        for r in keep_rates:
            bar.set_postfix(keep_rate=f'{r:g}')
            results[r] = evaluate(model, loader, r, progress=bar.update,
                                  source=weights_source(spec.name, pretrained, checkpoint),
                                  runtime_forward=runtime_forwards.get(r))

    x = next(iter(loader))[0]
    gmacs = {r: count_gmacs(model, x[:1], keep_rate=r) for r in keep_rates}
    if runtime == 'onnxruntime':
        forwards = {key: (lambda run=run: run(x)) for key, run in runtime_forwards.items()}
    else:
        forwards = {'plain': lambda: plain(x), **{r: (lambda r=r: model(x, keep_rate=r)) for r in keep_rates}}
    speed = _speed(forwards, x.shape[0], repeats)
    rows = []
    for r in keep_rates:
        top1, top5, n, changed, torch_top1 = results[r]
        rows.append(SweepRow(r, top1, top5, gmacs[r], *speed[r][:2], n, spec.plain_name, speed['plain'][0], runtime,
                             quantize, torch_top1, changed, speed[r][2], speed['plain'][2]))
    return rows


def _speed(forwards: Dict[object, Callable[[], object]], batch_size: int, repeats: int) -> Dict[object, tuple]:
    """(images per second, speed-up over 'plain', spread) of each of ``forwards``, timed interleaved
    as bench times them; all None with fewer than MIN_SPEED_REPEATS ``repeats``, where no spread
    would show whether the figures can be trusted (a busy machine gave 0.83x to 11.9x)."""
    if repeats < MIN_SPEED_REPEATS:
        return {key: (None, None, None) for key in forwards}
    samples = time_interleaved_samples(forwards, repeats=repeats, warmup=1)
    median = {key: statistics.median(t) for key, t in samples.items()}
    return {key: (batch_size / median[key], median['plain'] / median[key],
                  speedup_spread(samples, key))
            for key in forwards}


def pick_keep_rate(rows: List[SweepRow], max_drop: float) -> SweepRow:
    """The fastest row whose top-1 is within ``max_drop`` points of keep rate 1.0 (timm's model)."""
    reference = next((r for r in rows if r.keep_rate == 1.0), None)
    if reference is None:
        raise ValueError('--max-drop needs keep rate 1.0 in --keep-rates (the accuracy it is measured from)')
    allowed = [r for r in rows if r.top1 >= reference.top1 - max_drop]
    return max(allowed, key=lambda r: r.images_per_s)


