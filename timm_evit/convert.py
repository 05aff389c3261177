"""``apply``: EViT on a timm ViT you already have, converted in place (same parameters, same weights)."""
from typing import Optional, Sequence

import torch.nn as nn
from timm.layers import Attention
from timm.models import is_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from .evit_deit import VisionTransformerDistilledEViT, VisionTransformerEViT
from .evit_eva import EvaEViT
from .layers import EVA_ATTENTION_CLASSES, EViTBlock, EViTEvaBlock
from .mechanism import EViTBlocks, EViTMixin
from .options import APPLY_FUSION, EViTOptions, KeepRate

__all__ = ['apply', 'refusal', 'EVIT_CLASSES', 'EVIT_PREFIX']

# evit_<timm name>: the registered name of timm's architecture converted by apply (evit_timm.py)
EVIT_PREFIX = 'evit_'

# timm model class -> its EViT class (a subclass of it: isinstance checks, methods and pickling hold)
EVIT_CLASSES = {
    VisionTransformer: VisionTransformerEViT,
    VisionTransformerDistilled: VisionTransformerDistilledEViT,
    Eva: EvaEViT,
}

# timm model class -> (timm's block class it serves, that block with EViT's step, attention classes the step follows)
_BLOCK_STEPS = {
    VisionTransformer: (Block, EViTBlock, (Attention,)),
    VisionTransformerDistilled: (Block, EViTBlock, (Attention,)),
    Eva: (EvaBlock, EViTEvaBlock, EVA_ATTENTION_CLASSES),
}


def refusal(model: nn.Module) -> Optional[str]:
    """Why EViT cannot serve ``model``, or None."""
    if type(model) not in EVIT_CLASSES:
        supported = ', '.join(cls.__name__ for cls in EVIT_CLASSES)
        return f'{type(model).__name__} is not a supported timm class ({supported})'
    block_cls, evit_block_cls, attention_classes = _BLOCK_STEPS[type(model)]
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (block_cls, evit_block_cls):
            return f'block {i} is a {type(blk).__name__}, not timm\'s {block_cls.__name__} (pre-norm, attention then MLP)'
        if type(blk.attn) not in attention_classes:
            names = ' or '.join(cls.__name__ for cls in attention_classes)
            return f'block {i} has a {type(blk.attn).__name__}, not timm\'s {names}'
    return None


def name_the_evit_architecture(model: nn.Module) -> None:
    """``model.pretrained_cfg['architecture']`` made the name that builds the converted model,
    ``evit_<timm name>``, where that name is registered (else as it was): timm's ``save_for_hf`` writes
    it into config.json, and ``local-dir:`` / ``hf-hub:`` build that name with the saved model arguments
    (timm's own name would build the plain model, and refuse EViT's arguments)."""
    cfg = getattr(model, 'pretrained_cfg', None)
    architecture = (cfg or {}).get('architecture')
    if architecture and is_model(EVIT_PREFIX + architecture):
        model.pretrained_cfg = model.default_cfg = {**cfg, 'architecture': EVIT_PREFIX + architecture}


def apply(
        model: nn.Module,
        keep_rate: Optional[KeepRate] = EViTOptions.keep_rate,
        reorg_layers: Optional[Sequence[int]] = EViTOptions.reorg_layers,
        fuse_token: bool = EViTOptions.fuse_token,
        keep_rate_warmup_start: int = EViTOptions.keep_rate_warmup_start,
        keep_rate_warmup_steps: int = EViTOptions.keep_rate_warmup_steps,
        score: Optional[str] = EViTOptions.score,
        fusion: str = APPLY_FUSION,
) -> nn.Module:
    """Convert a timm ViT in place to EViT and return it.

    Parameters, buffers, state-dict keys and weights are untouched: at ``keep_rate=1.0`` the model
    computes what it did before. Its ``pretrained_cfg`` names ``evit_<timm name>`` (where registered)
    as the architecture, so that timm's ``save_for_hf`` / ``push_to_hf_hub`` folder loads back as EViT. Supported, with a class token or without one (SigLIP, PE, ``_gap_``
    models: docs/design.md, "What ranks the tokens"):

    - timm's ``VisionTransformer`` with ``Block`` blocks (register tokens, LayerScale, q/k norm,
      ``norm_pre``, ``no_embed_class``, ``dynamic_img_size`` included: DeiT, DeiT III, augreg ViT,
      CLIP image towers, DINOv2) -> ``VisionTransformerEViT``;
    - ``VisionTransformerDistilled`` (distilled DeiT) -> ``VisionTransformerDistilledEViT``;
    - ``Eva`` with pre-norm ``EvaBlock`` blocks (``EvaAttention`` fused or separate q/k/v, or
      ``AttentionRope``; rotary embedding ``cat``, ``dinov3``, ``mixed``, or none; SwiGLU, scale
      norms, LayerScale, registers: EVA-02, DINOv3, PE, RoPE ViTs) -> ``EvaEViT``. Each kept token
      keeps its patch's rotary position; the fused token gets no rotation.

    The prefix tokens (class, distillation, registers) are never dropped or fused. Refused, with
    a ValueError that says why: other block types (post-norm ``EvaBlockPostNorm``, ``ResPostBlock``,
    parallel blocks) or attention modules, other model classes, a score the model cannot serve.

    Args:
        model: the timm model (converted in place).
        keep_rate: as ``VisionTransformerEViT``: one float in (0, 1] or one per reorganising block
            (default 0.7).
        reorg_layers: reorganising blocks; default ``depth // 4, depth // 2, 3 * depth // 4``.
        fuse_token: fuse the inattentive tokens into one (True) or drop them (False).
        score: what ranks the tokens, ``'class'``, ``'mean'`` or ``'pool'``; None: the model's default.
        fusion: ``'size'`` (the default here: the fused token is the attention-weighted mean and keeps
            its size, measured better on weights trained without EViT) or ``'paper'`` (the paper's
            raw weighted sum, the default of the paper's names). docs/design.md, "A fused token
            that keeps its size".
        keep_rate_warmup_start, keep_rate_warmup_steps: fine-tuning: training steps at keep rate
            1.0, then steps of the half-cosine fall to ``keep_rate`` (as ``VisionTransformerEViT``).

    Raises:
        ValueError: naming what the model lacks (timm's block / attention type, what a score needs) or its class.
    """
    options = EViTOptions(keep_rate=keep_rate, reorg_layers=reorg_layers, fuse_token=fuse_token,
                          keep_rate_warmup_start=keep_rate_warmup_start, keep_rate_warmup_steps=keep_rate_warmup_steps,
                          score=score, fusion=fusion)
    if isinstance(model, EViTMixin):   # already EViT: set the new arguments
        model._init_evit(options)
        return model
    problem = refusal(model)
    if problem:
        raise ValueError(f'timm_evit.apply cannot convert this model: {problem}')
    timm_cls = type(model)
    block_cls, evit_block_cls, _ = _BLOCK_STEPS[timm_cls]
    blocks = list(model.blocks)
    container_cls = type(model.blocks)
    model.__class__ = EVIT_CLASSES[timm_cls]
    for blk in blocks:
        blk.__class__ = evit_block_cls
    if container_cls is nn.Sequential:   # (Eva's blocks are a ModuleList, which is not called)
        model.blocks.__class__ = EViTBlocks
    try:
        model._init_evit(options)   # checks everything before it changes anything
    except (TypeError, ValueError):
        model.__class__ = timm_cls   # as it was
        model.blocks.__class__ = container_cls
        for blk in blocks:
            blk.__class__ = block_cls
        raise
    name_the_evit_architecture(model)
    return model
