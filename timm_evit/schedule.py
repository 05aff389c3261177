"""Keep-rate warm-up for training from scratch (EViT paper): keep every token for the first steps,
then lower the keep rate to its target along a half cosine."""
import math

__all__ = ['warmup_keep_rate']


def warmup_keep_rate(step: int, target: float, start: int, steps: int) -> float:
    """Keep rate at optimizer step ``step`` (0-based).

    1.0 before ``start``; then ``target + (1 - target) * (1 + cos(pi * (step - start) / steps)) / 2``
    for ``steps`` steps; ``target`` from ``start + steps`` on (and always when ``steps == 0``).
    """
    if step < start:
        return 1.0
    if steps == 0 or step >= start + steps:
        return target
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * (step - start) / steps))
