"""Per-image budget rules against fixed keep rates, training-free: top-1 against mean MACs per image,
on one or more checkpoints (docs/design.md, "Per-image token budgets"; BENCHMARKS.md, "Does a
per-image budget pay").

Every rule gives each image its own count per reorganising block from its scores; the model, the
fusion and everything else are the model's. Rules (each at a grid of its parameter):

- ``rate r``: the fixed count ``ceil(r * n)`` (the baseline);
- ``mass t``: the fewest highest-scored tokens holding ``t`` of the score (``keep_mass``);
- ``mass t, floor r``: at least ``ceil(r * n)``, more where the mass needs them;
- ``mass t, cap r``: at most ``ceil(r * n)`` (the padded width, the batch's cost, is never above
  the fixed rate's), fewer where the mass is reached sooner;
- ``mass t, T``: the mass of the scores raised to ``1 / T`` (flattened: a concentrated class row
  no longer ends the count early in the later blocks).

The rules are planted in ``reorg.num_kept_by_mass`` for the measurement (the counts, nothing else).
MACs per image are each image's own, as if it ran alone: the blocks' MACs at its token counts, from
a table of one block's attention and MLP MACs per token count (``FlopCounterMode``), plus the patch
embedding and head. Top-1 from the test split, each image's logits from ``forward_head`` of the
remembered ``forward_intermediates`` features.

Usage: python benchmarks/keep_mass_rules.py --data-dir data/cluttered_digits --split test \\
    --checkpoint runs/plain_s1/last.pth.tar --checkpoint runs/plain_s2/last.pth.tar \\
    --model evit_deit_tiny --num-classes 10 --crop-pct 1.0 \\
    --model-kwargs img_size=64 patch_size=8 embed_dim=96 depth=6 num_heads=3 "reorg_layers=(1,3,5)"
"""
import argparse
import ast
import math
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_evit.reorg as reorg
from timm_evit.tools.models import create_evit_model
from timm_evit.tools.sweep import eval_data_config, image_loader, load_image_folder

RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
MASSES = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)
_num_kept_by_mass = reorg.num_kept_by_mass


def rule_counts(floor=None, cap=None, temperature=None):
    """``num_kept_by_mass`` with the rule's change: a floor or cap on the count, or flattened scores."""
    def counts(score, keep_mass, valid=None):
        n = score.shape[1] if valid is None else valid.sum(dim=1)
        flat = score if temperature is None else score.clamp(min=0) ** (1. / temperature)
        k, order = _num_kept_by_mass(flat, keep_mass, valid)
        if temperature is not None:   # the count from the flattened scores, the order from the scores
            order = (score if valid is None else score.masked_fill(~valid, -1.)).detach().argsort(dim=1, descending=True)
        if floor is not None:
            k = torch.maximum(k, torch.ceil(torch.as_tensor(floor * n, dtype=torch.float64)).long())
        if cap is not None:
            k = torch.minimum(k, torch.ceil(torch.as_tensor(cap * n, dtype=torch.float64)).long())
        return k, order
    return counts


def block_macs_table(model, max_tokens: int):
    """MACs of one block's attention branch (at the tokens entering it) and MLP branch (at the
    tokens leaving it) per token count, and of everything outside the blocks."""
    blk = model.blocks[0]
    dim = model.embed_dim

    @lru_cache(maxsize=None)
    def branch(part: str, tokens: int) -> int:
        x = torch.randn(1, tokens, dim)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            if part == 'attn':
                blk.attn(blk.norm1(x))
            else:
                blk.mlp(blk.norm2(x))
        return counter.get_total_flops() // 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.set_keep_rate(1.0)
        model(torch.randn(1, 3, *model.patch_embed.img_size))
    whole = counter.get_total_flops() // 2
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    outside = whole - len(model.blocks) * (branch('attn', tokens) + branch('mlp', tokens))
    return branch, outside


def image_macs(model, counts_per_block, branch, outside) -> torch.Tensor:
    """Each image's MACs from its non-prefix token count after every block ``[blocks][B]``."""
    P = model.num_prefix_tokens
    entering = [torch.full_like(counts_per_block[0], model.patch_embed.num_patches)] + counts_per_block[:-1]
    macs = [float(outside)] * len(counts_per_block[0])
    for before, after in zip(entering, counts_per_block):
        for b, (n_in, n_out) in enumerate(zip(before.tolist(), after.tolist())):
            macs[b] += branch('attn', P + n_in) + branch('mlp', P + n_out)
    return torch.tensor(macs)


def evaluate(model, loader, branch, outside, **budget):
    """Top-1 (%) and mean GMACs per image, every image at ``budget``."""
    correct, total, macs = 0, 0, []
    with torch.no_grad():
        for x, y in loader:
            out = model.forward_intermediates(x, output_dict=True, intermediates_only=False, **budget)
            logits = model.forward_head(out['image_features'])
            counts = [(sizes > 0).sum(dim=1) for sizes in out['token_sizes']]
            macs.append(image_macs(model, counts, branch, outside))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
    return 100. * correct / total, float(torch.cat(macs).mean()) / 1e9


def rate_curve_at(curve, gmacs: float):
    """Top-1 of the fixed-rate curve (``[(gmacs, top1)]``) at ``gmacs``, linearly interpolated;
    None outside its range."""
    curve = sorted(curve)
    for (g0, a0), (g1, a1) in zip(curve, curve[1:]):
        if g0 <= gmacs <= g1:
            return a0 + (a1 - a0) * (gmacs - g0) / (g1 - g0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--split', default='test')
    parser.add_argument('--checkpoint', action='append', required=True)
    parser.add_argument('--model', default='evit_deit_tiny')
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--crop-pct', type=float, default=1.0)
    parser.add_argument('--fusion', default='size')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--model-kwargs', nargs='*', default=[])
    args = parser.parse_args()
    kwargs = {}
    for item in args.model_kwargs:
        key, value = item.split('=', 1)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    rules = [('rate', r, {}, dict(keep_rate=r)) for r in RATES]
    rules += [('mass', t, {}, dict(keep_mass=t)) for t in MASSES]
    for floor in (0.5, 0.7):
        rules += [(f'mass, floor {floor}', t, dict(floor=floor), dict(keep_mass=t)) for t in MASSES[:5]]
    for cap in (0.7, 0.9):
        rules += [(f'mass, cap {cap}', t, dict(cap=cap), dict(keep_mass=t)) for t in MASSES[:5]]
    for temperature in (2., 4.):
        rules += [(f'mass, T {temperature:g}', t, dict(temperature=temperature), dict(keep_mass=t))
                  for t in (0.99, 0.98, 0.95, 0.9, 0.8, 0.7)]
    print('| checkpoint | rule | value | top-1 | mean GMACs per image | top-1 minus the fixed rates at equal MACs |')
    print('|---|---|---|---|---|---|')
    for checkpoint in args.checkpoint:
        model = create_evit_model(args.model, checkpoint=checkpoint, num_classes=args.num_classes,
                                  fusion=args.fusion, **kwargs).eval()
        loader = image_loader(load_image_folder(args.data_dir, args.split),
                              eval_data_config(model, args.crop_pct), args.batch_size)
        branch, outside = block_macs_table(model, model.patch_embed.num_patches + model.num_prefix_tokens)
        top1, gmacs = evaluate(model, loader, branch, outside, keep_rate=1.0)
        print(f'| {checkpoint} | rate | 1 | {top1:.2f} | {gmacs:.5f} | |', flush=True)
        curve = [(gmacs, top1)]
        for name, value, change, budget in rules:
            reorg.num_kept_by_mass = rule_counts(**change) if change else _num_kept_by_mass
            try:
                top1, gmacs = evaluate(model, loader, branch, outside, **budget)
            finally:
                reorg.num_kept_by_mass = _num_kept_by_mass
            if name == 'rate':
                curve.append((gmacs, top1))
                delta = ''
            else:
                at = rate_curve_at(curve, gmacs)
                delta = '-' if at is None else f'{top1 - at:+.2f}'
            print(f'| {checkpoint} | {name} | {value:g} | {top1:.2f} | {gmacs:.5f} | {delta} |', flush=True)


if __name__ == '__main__':
    main()
