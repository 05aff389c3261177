"""timm's Attention and Block, extended to read the class attention and reorganise tokens."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models._features_fx import register_notrace_module
from timm.models.vision_transformer import Block

from .reorg import class_attention, head_averaged_class_row, num_kept_tokens, reorganize_tokens

__all__ = ['EViTAttention', 'EViTBlock']


class EViTAttention(Attention):
    """timm ``Attention`` that can also return the head-averaged class attention ``[B, N - 1]``.

    ``forward`` is timm's own. ``forward_with_class_attention`` follows the same fused / unfused
    switch (``use_fused_attn``, ``TIMM_FUSED_ATTN``): the unfused path reads the class row of the
    attention it materialises anyway; the fused path computes only that row beside the kernel.
    """

    def forward_with_class_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn:
            cls_attn = class_attention(q, k, self.scale)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            cls_attn = head_averaged_class_row(attn)
            x = self.attn_drop(attn) @ v

        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, cls_attn


@register_notrace_module  # token counts depend on the input: a leaf for FX feature extraction
class EViTBlock(Block):
    """timm ``Block`` that reorganises its tokens between attention and MLP.

    Same parameters (and state-dict keys) as ``Block``. With nothing to drop (``keep_rate`` such
    that every token is kept) it runs ``Block.forward`` unchanged.
    """

    def __init__(self, *args, attn_layer=EViTAttention, **kwargs):
        if attn_layer not in (Attention, EViTAttention, '', 'attn'):
            raise ValueError(f'attn_layer must be timm Attention for EViT blocks, got {attn_layer!r}')
        super().__init__(*args, attn_layer=EViTAttention, **kwargs)

    def forward(
            self,
            x: torch.Tensor,
            keep_rate: float = 1.0,
            fuse_token: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the new tokens and the kept indices (``None`` when every token was kept)."""
        num_tokens = x.shape[1] - 1
        num_keep = num_kept_tokens(keep_rate, num_tokens)
        if num_keep >= num_tokens:
            return super().forward(x), None
        attn_out, cls_attn = self.attn.forward_with_class_attention(self.norm1(x))
        x = x + self.drop_path1(self.ls1(attn_out))
        x, kept_idx = reorganize_tokens(x, cls_attn, num_keep, fuse_token)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, kept_idx
