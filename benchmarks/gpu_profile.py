"""Where a GPU forward's time goes, plain timm DeiT-S against EViT with the paper's fusion and with
size-aware fusion: kernel time by operator, the number of kernels, and wall time, at batch 256 and
batch 1 (bf16, eager, SDPA).

Usage: python benchmarks/gpu_profile.py [--batch-sizes 256,1] [--keep-rate 0.5] [--device cuda] [--dtype bf16]
       [--img-size N]   (on the CPU the same code runs, with no kernel counts: a smoke run)
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
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', default='bf16', choices=('bf16', 'fp32'))
    parser.add_argument('--img-size', type=int, default=224)
    args = parser.parse_args()
    dtype, dev = {'bf16': torch.bfloat16, 'fp32': torch.float32}[args.dtype], torch.device(args.device)
    cuda = dev.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = True  # as timm's validate.py and timm-evit bench

    def sync():
        if cuda:
            torch.cuda.synchronize()
    plain = timm.create_model('deit_small_patch16_224', img_size=args.img_size).to(dev, dtype).eval()
    models = [('plain', plain)]
    for name, fusion in (('evit_deit_small', 'paper'), ('evit_deit_small_patch16_224', 'size')):
        evit = timm.create_model(name, keep_rate=args.keep_rate, img_size=args.img_size).to(dev, dtype).eval()
        evit.load_state_dict(plain.state_dict())
        assert evit.fusion == fusion
        models.append((f'evit {args.keep_rate:g}, fusion {fusion!r}', evit))
    device_name = torch.cuda.get_device_name(dev) if cuda else 'CPU'
    print(f'# {device_name}, torch {torch.__version__}, timm {timm.__version__}, {args.dtype}, eager')
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for batch in map(int, args.batch_sizes.split(',')):
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=dev, dtype=dtype)
        for name, model in models:
            with torch.inference_mode():
                for _ in range(5):
                    model(x)
                sync()
                start = time.perf_counter()
                for _ in range(args.iters):
                    model(x)
                sync()
                wall_ms = (time.perf_counter() - start) / args.iters * 1e3
                with profile(activities=activities) as prof:
                    for _ in range(args.iters):
                        model(x)
                    sync()
            events = prof.key_averages()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / args.iters
            print(f'\n## batch {batch}, {name}: wall {wall_ms:.2f} ms per forward, kernel time {gpu_ms:.2f} ms, '
                  f'{len(kernels) / args.iters:.0f} kernels per forward')
            sort_by = 'self_device_time_total' if cuda else 'self_cpu_time_total'
            print(events.table(sort_by=sort_by, row_limit=14, max_name_column_width=60))

if __name__ == '__main__':
    main()
