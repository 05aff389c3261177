"""Choose a keep rate: accuracy, GMACs and throughput of one model at several keep rates on an ImageFolder."""
import csv
import io
import json
import os
import statistics
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence

import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM
from timm.utils import accuracy

from ._io import pyplot, rgb_image
from ..checkpoints import require_finite, require_finite_forward, weights_source
from .bench import (
    MIN_SPEED_REPEATS, check_runtime, count_gmacs, markdown_table, model_at_keep_rate, relative_spread,
    require_distinct_keep_rates, speedups, spread_note, time_interleaved_samples,
)
from .files import figure_writer, write_all_whole
from .models import create_evit_model, merge_model_kwargs
from .plain import create_plain_counterpart, plain_model_name
from .preflight import check_batch_fits

__all__ = ['SweepRow', 'load_image_folder', 'image_files', 'with_rgb_images', 'split_folder', 'eval_data_config',
           'image_loader', 'first_images', 'evaluate', 'run_sweep', 'pick_keep_rate', 'format_rows', 'sweep_paths',
           'write_sweep', 'sweep_spread_note']

# timm's create_dataset looks for these folders for a split of these names: its own synonyms
TRAIN_SPLITS = tuple(_TRAIN_SYNONYM)
EVAL_SPLITS = tuple(_EVAL_SYNONYM)
KNOWN_SPLITS = TRAIN_SPLITS + EVAL_SPLITS + ('test', 'testing')


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
    plain_model: str                  # that plain model (see plain_model_name)
    plain_images_per_s: Optional[float]
    runtime: str = 'torch'            # or 'onnxruntime': the ONNX export at this keep rate was evaluated
    quantize: Optional[str] = None    # 'int8': that export quantized (export --quantize)
    torch_top1: Optional[float] = None          # onnxruntime: the PyTorch model's top-1 on the same images
    changed_predictions: Optional[int] = None   # onnxruntime: images whose top-1 class differs from PyTorch's
    spread: Optional[float] = None              # the repeats' spread of the speed-up (bench.relative_spread)
    plain_spread: Optional[float] = None        # the repeats' spread of the plain model's time


def split_folder(data_dir: str, split: str) -> str:
    """The folder of ``split`` in ``data_dir``, found as timm's create_dataset finds it (the
    split's own name, then its synonyms); ``data_dir`` itself if it holds class folders only and
    ``split`` is a validation split. timm would otherwise evaluate the whole root silently."""
    for name in (split, *_synonyms(split)):
        if os.path.isdir(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    splits = sorted(n for n in os.listdir(data_dir) if n in KNOWN_SPLITS and os.path.isdir(os.path.join(data_dir, n)))
    if splits:
        raise ValueError(f'--data-dir {data_dir!r} has no split {split!r}: it has {", ".join(splits)} (--split)')
    if split not in EVAL_SPLITS:
        raise ValueError(f'--data-dir {data_dir!r} has no split {split!r}: it has no split folders; its class '
                         f'folders are evaluated as they are only with a validation --split ({", ".join(EVAL_SPLITS)})')
    return data_dir


def _synonyms(split: str) -> Sequence[str]:
    return TRAIN_SPLITS if split in TRAIN_SPLITS else EVAL_SPLITS if split in EVAL_SPLITS else ()


def _image_dataset(data_dir: str, split: str):
    """timm's ImageFolder dataset of ``split`` (see ``split_folder``), images not yet read: timm's
    conversion to RGB clips 16-bit images, so ``load_image_folder`` converts them itself."""
    if not os.path.isdir(data_dir):
        raise ValueError(f'--data-dir {data_dir!r} is not a folder')
    root = split_folder(data_dir, split)
    try:
        dataset = create_dataset('', root=root, split=split, search_split=False, input_img_mode='')
    except RuntimeError as e:  # timm's ImageFolder reader finds no images
        raise ValueError(f'--data-dir {data_dir!r} (split {split!r}) holds no images: {e}') from e
    if len(dataset) == 0:
        raise ValueError(f'--data-dir {data_dir!r} (split {split!r}) holds no images')
    return dataset


def image_files(data_dir: str, split: str) -> List[str]:
    """The image files ``load_image_folder`` reads, without reading them."""
    return [path for path, _ in _image_dataset(data_dir, split).reader.samples]


def load_image_folder(data_dir: str, split: str):
    """timm's ImageFolder dataset of ``split`` (see ``split_folder``), with clear errors for a bad
    path, a missing split, no images, or files that cannot be decoded or have no 8-bit RGB
    equivalent (see ``rgb_image``). It yields 8-bit RGB images: ``with_rgb_images`` puts the
    conversion in front of the transform a loader gives it."""
    dataset = _image_dataset(data_dir, split)
    _require_decodable(dataset.reader.samples, data_dir)
    return dataset


def _require_decodable(samples, data_dir: str) -> None:
    """A ValueError naming up to three of the ``samples`` (path, target) that cannot be decoded."""
    unreadable = []
    for path, _ in samples:
        reason = _decoding_error(path)
        if reason:
            unreadable.append(f'{path}: {reason}')
    if unreadable:
        raise ValueError(f'{len(unreadable)} unreadable image(s) in {data_dir!r}, e.g. ' + '; '.join(unreadable[:3]))


def _decoding_error(path: str) -> Optional[str]:
    # timm skips a sample it cannot decode and silently serves the next one: that would bias the
    # accuracy, so every image is decoded (and converted) once up front (opening reads only the
    # header: a truncated JPEG opens fine and fails in load()).
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            rgb_image(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # SyntaxError: some broken headers
        return str(e)
    return None


def with_rgb_images(dataset) -> None:
    """Put ``rgb_image`` in front of ``dataset``'s transform (as timm's ``create_loader`` set it)."""
    from torchvision import transforms
    dataset.transform = transforms.Compose([rgb_image] + ([dataset.transform] if dataset.transform else []))


def eval_data_config(model, crop_pct: Optional[float] = None) -> dict:
    """timm's eval data config of ``model`` at the input size it was built with (``img_size=...``
    changes it; the pretrained_cfg still names the default size), ``crop_pct`` if given."""
    input_size = (model.in_chans, *model.patch_embed.img_size)
    return resolve_data_config({'input_size': input_size, 'crop_pct': crop_pct}, model=model)


def image_loader(dataset, data_config: dict, batch_size: int, workers: int = 0):
    """timm's eval loader (``create_loader``, CPU, no prefetcher) of ``dataset`` (``load_image_folder``'s)
    through ``data_config``'s transform, the images converted to 8-bit RGB first (``with_rgb_images``):
    the one pipeline of sweep and bench."""
    check_batch_fits(min(batch_size, len(dataset)), data_config['input_size'], torch.float32, torch.device('cpu'))
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'], num_workers=workers,
        use_prefetcher=False, device=torch.device('cpu'), persistent_workers=False)
    with_rgb_images(dataset)
    return loader


def first_images(model, data_dir: str, split: str, count: int, crop_pct: Optional[float] = None) -> torch.Tensor:
    """The first ``count`` images of ``split`` of the ImageFolder ``data_dir`` (timm's order: class
    folders sorted), as ``model`` sees them in evaluation (``eval_data_config``): ``[count, C, H, W]``
    fp32. Only those images are decoded; a ValueError where the split holds fewer (a measurement at
    ``--batch-size`` needs that many)."""
    dataset = _image_dataset(data_dir, split)
    if len(dataset) < count:
        raise ValueError(f'--data-dir {data_dir!r} (split {split!r}) holds {len(dataset)} image(s), fewer than '
                         f'--batch-size {count}: give a smaller --batch-size or more images')
    _require_decodable(dataset.reader.samples[:count], data_dir)
    images, _ = next(iter(image_loader(dataset, eval_data_config(model, crop_pct), count)))
    return images


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


def run_sweep(
        model_name: str,
        data_dir: str,
        split: str = 'validation',
        keep_rates: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
        batch_size: int = 32,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        fuse_token: Optional[bool] = None,
        workers: int = 0,
        show_progress: bool = True,
        model_kwargs: Optional[dict] = None,
        crop_pct: Optional[float] = None,
        repeats: int = 10,
        runtime: str = 'torch',
        quantize: Optional[str] = None,
) -> List[SweepRow]:
    """Evaluate one model at each keep rate (timm's dataset, loader and eval transform of the model
    at the size it is built with, see ``eval_data_config``), with GMACs, and throughput measured in
    the same run as that of timm's plain model of the same architecture and weights, on the first
    batch of the data. ``num_classes`` and ``fuse_token`` may also be in ``model_kwargs`` (with the
    same value); None: the model's own. Each row sets its own keep rate for every call, over
    whatever ``model_kwargs`` give.

    ``runtime='onnxruntime'``: what is evaluated and timed is the model's ONNX export at each keep rate
    (one export per rate, the keep rate fixed in its graph, as ``timm-evit export`` writes it;
    ``quantize='int8'``: quantized as ``export --quantize int8``), beside the plain model exported the
    same way; each row also gives the PyTorch model's top-1 and how many images' top-1 class changed."""
    from tqdm import tqdm

    plain_name = plain_model_name(model_name)[0]   # a ValueError for a name no tool takes
    require_distinct_keep_rates(keep_rates)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f'--repeats must be an integer >= 0, got {repeats!r}')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f'--crop-pct must be in (0, 1], got {crop_pct!r}')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ValueError(f'--checkpoint {checkpoint!r} is not a file')
    check_runtime(runtime, None, 'cpu', 'fp32', quantize)
    model_kwargs = merge_model_kwargs(model_kwargs, num_classes=num_classes, fuse_token=fuse_token)
    dataset = load_image_folder(data_dir, split)
    model = create_evit_model(model_name, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs).eval()
    loader = image_loader(dataset, eval_data_config(model, crop_pct), batch_size, workers)

    plain = create_plain_counterpart(model_name, model, **model_kwargs)
    runtime_forwards = {}
    if runtime == 'onnxruntime':   # one export per keep rate: the files a deployment would ship
        from .export import onnxruntime_forward
        runtime_forwards = {r: onnxruntime_forward(model_at_keep_rate(model, r), quantize=quantize)
                            for r in keep_rates}
        runtime_forwards['plain'] = onnxruntime_forward(plain, quantize=quantize)
    results = {}
    with tqdm(total=len(dataset) * len(keep_rates), desc=f'sweep {model_name}', unit='img',
              disable=not show_progress) as bar:
        for r in keep_rates:
            bar.set_postfix(keep_rate=f'{r:g}')
            results[r] = evaluate(model, loader, r, progress=bar.update,
                                  source=weights_source(model_name, pretrained, checkpoint),
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
        rows.append(SweepRow(r, top1, top5, gmacs[r], *speed[r][:2], n, plain_name, speed['plain'][0], runtime,
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
                  relative_spread(samples[key] if key == 'plain' else speedups(samples['plain'], samples[key])))
            for key in forwards}


def sweep_spread_note(rows: List[SweepRow], repeats: int) -> Optional[str]:
    """``bench.spread_note`` for sweep's rows (None where speed was not measured)."""
    if not rows or rows[0].spread is None:
        return None
    spreads = {"timm's model's time": rows[0].plain_spread}
    spreads.update({f'the speed-up at keep_rate {r.keep_rate:g}': r.spread for r in rows})
    return spread_note(spreads, repeats)


def pick_keep_rate(rows: List[SweepRow], max_drop: float) -> SweepRow:
    """The fastest row whose top-1 is within ``max_drop`` points of keep rate 1.0 (timm's model)."""
    reference = next((r for r in rows if r.keep_rate == 1.0), None)
    if reference is None:
        raise ValueError('--max-drop needs keep rate 1.0 in --keep-rates (the accuracy it is measured from)')
    allowed = [r for r in rows if r.top1 >= reference.top1 - max_drop]
    return max(allowed, key=lambda r: r.images_per_s)


def format_rows(rows: List[SweepRow]) -> str:
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


def write_sweep(rows: List[SweepRow], prefix: str, title: str = '', plot: bool = True,
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


def _accuracy_figure(plt, rows: List[SweepRow], title: str):
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
