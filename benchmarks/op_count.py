"""ATen operations per forward: timm's plain model against EViT with the paper's fusion and with
size-aware fusion, per family (docs/design.md, "The GPU"; BENCHMARKS.md, "Operations per forward").

On a GPU at small batches every operation is a kernel launch, and launches, not arithmetic, bound
the forward; their count is a deterministic proxy that needs no GPU. Counted here: the top-level
``aten::`` events (those with no ``aten::`` parent) of one inference forward at batch 2 under
``torch.profiler``, after one warm-up forward, random weights, timm's fused attention path.

Usage: python benchmarks/op_count.py [--keep-rate 0.7] [--batch-size 2] [NAME ...]
"""
import argparse
import warnings
from collections import Counter

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import timm_evit

# one name per family: a class token, registers, no class token with an attention pool ('pool') or an
# average ('mean'), and Eva with RoPE
NAMES = ['deit_small_patch16_224', 'vit_small_patch14_reg4_dinov2', 'vit_base_patch16_siglip_224',
         'vit_medium_patch16_reg4_gap_256', 'eva02_small_patch14_224']


def top_level_ops(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    """Top-level ``aten::`` operations of one forward, by name."""
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    counts = Counter()
    for event in prof.events():
        if not event.name.startswith('aten::'):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith('aten::'):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('names', nargs='*', default=NAMES)
    parser.add_argument('--keep-rate', type=float, default=0.7)
    parser.add_argument('--batch-size', type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings('ignore')
    print(f'| model | timm | EViT, paper fusion | EViT, size-aware | (keep {args.keep_rate}, batch {args.batch_size}; '
          'top-level aten:: operations of one forward) |')
    print('|---|---|---|---|---|')
    for name in args.names:
        plain = timm.create_model(name).eval()
        x = torch.randn(args.batch_size, 3, *plain.patch_embed.img_size)
        counts = [sum(top_level_ops(plain, x).values())]
        for fusion in ('paper', 'size'):
            model = timm_evit.apply(timm.create_model(name).eval(), keep_rate=args.keep_rate, fusion=fusion)
            counts.append(sum(top_level_ops(model, x).values()))
        print(f'| {name} | {counts[0]} | {counts[1]} (+{counts[1] - counts[0]}) | '
              f'{counts[2]} (+{counts[2] - counts[0]}) | score {model.score!r} |')


if __name__ == '__main__':
    main()
