"""The floor a score must clear: EViT choosing the kept tokens at random, the same counts.

Every reorganising block keeps ``ceil(keep_rate * n)`` tokens chosen uniformly at random (per image,
seeded) instead of the ``n`` highest of the score; everything else is the model's: the counts, the
fusion of the dropped tokens with the score's own weights (or dropping them), the pooling. Only the
choice changes, so a score that does not beat this by a clear margin does not rank. Evaluated as
``timm-evit sweep`` evaluates (its function, its data pipeline), once per seed.

    python benchmarks/random_selection.py --model NAME --checkpoint FILE --data-dir DIR --split test \\
        --num-classes 10 --crop-pct 1.0 --keep-rates 0.9,0.7,0.5,0.3 [--no-fuse] [--seeds 3] \\
        [--model-kwargs key=value ...]
"""
import argparse
import ast
import statistics
from unittest import mock

import torch

import timm_evit.reorg as reorg
from timm_evit.tools.sweep import run_sweep


def random_choice(generator: torch.Generator):
    """``reorganize_tokens`` keeping a random subset: the chosen tokens get scores above any score
    (so they are the top-k, in random order), the others keep theirs (the fusion weights)."""
    reorganize_tokens = reorg.reorganize_tokens

    def choose_at_random(x, scores, num_keep, fuse_token, num_prefix_tokens=1, weighted_mean=False):
        noise = torch.rand(scores.shape, generator=generator).to(scores.device)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, noise.topk(num_keep, dim=1).indices, True)
        # above every score (probabilities, or size-aware fusion's log-scores)
        ranked = torch.where(chosen, scores.amax(dim=1, keepdim=True) + 1. + noise.to(scores.dtype), scores)
        return reorganize_tokens(x, ranked, num_keep, fuse_token, num_prefix_tokens, weighted_mean)
    return choose_at_random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--checkpoint')
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--split', default='validation')
    parser.add_argument('--num-classes', type=int)
    parser.add_argument('--crop-pct', type=float)
    parser.add_argument('--keep-rates', default='0.9,0.7,0.5,0.3')
    parser.add_argument('--no-fuse', action='store_true')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--model-kwargs', nargs='*', default=[])
    args = parser.parse_args()
    model_kwargs = {}
    for pair in args.model_kwargs:
        key, value = pair.split('=', 1)
        try:
            model_kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            model_kwargs[key] = value
    rates = [float(r) for r in args.keep_rates.split(',')]
    top1 = {rate: [] for rate in rates}
    for seed in range(args.seeds):
        with mock.patch.object(reorg, 'reorganize_tokens', random_choice(torch.Generator().manual_seed(seed))):
            rows = run_sweep(args.model, data_dir=args.data_dir, split=args.split, keep_rates=rates,
                             batch_size=args.batch_size, checkpoint=args.checkpoint,
                             num_classes=args.num_classes, fuse_token=False if args.no_fuse else None,
                             show_progress=False, model_kwargs=model_kwargs, crop_pct=args.crop_pct, repeats=0)
        for row in rows:
            top1[row.keep_rate].append(row.top1)
    print(f'# {args.model}, random choice of the kept tokens, {"no fusion" if args.no_fuse else "fusion"}, '
          f'{args.seeds} seeds: top-1 % mean (min, max)')
    for rate in rates:
        values = top1[rate]
        print(f'keep {rate:g}: {statistics.mean(values):.2f} ({min(values):.2f}, {max(values):.2f})')


if __name__ == '__main__':
    main()
