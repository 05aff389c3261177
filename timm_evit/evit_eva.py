"""EViT on timm's ``Eva`` (EVA-02, DINOv3, PE, RoPE ViTs): the shared mechanism over ``EvaBlock``.

Every kept token keeps the rotary position of the patch it came from and a fused token, like a
prefix token, gets no rotation (docs/design.md, "EViT on any timm ViT"); the block loop gathers those
rows (``EViTMixin``), ``EViTEvaBlock`` passes them to its attention.
"""
from typing import Optional, Sequence, Tuple

import torch
from timm.models.eva import Eva

from .layers import EViTEvaBlock
from .mechanism import EViTMixin
from .options import EViTOptions, KeepRate, resolve_score

__all__ = ['EvaEViT']

class EvaEViT(EViTMixin, Eva):
    """timm's ``Eva`` with EViT token reorganisation (``VisionTransformerEViT``'s API and behaviour).

    The class token's head-averaged attention ranks the non-prefix tokens in each block of
    ``reorg_layers``; ``ceil(keep_rate * n)`` are kept, the rest dropped or fused into one
    (``fuse_token``). Prefix tokens (class, registers) are never dropped or fused and keep no
    rotation; each kept token keeps its patch's rotary rows (``cat``, ``dinov3``, ``mixed`` with its
    per-block rows, patch dropout's per-image rows), the fused token gets the identity rotation.
    Pooling (``avg``, ``token``, ``map``) and the head see the tokens that remain.

    Usually made by ``timm_evit.apply(eva_model)``; built directly, it takes the EViT arguments
    of ``VisionTransformerEViT`` and timm's ``Eva`` arguments (pre-norm blocks and a class token).
    """

    def __init__(
            self,
            keep_rate: Optional[KeepRate] = EViTOptions.keep_rate,
            reorg_layers: Optional[Sequence[int]] = EViTOptions.reorg_layers,
            fuse_token: bool = EViTOptions.fuse_token,
            keep_rate_warmup_start: int = EViTOptions.keep_rate_warmup_start,
            keep_rate_warmup_steps: int = EViTOptions.keep_rate_warmup_steps,
            score: Optional[str] = EViTOptions.score,
            fusion: str = EViTOptions.fusion,
            **kwargs,
    ) -> None:
        if kwargs.get('use_post_norm', False):
            raise ValueError('use_post_norm=True is not supported: EViT serves pre-norm EvaBlocks')
        options = EViTOptions(keep_rate=keep_rate, reorg_layers=reorg_layers,
                              fuse_token=fuse_token, keep_rate_warmup_start=keep_rate_warmup_start,
                              keep_rate_warmup_steps=keep_rate_warmup_steps, score=score, fusion=fusion)
        options.checked(kwargs.get('depth', 12))
        resolve_score(options.score, kwargs.get('class_token', True), kwargs.get('global_pool') == 'map')
        super().__init__(**kwargs)
        for blk in self.blocks:
            blk.__class__ = EViTEvaBlock   # same module, EViT's step between attention and MLP
        self._init_evit(options)

    def _embed_with_rope(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        x, rot_pos_embed = self._pos_embed(x)   # timm's: absolute position, prefix tokens, patch dropout
        return self.norm_pre(x), rot_pos_embed
