"""Token tracing, a part of the block loop: which patch each token now present came from, and which
token now carries each patch (docs/design.md, "Traced indices", for the two names)."""
from typing import NamedTuple, Optional

import torch

from . import opaque

__all__ = ['TokenTrace', 'token_weights_from_sizes']


def token_weights_from_sizes(token_sizes: torch.Tensor, size_aware: bool) -> torch.Tensor:
    """Token weights from sizes (the patches each token stands for, 0: padding): the sizes
    themselves under size-aware fusion; else every token once, padding never."""
    return token_sizes if size_aware else (token_sizes > 0).to(token_sizes.dtype)


class TokenTrace(NamedTuple):
    """``token_patch_ids`` ``[B, n]`` and, where asked for, ``patch_token_index`` ``[B, patches]``
    and ``token_sizes`` ``[B, n]`` (the patches each token stands for: None until a reorganisation,
    while every token is one patch; 0: padding, docs/design.md, "Per-image token budgets"), for the
    non-prefix tokens present at one point of the loop."""

    token_patch_ids: torch.Tensor
    patch_token_index: Optional[torch.Tensor] = None
    token_sizes: Optional[torch.Tensor] = None
    with_sizes: bool = False
    padded: bool = False   # images may hold padding (per-image budgets in a batch)

    @classmethod
    def start(cls, x: torch.Tensor, num_prefix_tokens: int, with_patch_index: bool, with_sizes: bool) -> 'TokenTrace':
        """Before the blocks every patch is its own token: both indices are the identity."""
        num_patches = x.shape[1] - num_prefix_tokens
        identity = torch.arange(num_patches, device=x.device).expand(x.shape[0], -1)
        return cls(identity, identity if with_patch_index else None, None, with_sizes)

    def after(self, kept_idx: torch.Tensor, fused: bool, may_pad: bool = False) -> 'TokenTrace':
        """The trace after a block that kept ``kept_idx`` ``[B, num_keep]`` of the tokens before it
        (-1: a padding slot) and, where ``fused``, made a fused slot after them; ``may_pad``: the
        block gave its images their own counts in a batch."""
        num_tokens = self.token_patch_ids.shape[1]
        patch_token_index = self.patch_token_index
        if patch_token_index is not None:
            patch_token_index = opaque.trace_patch_token_index(patch_token_index, kept_idx, num_tokens, fused)
        token_sizes = self.token_sizes
        if self.with_sizes:
            token_sizes = opaque.sizes_after(token_sizes, kept_idx, num_tokens, fused)
        token_patch_ids = opaque.trace_token_patch_ids(self.token_patch_ids, kept_idx, fused)
        return TokenTrace(token_patch_ids, patch_token_index, token_sizes, self.with_sizes, self.padded or may_pad)

    def token_weights(self, size_aware: bool) -> Optional[torch.Tensor]:
        """What every later attention, score and pooling weighs each non-prefix token by ``[B, n]``
        (``reorg.size_key_bias``; docs/design.md, "One token state"): its size under size-aware
        fusion, else 1, and 0 for padding where an image may hold padding; None: every token counts
        once (nothing to weigh)."""
        if self.token_sizes is None or not (size_aware or self.padded):
            return None
        return token_weights_from_sizes(self.token_sizes, size_aware)

    def sizes_or_ones(self) -> torch.Tensor:
        """``token_sizes``, or ones where no token has been fused yet."""
        if self.token_sizes is not None:
            return self.token_sizes
        return torch.ones(self.token_patch_ids.shape, device=self.token_patch_ids.device)
