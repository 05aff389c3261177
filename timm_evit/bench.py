"""Benchmark EViT against timm's plain model: tokens per stage, GMACs, throughput ratio.

Speed is only reported as a ratio measured in one run: the plain timm model and the EViT model
(same weights, same attention implementation, same batch and dtype) are timed interleaved,
after a warm-up, and the median of the repeats is taken.
"""
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .deit import PLAIN_COUNTERPARTS

__all__ = ['BenchRow', 'set_fused_attn', 'count_gmacs', 'tokens_per_stage', 'time_interleaved', 'run_bench']


@dataclass
class BenchRow:
    model: str
    keep_rate: Optional[float]  # None for the plain timm model
    fuse_token: Optional[bool]
    attn: str
    tokens: List[int]           # non-class tokens entering the first reorganising block, then after each
    gmacs: float                # per image
    mac_ratio: float            # plain GMACs / these GMACs: the best speed-up token reduction can give
    images_per_s: float
    speedup: float              # throughput / plain throughput, same run


def set_fused_attn(model: torch.nn.Module, fused: bool) -> None:
    """Switch every timm attention module of ``model`` between SDPA (fused) and the math path."""
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = fused


def count_gmacs(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Multiply-accumulates per image in GMACs, counted by torch.utils.flop_counter.

    Call it with the math attention path: the counter has no formula for the CPU fused kernel.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        forward(x)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


def tokens_per_stage(model: torch.nn.Module, x: torch.Tensor, keep_rate: Optional[float]) -> List[int]:
    """Non-class token counts measured from the model: at the input, then after each reorganising block."""
    with torch.inference_mode():
        kwargs = {} if keep_rate is None else {'keep_rate': keep_rate}
        tokens = model.forward_intermediates(x[:1], output_fmt='NLC', intermediates_only=True, **kwargs)
    layers = getattr(model, 'reorg_layers', ())
    return [model.patch_embed.num_patches] + [tokens[i].shape[1] for i in layers]


def time_interleaved(
        forwards: Dict[str, Callable[[], object]],
        repeats: int,
        warmup: int,
        progress: Optional[Callable[[], None]] = None,
) -> Dict[str, float]:
    """Median seconds per call of each function, run interleaved so drifts hit all alike."""
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in forwards.values():
                fn()
                if progress:
                    progress()
        times = {name: [] for name in forwards}
        for _ in range(repeats):
            for name, fn in forwards.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                if progress:
                    progress()
    return {name: statistics.median(t) for name, t in times.items()}


def run_bench(
        model_name: str = 'evit_deit_small',
        keep_rates: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
        fuse_token: bool = True,
        batch_size: int = 32,
        repeats: int = 5,
        warmup: int = 2,
        attn: Sequence[str] = ('math', 'fused'),
        pretrained: bool = False,
        show_progress: bool = True,
) -> List[BenchRow]:
    """Rows for the plain timm model and for ``model_name`` at each keep rate, per attention path."""
    from tqdm import tqdm

    if model_name not in PLAIN_COUNTERPARTS:
        raise ValueError(f'model_name must be one of {sorted(PLAIN_COUNTERPARTS)}, got {model_name!r}')
    evit = timm.create_model(model_name, pretrained=pretrained, fuse_token=fuse_token).eval()
    plain = timm.create_model(PLAIN_COUNTERPARTS[model_name]).eval()
    plain.load_state_dict(evit.state_dict())  # same weights
    x = torch.randn(batch_size, *evit.pretrained_cfg['input_size'])

    rows = []
    steps = len(attn) * (len(keep_rates) + 1) * (repeats + warmup)
    with tqdm(total=steps, desc=f'bench {model_name}', unit='fwd', disable=not show_progress) as bar:
        for impl in attn:
            set_fused_attn(evit, False)
            set_fused_attn(plain, False)
            plain_gmacs = count_gmacs(plain, x[:1])
            gmacs = {r: count_gmacs(lambda t, r=r: evit(t, keep_rate=r), x[:1]) for r in keep_rates}
            set_fused_attn(evit, impl == 'fused')
            set_fused_attn(plain, impl == 'fused')
            forwards = {'plain': lambda: plain(x)}
            forwards.update({r: (lambda r=r: evit(x, keep_rate=r)) for r in keep_rates})
            seconds = time_interleaved(forwards, repeats, warmup, progress=bar.update)
            plain_ips = batch_size / seconds['plain']
            rows.append(BenchRow(
                PLAIN_COUNTERPARTS[model_name], None, None, impl, [plain.patch_embed.num_patches],
                plain_gmacs, 1.0, plain_ips, 1.0))
            for r in keep_rates:
                ips = batch_size / seconds[r]
                rows.append(BenchRow(
                    model_name, r, fuse_token, impl, tokens_per_stage(evit, x, r),
                    gmacs[r], plain_gmacs / gmacs[r], ips, ips / plain_ips))
    return rows


def format_rows(rows: List[BenchRow]) -> str:
    """A Markdown table."""
    lines = [
        '| model | attn | keep_rate | fuse | tokens per stage | GMACs | MAC ratio | img/s | speed-up |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        keep = '-' if r.keep_rate is None else f'{r.keep_rate:g}'
        fuse = '-' if r.fuse_token is None else ('yes' if r.fuse_token else 'no')
        lines.append(
            f'| {r.model} | {r.attn} | {keep} | {fuse} | {", ".join(map(str, r.tokens))} | {r.gmacs:.2f} '
            f'| {r.mac_ratio:.2f}x | {r.images_per_s:.1f} | {r.speedup:.2f}x |')
    return '\n'.join(lines)


def rows_as_dicts(rows: List[BenchRow]) -> List[dict]:
    return [asdict(r) for r in rows]
