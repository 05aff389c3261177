"""Measuring, for bench and sweep: GMACs and tokens per stage counted from the model, and time
measured interleaved with timm's model, with how far the repeats spread.

Speed is only reported as a ratio measured in one run: the plain timm model and the EViT model
(same weights, same attention implementation, same batch, dtype and device) are timed
interleaved, after a warm-up; the median of the repeats is taken and their spread shown.
"""
import contextlib
import copy
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ['set_fused_attn', 'count_gmacs', 'tokens_per_stage', 'input_tokens', 'model_at_keep_rate', 'min_warmup',
           'cudnn_benchmark', 'time_interleaved_samples', 'speedups', 'relative_spread', 'speedup_spread',
           'spread_note', 'MIN_SPEED_REPEATS', 'WIDE_SPREAD', 'dynamo']


def set_fused_attn(model: torch.nn.Module, fused: bool) -> None:
    """Switch every timm attention module of ``model`` between SDPA (fused) and the math path."""
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = fused


def _cpu_fused_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # torch's own formula for its fused attention kernels (two matmuls), which it does not register
    # for the CPU kernel
    return sdpa_flop_count(query, key, value)


def count_gmacs(model: torch.nn.Module, x: torch.Tensor, fused_attn: Optional[bool] = None,
                **forward_kwargs) -> float:
    """Multiply-accumulates per image of ``model(x, **forward_kwargs)`` in GMACs, counted by
    torch.utils.flop_counter on the attention path ``fused_attn`` (None: the model's own setting),
    so that what a score computes beside the fused kernel counts where it runs. The model's
    attention setting is restored afterwards."""
    # The counter's module tracker hooks every module input that requires grad; a view of a
    # parameter made without grad (timm's attention pool expands its latent query) cannot be
    # hooked, so the weights are counted with requires_grad off.
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    for p in requires_grad:
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention_flops})
    try:
        with _attention_path(model, fused_attn), torch.inference_mode(), counter:
            model(x, **forward_kwargs)
    finally:
        for p, value in requires_grad.items():
            p.requires_grad_(value)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


def tokens_per_stage(model: torch.nn.Module, x: torch.Tensor, keep_rate: Optional[float]) -> List[int]:
    """Non-class token counts measured from the model: at the input, then after each reorganising block."""
    with torch.inference_mode():
        kwargs = {} if keep_rate is None else {'keep_rate': keep_rate}
        tokens = model.forward_intermediates(x[:1], output_fmt='NLC', intermediates_only=True, **kwargs)
    layers = getattr(model, 'reorg_layers', ())
    return [input_tokens(model, x)] + [tokens[i].shape[1] for i in layers]


@contextlib.contextmanager
def _attention_path(model: torch.nn.Module, fused_attn: Optional[bool]):
    """``model`` on the attention path ``fused_attn`` (None: its own) for the block, restored after."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    if fused_attn is not None:
        set_fused_attn(model, fused_attn)
    try:
        yield
    finally:
        for module, value in fused.items():
            module.fused_attn = value


def input_tokens(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Patch tokens of images ``x``: the patch grid, padded where the model pads (``dynamic_img_pad``)."""
    return math.prod(model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))


def model_at_keep_rate(model: torch.nn.Module, keep_rate: float) -> torch.nn.Module:
    """A copy of ``model`` at ``keep_rate`` (shares nothing with it)."""
    model = copy.deepcopy(model)
    model.set_keep_rate(keep_rate)
    return model


def dynamo():
    import torch._dynamo as dynamo  # imported only when compiling
    return dynamo


def min_warmup(compile_mode: Optional[str]) -> int:
    """Warm-up calls a compile mode needs before its timings mean anything: the first call
    compiles; CUDA graph trees ('reduce-overhead') record on a later one."""
    if compile_mode is None:
        return 0
    return 3 if compile_mode == 'reduce-overhead' else 1


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN picks its fastest convolution for each shape, as timm's train.py and validate.py
    have it: left off, it may take a slow one for the patch embedding, a fixed cost that EViT
    cannot reduce (seen on an H200 in bf16: 16 % of DeiT-S's forward at batch 256)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or saved
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# A speed figure needs repeats enough to show how far they spread; below this, none is given (sweep)
# or it is marked as unchecked (bench, where the user asked for that many).
MIN_SPEED_REPEATS = 5


# Repeats whose middle half ranges over more than this (relative to their median) were timed on a
# machine busy with something else for a while. A quiet 2-core machine (AMD EPYC, DeiT-S, fp32) kept
# its per-repeat speed-ups' middle half within 2-8 %, at batch 1 and 32, where their full range,
# one stray repeat enough to stretch it, was 10-25 %.
WIDE_SPREAD = 0.15


def time_interleaved_samples(
        forwards: Dict[object, Callable[[], object]],
        repeats: int,
        warmup: int,
        device: torch.device = torch.device('cpu'),
        progress: Optional[Callable[[], None]] = None,
) -> Dict[object, List[float]]:
    """Seconds of each call of each function, per repeat (after ``warmup`` untimed rounds), run
    interleaved: repeat i of every function ran next to the others' repeat i."""
    times = {name: [] for name in forwards}
    with torch.inference_mode():
        for step in range(warmup + repeats):
            for name, fn in forwards.items():
                _synchronize(device)
                start = time.perf_counter()
                fn()
                _synchronize(device)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
                if progress:
                    progress()
    return times


def speedups(plain: Sequence[float], other: Sequence[float]) -> List[float]:
    """Per-repeat speed-ups of ``other`` over ``plain`` (seconds per repeat, interleaved): each
    repeat against its neighbour, so that a busy moment weighs on both sides of its own ratio."""
    return [p / o for p, o in zip(plain, other)]


def relative_spread(values: Sequence[float]) -> float:
    """How far repeated measurements spread: the range of their middle half (interquartile range)
    over their median. One stray repeat moves neither (nor the median a figure is read from);
    a machine busy through several repeats widens it."""
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method='inclusive')
    return (high - low) / statistics.median(values)


def speedup_spread(samples: Dict[object, List[float]], key: object, plain: object = 'plain') -> float:
    """The spread (``relative_spread``) of ``key``'s per-repeat speed-ups over ``plain`` in
    ``samples`` (``time_interleaved_samples``); for ``plain`` itself, of its own times (how quiet
    the machine was)."""
    if key == plain:
        return relative_spread(samples[plain])
    return relative_spread(speedups(samples[plain], samples[key]))


def spread_note(spreads: Dict[str, float], repeats: int) -> Optional[str]:
    """A line for the reader of a speed table, or None where nothing needs saying: too few repeats
    to show a spread, or a spread so wide (any of ``spreads``, label -> ``relative_spread``) that
    the machine was busy while timing."""
    if repeats < MIN_SPEED_REPEATS:
        return (f'{repeats} repeat(s): too few to show how far the timings spread; give --repeats '
                f'{MIN_SPEED_REPEATS} or more before using these speed figures')
    wide = {label: spread for label, spread in spreads.items() if spread > WIDE_SPREAD}
    if not wide:
        return None
    label, spread = max(wide.items(), key=lambda item: item[1])
    return (f'the repeats spread widely ({label}: their middle half over {100 * spread:.0f} % of the median; '
            f'a quiet machine stays within {100 * WIDE_SPREAD:.0f} %): something else was running while timing; '
            f'rerun before using these speed figures')
