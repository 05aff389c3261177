"""Validation of the EViT model arguments: clear errors, nothing silently clamped."""
import math
import numbers
from typing import Sequence, Tuple, Union

__all__ = ['KeepRate', 'EVIT_ARGS', 'check_keep_rate', 'check_reorg_layers', 'check_fuse_token']

KeepRate = Union[float, Sequence[float]]
# The creation arguments only EViT has; every other argument describes the timm architecture.
EVIT_ARGS = ('keep_rate', 'reorg_layers', 'fuse_token', 'keep_rate_warmup_start', 'keep_rate_warmup_steps')


def _check_one_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a float in (0, 1], got {value!r} of type {type(value).__name__}')
    value = float(value)
    if math.isnan(value) or not 0. < value <= 1.:
        raise ValueError(f'{name} must be in (0, 1], got {value!r}')
    return value


def check_keep_rate(keep_rate: KeepRate, num_reorg_layers: int) -> Tuple[float, ...]:
    """One keep rate per reorganising block, from a single rate or a per-block sequence."""
    if isinstance(keep_rate, (list, tuple)):
        if len(keep_rate) != num_reorg_layers:
            raise ValueError(
                f'keep_rate has {len(keep_rate)} values but there are {num_reorg_layers} reorganising '
                f'blocks (reorg_layers); give one float in (0, 1] or exactly {num_reorg_layers}')
        return tuple(_check_one_rate(r, f'keep_rate[{i}]') for i, r in enumerate(keep_rate))
    return (_check_one_rate(keep_rate, 'keep_rate'),) * num_reorg_layers


def check_reorg_layers(reorg_layers: Sequence[int], depth: int) -> Tuple[int, ...]:
    """Zero-based block indices, strictly increasing, each in ``[0, depth)``."""
    if isinstance(reorg_layers, (str, bytes)) or not isinstance(reorg_layers, Sequence):
        raise TypeError(f'reorg_layers must be a sequence of block indices, got {reorg_layers!r}')
    for layer in reorg_layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f'reorg_layers must hold integer block indices, got {layer!r} in {reorg_layers!r}')
        if not 0 <= layer < depth:
            raise ValueError(f'reorg_layers entry {layer} is out of range: blocks are 0..{depth - 1}')
    layers = tuple(int(layer) for layer in reorg_layers)
    if any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f'reorg_layers must be strictly increasing without duplicates, got {layers}')
    return layers


def check_fuse_token(fuse_token) -> bool:
    if not isinstance(fuse_token, bool):
        raise TypeError(f'fuse_token must be True or False, got {fuse_token!r}')
    return fuse_token
