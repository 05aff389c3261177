"""What bounds EViT's batch-1 latency on the CPU: plain timm DeiT-S against evit_deit_small.

Five measurements, each model interleaved with the other in one process (fp32, eager, SDPA):

1. Wall time per forward, and per block (forward hooks), median of ``--repeats``.
2. The cost of a block that keeps its tokens, fitted as ``a + b * tokens`` on those forwards' own
   blocks: the fixed part ``a`` is what fewer tokens cannot shrink.
3. An oracle: timm's own blocks run at EViT's token counts, with token selection free (the
   reorganising block's MLP runs on the first ``N_out`` tokens). No implementation of this token
   schedule with timm's layers can beat it; ``plain / oracle`` is the speed-up it allows here.
4. Self CPU time by operator group (``torch.profiler``).
5. EViT's own step (class-attention row and reorganisation, 197 tokens, keep 0.5) timed in a tight
   loop and right after a block's forward, as in the model: small operations cost several times
   more once a block's matmuls have run through the caches.

Usage: python benchmarks/cpu_latency_profile.py [--keep-rates 0.7,0.5] [--repeats 41] [--threads N]
"""
import argparse
import statistics
import time
from collections import defaultdict

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import timm_evit  # noqa: F401  (registers the evit models)

# operator -> group for the profile table; anything else is 'other'
GROUPS = {
    'aten::addmm': 'matmul (addmm)',
    'aten::_scaled_dot_product_flash_attention_for_cpu': 'attention (SDPA)',
    'aten::copy_': 'copy_ (bias into addmm output, reshapes)',
    'aten::gelu': 'gelu',
    'aten::native_layer_norm': 'layer norm',
    'aten::add': 'residual add',
    'aten::mkldnn_convolution': 'patch embedding',
}
EVIT_GROUP = 'EViT (top-k, index_select, cat, class row)'
EVIT_OPS = ('aten::topk', 'aten::index_select', 'aten::gather', 'aten::cat', 'aten::bmm', 'aten::scatter', 'aten::sum',
            'aten::mean', 'aten::_softmax', 'aten::mul', 'aten::arange', 'aten::matmul')


def block_token_counts(model, keep_rate, x):
    """(tokens into attention, tokens into the MLP) per block, measured from the model's forward."""
    with torch.inference_mode():
        outputs = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True, keep_rate=keep_rate)
    tokens_out = [model.num_prefix_tokens + out.shape[1] for out in outputs]
    tokens_in = [model.num_prefix_tokens + model.patch_embed.num_patches] + tokens_out[:-1]
    return list(zip(tokens_in, tokens_out))


def oracle_forward(plain, x, counts, block_times=None):
    """timm's layers at EViT's token counts; dropping tokens costs nothing here."""
    x = plain._pos_embed(plain.patch_embed(x))
    for i, (block, (n_in, n_out)) in enumerate(zip(plain.blocks, counts)):
        start = time.perf_counter()
        x = x + block.ls1(block.attn(block.norm1(x)))
        x = x[:, :n_out]
        x = x + block.ls2(block.mlp(block.norm2(x)))
        if block_times is not None:
            block_times[i].append(time.perf_counter() - start)
    return plain.forward_head(plain.norm(x))


def timed_blocks(model):
    starts, times = {}, defaultdict(list)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter()))
        block.register_forward_hook(lambda m, a, o, i=i: times[i].append(time.perf_counter() - starts[i]))
    return times


def _line_fit(points):
    """Least squares ``(a, b)`` of ``t = a + b * n`` through ``(n, t)`` points."""
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    b = sum((n - mean_n) * (t - mean_t) for n, t in points) / sum((n - mean_n) ** 2 for n, _ in points)
    return mean_t - b * mean_n, b


def own_step_cost(repeats=200):
    """Median us of EViT's class row + reorganisation: back to back, and after a timm block."""
    from timm.models.vision_transformer import Block
    from timm_evit.reorg import reorganize_at_rate
    from timm_evit.reorg import class_attention
    torch.manual_seed(0)
    blocks = [Block(384, 6, qkv_bias=True).eval() for _ in range(12)]
    x = torch.randn(1, 197, 384)
    q, k, _ = blocks[0].attn.qkv(x).reshape(1, 197, 3, 6, 64).permute(2, 0, 3, 1, 4).unbind(0)

    def step():
        cls_attn = class_attention(q, k, 0.125)
        return reorganize_at_rate(x, cls_attn, 0.5, True)
    results = {}
    for label, before in (('back to back', None), ('after a block', lambda i: blocks[i % 12](x))):
        samples = []
        for i in range(repeats):
            if before is not None:
                before(i)
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        results[label] = statistics.median(samples[10:]) * 1e6
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--keep-rates', default='0.7,0.5')
    parser.add_argument('--repeats', type=int, default=41)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = timm.create_model('deit_small_patch16_224').eval()
    num_patches = plain.patch_embed.num_patches
    evits = {}
    for rate in map(float, args.keep_rates.split(',')):
        evit = timm.create_model('evit_deit_small', keep_rate=rate).eval()
        evit.load_state_dict(plain.state_dict())
        evits[rate] = evit
    x = torch.randn(1, 3, 224, 224)
    print(f'# batch 1, fp32, eager, SDPA; {torch.get_num_threads()} torch threads; '
          f'torch {torch.__version__}, timm {timm.__version__}')

    runs = {'plain': lambda: plain(x)}
    block_times = {'plain': timed_blocks(plain)}
    counts = {}
    for rate, evit in evits.items():
        counts[rate] = block_token_counts(evit, rate, x)
        runs[f'evit {rate:g}'] = lambda evit=evit: evit(x)
        block_times[f'evit {rate:g}'] = timed_blocks(evit)
        block_times[f'oracle {rate:g}'] = times = defaultdict(list)
        runs[f'oracle {rate:g}'] = lambda c=counts[rate], t=times: oracle_forward(plain, x, c, t)
    wall = defaultdict(list)
    with torch.inference_mode():
        for _ in range(3):
            for run in runs.values():
                run()
        for times in block_times.values():
            times.clear()
        for _ in range(args.repeats):   # interleaved: drift on a shared machine hits all alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                wall[name].append(time.perf_counter() - start)
    plain_ms = statistics.median(wall['plain']) * 1e3
    print('\n## Wall time per forward (median; the oracle runs timm\'s blocks, hooks excluded)')
    print('| run | ms | speed-up over plain |\n|---|---|---|')
    for name, samples in wall.items():
        ms = statistics.median(samples) * 1e3
        print(f'| {name} | {ms:.1f} | {plain_ms / ms:.2f}x |')

    print('\n## Per block (ms, median) and tokens into attention -> MLP')
    points = []   # (tokens, ms) of the EViT and plain blocks that keep their tokens
    for name, times in block_times.items():
        tokens = counts[float(name.split()[1])] if name != 'plain' else [(num_patches + 1,) * 2] * len(times)
        medians = [statistics.median(times[i]) * 1e3 for i in range(len(times))]
        if not name.startswith('oracle'):
            points += [(n_in, ms) for (n_in, n_out), ms in zip(tokens, medians) if n_in == n_out]
        cells = ' '.join(f'{ms:.2f}' for ms in medians)
        print(f'{name:>10}: {cells}   tokens {" ".join(f"{a}->{b}" if a != b else str(a) for a, b in tokens)}')
    a, b = _line_fit(points)
    print(f'blocks that keep their tokens, in these forwards: a + b * tokens with a = {a:.3f} ms, b = {b * 1e3:.1f} us')

    print('\n## Self CPU time by operator group (ms per forward, torch.profiler)')
    groups = {}
    with torch.inference_mode():
        for name in ['plain', *[f'evit {r:g}' for r in evits]]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    runs[name]()
            totals = defaultdict(float)
            for event in prof.key_averages():
                group = GROUPS.get(event.key, EVIT_GROUP if event.key in EVIT_OPS else 'other')
                totals[group] += event.self_cpu_time_total / 10 / 1e3
            groups[name] = totals
    names = list(groups)
    print('| group | ' + ' | '.join(names) + ' |\n|---|' + '---|' * len(names))
    for group in sorted({g for t in groups.values() for g in t}, key=lambda g: -groups['plain'].get(g, 0)):
        print(f'| {group} | ' + ' | '.join(f'{groups[n].get(group, 0):.2f}' for n in names) + ' |')

    print('\n## EViT\'s own step (class row + reorganisation, 197 tokens, keep 0.5, fusion), us')
    with torch.inference_mode():
        print(', '.join(f'{label}: {us:.0f}' for label, us in own_step_cost().items()))


if __name__ == '__main__':
    main()
