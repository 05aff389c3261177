"""This checkout's EViT against another checkout's, both beside timm's plain model, interleaved in
one process: "no slower than before" as a ratio measured in one run.

The other checkout's package is copied under another name (``timm_evit_before``, its ``__init__``
left empty so that only what ``apply`` needs is imported) into a temporary folder; both convert the
same timm model with the same weights. Each forward is timed in rotation (plain, before, now at
each keep rate), warm-up first, median of the repeats; the table gives each as a speed-up over
timm's model.

Usage: python benchmarks/against_checkout.py CHECKOUT [--model deit_small_patch16_224]
       [--keep-rates 0.7,0.5] [--fusion size] [--batch-sizes 1,32] [--repeats 30]
(CHECKOUT: a folder holding ``timm_evit/``, e.g. from ``git worktree add /tmp/before <commit>``)
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

import timm_evit


def import_before(checkout: Path):
    """``apply`` of the package in ``checkout``, imported as ``timm_evit_before``."""
    folder = Path(tempfile.mkdtemp())
    shutil.copytree(checkout / 'timm_evit', folder / 'timm_evit_before', ignore=shutil.ignore_patterns('tools'))
    (folder / 'timm_evit_before' / '__init__.py').write_text('')
    sys.path.insert(0, str(folder))
    from timm_evit_before.convert import apply
    return apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkout', type=Path)
    parser.add_argument('--model', default='deit_small_patch16_224')
    parser.add_argument('--keep-rates', default='0.7,0.5')
    parser.add_argument('--fusion', default='size')
    parser.add_argument('--batch-sizes', default='1,32')
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings('ignore')   # both packages register the same names with timm
    apply_before = import_before(args.checkout)
    plain = timm.create_model(args.model).eval()
    models = {'timm': plain}
    for rate in map(float, args.keep_rates.split(',')):
        for label, apply in (('before', apply_before), ('now', timm_evit.apply)):
            model = timm.create_model(args.model).eval()
            model.load_state_dict(plain.state_dict())
            models[f'{label} {rate}'] = apply(model, keep_rate=rate, fusion=args.fusion)
    print(f'{args.model}, fusion {args.fusion!r}, {torch.get_num_threads()} threads, fp32, eager; '
          'speed-up over timm (median of the repeats, interleaved)')
    print('| batch | timm ms | ' + ' | '.join(k for k in models if k != 'timm') + ' |')
    print('|---' * (len(models) + 1) + '|')
    for batch_size in map(int, args.batch_sizes.split(',')):
        x = torch.randn(batch_size, 3, *plain.patch_embed.img_size)
        times = {k: [] for k in models}
        repeats = max(3, args.repeats // batch_size) if batch_size > 1 else args.repeats
        with torch.inference_mode():
            for model in models.values():
                model(x)
            for _ in range(repeats):
                for k, model in models.items():
                    start = time.perf_counter()
                    model(x)
                    times[k].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in times.items()}
        ratios = ' | '.join(f'{median["timm"] / median[k]:.3f}x' for k in models if k != 'timm')
        print(f'| {batch_size} | {median["timm"] * 1e3:.1f} | {ratios} |')


if __name__ == '__main__':
    main()
