"""ATen operations per forward: timm's plain model against EViT with the paper's fusion and with
size-aware fusion, per family (docs/design.md, "Testing"; BENCHMARKS.md, "Operations per forward").

On a GPU at small batches every operation is a kernel launch, and launches, not arithmetic, bound
the forward; their count is a deterministic proxy that needs no GPU. Counted here: the top-level
``aten::`` events (those with no ``aten::`` parent) of one inference forward at batch 2 under
``torch.profiler``, after one warm-up forward, random weights, timm's fused attention path. Beside
it, the operations that launch work: those whose call runs a kernel (a view, a reshape that copies
nothing, a dropout in evaluation, a conversion to the dtype a tensor has launch none on a GPU).

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


# operations that run no kernel unless an operation they call does (a reshape that must copy, a conversion)
_NO_WORK_OF_THEIR_OWN = {
    'aten::' + name for name in (
        'view', 'slice', 'select', 'unsqueeze', 'squeeze', 'transpose', 'permute', 'expand', 'expand_as', 'unbind',
        'as_strided', 'alias', 'detach', 't', 'numpy_T', '_unsafe_view', 'unflatten', 'split', 'chunk', 'narrow',
        'reshape', 'flatten', 'view_as', 'to', 'type_as', 'contiguous', 'dropout', 'lift_fresh', '_reshape_alias')}


def _launches_work(event) -> bool:
    if event.name not in _NO_WORK_OF_THEIR_OWN:
        return True
    return any(_launches_work(child) for child in event.cpu_children if child.name.startswith('aten::'))


def top_level_ops(model: torch.nn.Module, x: torch.Tensor, working_only: bool = False) -> Counter:
    """Top-level ``aten::`` operations of one forward, by name (``working_only``: those that launch work)."""
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
        if parent is None and (not working_only or _launches_work(event)):
            counts[event.name] += 1
    return counts


def op_counts(model: torch.nn.Module, x: torch.Tensor):
    """(top-level operations, those of them that launch work) of one forward."""
    return sum(top_level_ops(model, x).values()), sum(top_level_ops(model, x, working_only=True).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('names', nargs='*', default=NAMES)
    parser.add_argument('--keep-rate', type=float, default=0.7)
    parser.add_argument('--batch-size', type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings('ignore')
    print(f'| model | timm | EViT, paper fusion | EViT, size-aware | size-aware - paper | (keep {args.keep_rate}, '
          f'batch {args.batch_size}; top-level aten:: operations of one forward / of them, those that launch work) |')
    print('|---|---|---|---|---|---|')
    for name in args.names:
        plain = timm.create_model(name).eval()
        x = torch.randn(args.batch_size, 3, *plain.patch_embed.img_size)
        counts = [op_counts(plain, x)]
        for fusion in ('paper', 'size'):
            model = timm_evit.apply(timm.create_model(name).eval(), keep_rate=args.keep_rate, fusion=fusion)
            counts.append(op_counts(model, x))
        (timm_ops, timm_work), (paper_ops, paper_work), (size_ops, size_work) = counts
        print(f'| {name} | {timm_ops} / {timm_work} | {paper_ops} (+{paper_ops - timm_ops}) / {paper_work} '
              f'(+{paper_work - timm_work}) | {size_ops} (+{size_ops - timm_ops}) / {size_work} (+{size_work - timm_work}) '
              f'| {size_ops - paper_ops} / {size_work - paper_work} | score {model.score!r} |')

if __name__ == '__main__':
    main()
