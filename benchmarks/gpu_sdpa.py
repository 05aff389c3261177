"""Which SDPA kernel each block's attention runs, per fusion, and what the size bias costs there
(issue 31, item 3; docs/design.md, "Testing"; BENCHMARKS.md, "GPU").

Part 1, the kernel: every call of ``F.scaled_dot_product_attention`` in one inference forward
(timm's blocks, EViT's, an attention pool) is recorded with the kernel PyTorch's dispatcher picks
for its inputs (``torch._fused_sdp_choice``, what ``scaled_dot_product_attention`` consults),
block by block, for each model and fusion. Size-aware fusion gives every attention after the first
reorganisation an additive mask ``[B, 1, 1, N]`` (``log(size)`` per key); the paper's fusion none.

Part 2, the route: one attention at the shape of the first biased call, timed three ways: no bias
(timm's model), the size bias as SDPA's mask (what EViT runs), and the bias riding in the keys,
mask-free: ``scale * q.k + b`` is ``scale * [q, 1].[k, b / scale]``, so ``q`` is extended by a
constant 1 and ``k`` by ``b / scale`` (and ``v`` by zeros, sliced off after), padded to a
multiple of 8 so that the fused kernels take them, with SDPA's ``scale`` given (the default
would follow the padded width). The extension's concatenations are timed with it. The three
outputs are compared before anything is timed.

Usage: python benchmarks/gpu_sdpa.py [--device cuda] [--dtype bf16] [--batch-size 64] [--keep-rate 0.7]
       [--repeats 50]   (on the CPU it runs the same code: the kernels are the CPU's)
"""
import argparse
import statistics
import time
import warnings
from collections import defaultdict

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import timm_evit  # noqa: F401  (registers the evit models)

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
MODELS = {   # name: (timm name, EViT kwargs); both fusions of each
    'DeiT-S': ('evit_deit_small_patch16_224', {}),
    'SigLIP B/16': ('evit_vit_base_patch16_siglip_224', {}),
}


def kernels_per_block(model: torch.nn.Module, x: torch.Tensor):
    """[(where, query shape, whether a mask was given, the kernel)] for every SDPA call of one forward."""
    calls, where = [], ['embedding']
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
        calls.append((where[0], tuple(q.shape), attn_mask is not None, SDPBackend(choice).name))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f'block {i}'))
             for i, blk in enumerate(model.blocks)]
    if getattr(model, 'attn_pool', None) is not None:
        hooks.append(model.attn_pool.register_forward_pre_hook(lambda m, a: where.__setitem__(0, 'attention pool')))
    F.scaled_dot_product_attention = recording   # (timm's and EViT's attention look it up at each call)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        F.scaled_dot_product_attention = original
        for hook in hooks:
            hook.remove()
    return calls


def keys_carry_bias(q, k, v, key_bias, scale):
    """q, k, v extended so that ``scale * q'.k'`` is ``scale * q.k + key_bias`` (``[B, 1, 1, N]``), widths padded
    to a multiple of 8."""
    B, H, N, D = k.shape
    pad = 8 - D % 8 if D % 8 else 8
    ones = q.new_zeros(B, H, q.shape[2], pad)
    ones[..., 0] = 1.
    extra = k.new_zeros(B, H, N, pad)
    extra[..., 0] = key_bias.view(B, 1, N) / scale
    return (torch.cat([q, ones], dim=-1), torch.cat([k, extra], dim=-1),
            torch.cat([v, v.new_zeros(B, H, N, pad)], dim=-1))


def timed(fn, device, repeats):
    """Median milliseconds of ``fn()`` over ``repeats`` (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def routes(shape, device, dtype, repeats):
    """Rows (route, kernel, ms, speed against no bias) for one attention of ``shape`` [B, H, N, D]."""
    B, H, N, D = shape
    g = torch.Generator(device='cpu').manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    scale = D ** -0.5
    sizes = torch.randint(1, 60, (B, N), generator=g).float()
    key_bias = sizes.log().view(B, 1, 1, N).to(device, dtype)
    q2, k2, v2 = keys_carry_bias(q, k, v, key_bias, scale)
    with torch.inference_mode():
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
        carried = F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :D]
    error = float((masked.float() - carried.float()).abs().max())
    if error > (2e-2 if dtype == torch.bfloat16 else 1e-4) * float(masked.float().abs().max()):
        raise AssertionError(f'the keys-carry route computes another attention: max difference {error:.3g}')

    def choice(a, b, c, mask=None, s=None):
        return SDPBackend(torch._fused_sdp_choice(a, b, c, mask, 0.0, False, scale=s)).name

    def extended():
        a, b, c = keys_carry_bias(q, k, v, key_bias, scale)
        return F.scaled_dot_product_attention(a, b, c, scale=scale)[..., :D]
    with torch.inference_mode():
        plain_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
        mask_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias), device, repeats)
        keys_ms = timed(extended, device, repeats)
    return [('no bias (timm)', choice(q, k, v), plain_ms),
            ('bias as mask (EViT)', choice(q, k, v, key_bias), mask_ms),
            (f'bias in the keys (width {D} -> {q2.shape[-1]}, with the concatenations)', choice(q2, k2, v2, s=scale),
             keys_ms)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', default='bf16', choices=sorted(DTYPES))
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--keep-rate', type=float, default=0.7)
    parser.add_argument('--repeats', type=int, default=50)
    parser.add_argument('--img-size', type=int, default=None, help='smaller images for a quick run (default: the models\')')
    args = parser.parse_args()
    warnings.filterwarnings('ignore')
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'# SDPA kernels per block and the size bias ({name}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{args.dtype}, batch {args.batch_size}, keep {args.keep_rate})\n')
    first_biased = {}
    for label, (timm_name, kwargs) in MODELS.items():
        if args.img_size:
            kwargs = dict(kwargs, img_size=args.img_size)
        for fusion in ('paper', 'size'):
            model = timm.create_model(timm_name, keep_rate=args.keep_rate, fusion=fusion, **kwargs)
            model = model.to(device, dtype).eval()
            x = torch.randn(args.batch_size, 3, *model.patch_embed.img_size, device=device, dtype=dtype)
            calls = kernels_per_block(model, x)
            by_kernel = defaultdict(list)
            for where, shape, masked, kernel in calls:
                by_kernel[(kernel, masked)].append(where.replace('block ', ''))
                if masked and fusion == 'size' and label not in first_biased:
                    first_biased[label] = shape
            summary = '; '.join(f'{kernel}{" with mask" if masked else ""}: {", ".join(places)}'
                                for (kernel, masked), places in by_kernel.items())
            print(f'- {label}, fusion {fusion!r}: {summary}')
    print('\n| model | attention [B, H, N, D] | route | kernel | ms | against no bias |')
    print('|---|---|---|---|---|---|')
    for label, shape in first_biased.items():
        rows = routes(shape, device, dtype, args.repeats)
        for route, kernel, ms in rows:
            print(f'| {label} | {list(shape)} | {route} | {kernel} | {ms:.4f} | {rows[0][2] / ms:.2f}x |')
    print(f'\n(median of {args.repeats} calls each; the keys-carry route equals the masked one within the dtype)')


if __name__ == '__main__':
    main()
