"""Keep-rate warm-up for training from scratch (EViT paper): keep every token for the first steps,
then lower the keep rate to its target along a half cosine."""
import math
from typing import Tuple

import torch

__all__ = ['warmup_keep_rate', 'KeepRateWarmup']


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


class KeepRateWarmup:
    """The keep-rate warm-up of an EViT model, a part of ``EViTMixin``: its two settings, its step
    (a buffer ``keep_rate_step`` in the state dict), the keep rates it gives at that step, and the
    explicit ``_advance_warmup`` that each training forward calls once.

    The step lives in the state dict because timm's ``resume_checkpoint`` restores a model through
    its state dict alone: that is where ``--resume`` finds it.
    """

    def _init_warmup(self, start: int, steps: int, device: torch.device) -> None:
        self.keep_rate_warmup_start = start
        self.keep_rate_warmup_steps = steps
        if self.has_keep_rate_warmup:
            # a new warm-up starts at step 0; a buffer, not a parameter
            self.register_buffer('keep_rate_step', torch.zeros((), dtype=torch.long, device=device))
        else:
            # no warm-up, no progress: the state dict holds only what the model uses, so it loads back
            self._buffers.pop('keep_rate_step', None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Weights without warm-up progress (timm's model, a model trained without warm-up) load
        # into a model with warm-up at step 0; progress in a file is irrelevant to a model without.
        key = prefix + 'keep_rate_step'
        if self.has_keep_rate_warmup:
            state_dict.setdefault(key, torch.zeros((), dtype=torch.long))
        else:
            state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_keep_rate_warmup(self) -> bool:
        return self.keep_rate_warmup_start > 0 or self.keep_rate_warmup_steps > 0

    def scheduled_keep_rate(self) -> Tuple[float, ...]:
        """Keep rates the next training forward uses: the warm-up's at its current step, else the target."""
        if not self.has_keep_rate_warmup:
            return self.keep_rate
        step = self._warmup_step()
        return tuple(warmup_keep_rate(step, r, self.keep_rate_warmup_start, self.keep_rate_warmup_steps)
                     for r in self.keep_rate)

    def _warmup_step(self) -> int:
        """The warm-up's step. A host read of a CUDA buffer waits for the GPU, so the value the
        last training forward wrote is remembered, and the buffer is read again only when something
        else has written it since (a load, ``.to()``, a user): its version counter tells."""
        buf = self.keep_rate_step
        known = self.__dict__.get('_known_step')
        if known is None or known[0] is not buf or known[1] != buf._version:
            known = (buf, buf._version, int(buf))
            self._known_step = known
        return known[2]

    def _advance_warmup(self) -> None:
        """One training forward with gradients is one optimizer step: the warm-up moves on."""
        if self.training and self.has_keep_rate_warmup and torch.is_grad_enabled():
            step = self._warmup_step()
            self.keep_rate_step.add_(1)
            self._known_step = (self.keep_rate_step, self.keep_rate_step._version, step + 1)
