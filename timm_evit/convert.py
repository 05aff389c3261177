"""``apply``: EViT on a timm ViT you already have, converted in place (same parameters, same weights)."""
from typing import Optional, Sequence

import torch.nn as nn
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from .evit_deit import VisionTransformerDistilledEViT, VisionTransformerEViT
from .layers import EViTBlock
from .options import KeepRate

__all__ = ['apply', 'refusal', 'EVIT_CLASSES']

# timm model class -> its EViT class (a subclass of it: isinstance checks, methods and pickling hold)
EVIT_CLASSES = {
    VisionTransformer: VisionTransformerEViT,
    VisionTransformerDistilled: VisionTransformerDistilledEViT,
}


def refusal(model: nn.Module) -> Optional[str]:
    """Why EViT cannot serve ``model``, or None."""
    if type(model) not in EVIT_CLASSES:
        supported = ', '.join(cls.__name__ for cls in EVIT_CLASSES)
        return f'{type(model).__name__} is not a supported timm class ({supported})'
    if model.cls_token is None:
        return 'it has no class token (EViT selects tokens by the class token\'s attention)'
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, EViTBlock):
            return f'block {i} is a {type(blk).__name__}, not timm\'s Block (pre-norm, attention then MLP)'
        if type(blk.attn) is not Attention:
            return f'block {i} has a {type(blk.attn).__name__}, not timm\'s Attention'
    return None


def apply(
        model: nn.Module,
        keep_rate: KeepRate = 0.7,
        reorg_layers: Optional[Sequence[int]] = None,
        fuse_token: bool = True,
        keep_rate_warmup_start: int = 0,
        keep_rate_warmup_steps: int = 0,
) -> nn.Module:
    """Convert a timm ViT in place to EViT and return it.

    Parameters, buffers, state-dict keys and weights are untouched: at ``keep_rate=1.0`` the model
    computes what it did before. Supported: timm's ``VisionTransformer`` with ``Block`` blocks and
    a class token (register tokens, LayerScale, q/k norm, ``norm_pre``, ``no_embed_class``,
    ``dynamic_img_size`` included: DeiT, DeiT III, augreg ViT, CLIP image towers, DINOv2) and
    ``VisionTransformerDistilled`` (distilled DeiT). The prefix tokens (class, distillation,
    registers) are never dropped or fused.

    Args:
        model: the timm model (converted in place).
        keep_rate: as ``VisionTransformerEViT``: one float in (0, 1] or one per reorganising block.
        reorg_layers: reorganising blocks; default ``depth // 4, depth // 2, 3 * depth // 4``.
        fuse_token: fuse the inattentive tokens into one (True) or drop them (False).
        keep_rate_warmup_start, keep_rate_warmup_steps: fine-tuning: training steps at keep rate
            1.0, then steps of the half-cosine fall to ``keep_rate`` (as ``VisionTransformerEViT``).

    Raises:
        ValueError: naming what the model lacks (class token, timm's Block / Attention) or its class.
    """
    evit_args = (keep_rate, reorg_layers, fuse_token, keep_rate_warmup_start, keep_rate_warmup_steps)
    if isinstance(model, VisionTransformerEViT):   # already EViT: set the new arguments
        model._init_evit(*evit_args)
        return model
    problem = refusal(model)
    if problem:
        raise ValueError(f'timm_evit.apply cannot convert this model: {problem}')
    evit_cls = EVIT_CLASSES[type(model)]
    blocks = list(model.blocks)
    model.__class__ = evit_cls
    for blk in blocks:
        blk.__class__ = EViTBlock
    try:
        model._init_evit(*evit_args)
    except (TypeError, ValueError):
        model.__class__ = next(cls for cls, evit in EVIT_CLASSES.items() if evit is evit_cls)   # as it was
        for blk in blocks:
            blk.__class__ = Block
        raise
    return model
