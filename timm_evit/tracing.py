"""The token state, a part of the block loop (docs/design.md, "One token state"): which patch each
token now present came from, which token now carries each patch (docs/design.md, "Traced
indices", for the two names), the patches each token stands for, and what every later attention
weighs each token by."""
from typing import Any, NamedTuple, Optional

import torch

from . import opaque
from .reorg import size_key_bias

__all__ = ['TokenTrace']


class TokenTrace(NamedTuple):
    """The state of the non-prefix tokens present at one point of the loop, each part only where
    asked for: ``token_patch_ids`` ``[B, n]``, ``patch_token_index`` ``[B, patches]``, ``log_sizes``
    ``[B, n]`` (the log of the patches each token stands for, float32: None until a reorganisation,
    while every token is one patch), and ``key_bias``, the log sizes as a key bias ``[B, 1, 1, P + n]``
    (float32) under size-aware fusion, built once per reorganisation for every later block (None:
    every token counts once)."""

    token_patch_ids: Optional[torch.Tensor]
    patch_token_index: Optional[torch.Tensor] = None
    log_sizes: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    num_patches: Any = 0            # patches entering the blocks (an int; a graph value under FX)
    num_prefix_tokens: int = 0
    with_sizes: bool = False
    size_aware: bool = False        # tokens weigh by size (size-aware fusion), not once each

    @classmethod
    def start(
            cls,
            x: torch.Tensor,
            num_prefix_tokens: int,
            with_ids: bool,
            with_patch_index: bool,
            with_sizes: bool,
            size_aware: bool,
    ) -> 'TokenTrace':
        """Before the blocks every patch is its own token: both indices are the identity."""
        num_patches = x.shape[1] - num_prefix_tokens
        identity = None
        if with_ids or with_patch_index:
            identity = torch.arange(num_patches, device=x.device).expand(x.shape[0], -1)
        return cls(identity if with_ids else None, identity if with_patch_index else None, num_patches=num_patches,
                   num_prefix_tokens=num_prefix_tokens, with_sizes=with_sizes, size_aware=size_aware)

    def after(self, kept_idx: torch.Tensor, num_tokens: Any, fused: bool) -> 'TokenTrace':
        """The state after a block that kept ``kept_idx`` ``[B, num_keep]`` of its ``num_tokens``
        non-prefix tokens and, where ``fused``, made a fused slot after them."""
        patch_token_index = self.patch_token_index
        if patch_token_index is not None:
            patch_token_index = opaque.trace_patch_token_index(patch_token_index, kept_idx, num_tokens, fused)
        log_sizes = self.log_sizes
        if self.with_sizes:
            log_sizes = opaque.log_sizes_after(log_sizes, kept_idx, fused, self.num_patches)
        token_patch_ids = self.token_patch_ids
        if token_patch_ids is not None:
            token_patch_ids = opaque.trace_token_patch_ids(token_patch_ids, kept_idx, fused)
        key_bias = size_key_bias(log_sizes, self.num_prefix_tokens) if self.size_aware else None
        return self._replace(token_patch_ids=token_patch_ids, patch_token_index=patch_token_index,
                             log_sizes=log_sizes, key_bias=key_bias)

    def log_weights(self) -> Optional[torch.Tensor]:
        """The log of what every later attention, score and pooling weighs each non-prefix token by
        ``[B, n]`` (padded, it is ``key_bias``): its size under size-aware fusion; None: every token
        counts once (nothing to weigh)."""
        return self.log_sizes if self.size_aware else None

    def sizes(self) -> torch.Tensor:
        """The patches each token stands for ``[B, n]`` (float32): whole numbers, so the exponential
        of their logs is rounded back to them; ones where no token has been fused yet."""
        if self.log_sizes is not None:
            return self.log_sizes.exp().round()
        like = self.token_patch_ids if self.token_patch_ids is not None else self.patch_token_index
        return torch.ones(like.shape, device=like.device)
