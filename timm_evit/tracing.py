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
    asked for: ``token_patch_ids`` ``[B, n]``, ``patch_token_index`` ``[B, patches]``, ``token_sizes``
    ``[B, n]`` (the patches each token stands for: None until a reorganisation, while every token
    is one patch), and ``key_bias``, the log of the token weights as a key bias ``[B, 1, 1, P + n]``
    (float32), built once per reorganisation for every later block (None: every token counts once)."""

    token_patch_ids: Optional[torch.Tensor]
    patch_token_index: Optional[torch.Tensor] = None
    token_sizes: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None  # the token weights key_bias is the log of (token_weights)
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
        token_sizes = self.token_sizes
        if self.with_sizes:
            token_sizes = opaque.sizes_after(token_sizes, kept_idx, fused, self.num_patches)
        token_patch_ids = self.token_patch_ids
        if token_patch_ids is not None:
            token_patch_ids = opaque.trace_token_patch_ids(token_patch_ids, kept_idx, fused)
        weights = token_sizes if self.size_aware else None
        key_bias = None if weights is None else size_key_bias(weights, self.num_prefix_tokens)
        return self._replace(token_patch_ids=token_patch_ids, patch_token_index=patch_token_index,
                             token_sizes=token_sizes, key_bias=key_bias, weights=weights)

    def token_weights(self) -> Optional[torch.Tensor]:
        """What every later attention, score and pooling weighs each non-prefix token by ``[B, n]``
        (its log is ``key_bias``): its size under size-aware fusion; None: every token counts once
        (nothing to weigh). Built once per reorganisation, with ``key_bias``, not once per block."""
        return self.weights

    def sizes_or_ones(self) -> torch.Tensor:
        """``token_sizes``, or ones where no token has been fused yet."""
        if self.token_sizes is not None:
            return self.token_sizes
        like = self.token_patch_ids if self.token_patch_ids is not None else self.patch_token_index
        return torch.ones(like.shape, device=like.device)
