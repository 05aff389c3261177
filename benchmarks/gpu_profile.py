"""Where a GPU forward's time goes, plain timm DeiT-S against EViT: kernel time by operator, the
number of kernels, and wall time, at batch 256 and batch 1 (bf16, eager, SDPA).

Usage: python benchmarks/gpu_profile.py [--batch-sizes 256,1] [--keep-rate 0.5]
"""
import argparse
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import timm_evit  # noqa: F401  (registers the evit models)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-sizes', default='256,1')
    parser.add_argument('--keep-rate', type=float, default=0.5)
    parser.add_argument('--iters', type=int, default=10)
    args = parser.parse_args()
    dtype, dev = torch.bfloat16, torch.device('cuda')
    torch.backends.cudnn.benchmark = True  # as timm's validate.py and timm-evit bench
    plain = timm.create_model('deit_small_patch16_224').to(dev, dtype).eval()
    evit = timm.create_model('evit_deit_small', keep_rate=args.keep_rate).to(dev, dtype).eval()
    evit.load_state_dict(plain.state_dict())
    print(f'# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, timm {timm.__version__}, bf16, eager')
    for batch in map(int, args.batch_sizes.split(',')):
        x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dtype)
        for name, model in (('plain', plain), (f'evit {args.keep_rate:g}', evit)):
            with torch.inference_mode():
                for _ in range(5):
                    model(x)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.iters):
                    model(x)
                torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - start) / args.iters * 1e3
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.iters):
                        model(x)
                    torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / args.iters
            print(f'\n## batch {batch}, {name}: wall {wall_ms:.2f} ms per forward, kernel time {gpu_ms:.2f} ms, '
                  f'{len(kernels) / args.iters:.0f} kernels per forward')
            print(events.table(sort_by='self_device_time_total', row_limit=14, max_name_column_width=60))


if __name__ == '__main__':
    main()
