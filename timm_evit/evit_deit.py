"""EViT on DeiT: timm's VisionTransformer with token reorganisation in chosen blocks.

`Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations`
(Liang et al., ICLR 2022) - https://arxiv.org/abs/2202.07800
"""
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .checkpoints import ALLOWED_PICKLE_GLOBALS
from .layers import EViTBlock
from .mechanism import EViTBlocks, EViTMixin, default_reorg_layers
from .options import EViTOptions, KeepRate, resolve_score
from .release import HUB_NAMESPACE, release_weights_published

__all__ = [
    'VisionTransformerEViT', 'VisionTransformerDistilledEViT', 'default_reorg_layers', 'EVIT_DEIT_SMALL_TAGS',
]


class VisionTransformerEViT(EViTMixin, VisionTransformer):
    """Vision Transformer with EViT token reorganisation.

    In each block of ``reorg_layers``, between attention and MLP, the tokens other than the prefix
    tokens (class, registers) are ranked by the class token's head-averaged attention; ``ceil(keep_rate * n)`` are kept (in
    descending order of attention) and, with ``fuse_token``, the others become one token
    weighted by their attention, appended last. No parameters are added: timm ViT / DeiT
    weights load unchanged, and ``keep_rate=1.0`` is the plain model.

    Every block is an ``EViTBlock`` (timm's ``Block``, returning a tensor); the reorganising ones
    hold their keep rate, so ``model.blocks(x)`` and forward hooks on a block behave as in timm.

    Args:
        keep_rate: fraction of non-class tokens kept per reorganising block, in (0, 1]; one
            float for all or one per block of ``reorg_layers``; default 0.7 (None). Changeable after
            creation with ``set_keep_rate`` or per call with ``forward(x, keep_rate=...)``.
        reorg_layers: zero-based indices of the reorganising blocks, strictly increasing; default
            the paper's relative places ``depth // 4, depth // 2, 3 * depth // 4`` (3, 6, 9 of 12).
        fuse_token: fuse the inattentive tokens into one (True) or drop them (False).
        score: what ranks the tokens, ``'class'``, ``'mean'`` or ``'pool'``; None: the model's default.
        fusion: ``'paper'`` (the paper's raw weighted sum, the default here) or ``'size'`` (the
            attention-weighted mean that keeps its size: docs/design.md, "A fused token that keeps
            its size").
        keep_rate_warmup_start: training from scratch: optimizer steps at keep rate 1.0 before
            the keep rate starts to fall (counted in training forward passes with gradients).
        keep_rate_warmup_steps: steps of the half-cosine fall from 1.0 to ``keep_rate``. With
            either set, the step count is a buffer in the state dict (resuming continues it);
            evaluation always uses ``keep_rate``.
        **kwargs: timm ``VisionTransformer`` arguments. A class token is required (selection
            reads its attention); register tokens, like it, are prefix tokens: never dropped or fused.
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
        if 'block_fn' in kwargs:
            raise ValueError('block_fn is set by EViT (EViTBlock, timm\'s Block that can reorganise)')
        # checked before the (costly) construction, again in _init_evit
        options = EViTOptions(keep_rate=keep_rate, reorg_layers=reorg_layers,
                              fuse_token=fuse_token, keep_rate_warmup_start=keep_rate_warmup_start,
                              keep_rate_warmup_steps=keep_rate_warmup_steps, score=score, fusion=fusion)
        options.checked(kwargs.get('depth', 12))
        resolve_score(options.score, kwargs.get('class_token', True), kwargs.get('global_pool') == 'map')
        super().__init__(block_fn=EViTBlock, **kwargs)
        self.blocks.__class__ = EViTBlocks   # same modules; its call carries the token state (model.blocks(x))
        self._init_evit(options)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm's embedding steps, as its own _embed (which timm 1.0.26 does not have yet)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)


def _deit_cfg(deit_name: str) -> Dict[str, Any]:
    # DeiT's own pretrained config (mean/std/crop/interpolation, licence, Hub repository):
    # the fb_in1k tags load timm's DeiT weights unchanged.
    cfg = get_pretrained_cfg(deit_name).to_dict()
    cfg.update(
        paper_ids='arXiv:2202.07800',
        paper_name='Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations',
        origin_url='https://github.com/youweiliang/evit',
        notes=(f'DeiT weights ({deit_name}) used with EViT at inference, without EViT fine-tuning.',),
    )
    for key in ('architecture', 'tag'):
        cfg.pop(key, None)
    return cfg


# The ten EViT-trained DeiT-S checkpoints of the official release: tag -> the model arguments
# they were trained with, applied when the tag is asked for (the caller's own arguments win).
EVIT_DEIT_SMALL_TAGS = {
    f'keep{round(rate * 100)}_{"fuse" if fuse else "drop"}_in1k': dict(keep_rate=rate, fuse_token=fuse)
    for fuse in (True, False) for rate in (0.9, 0.8, 0.7, 0.6, 0.5)
}


def _evit_release_cfg(tag: str) -> Dict[str, Any]:
    cfg = _deit_cfg('deit_small_patch16_224.fb_in1k')
    args = EVIT_DEIT_SMALL_TAGS[tag]
    cfg.update(
        url='', hf_hub_id=f'{HUB_NAMESPACE}/evit_deit_small.{tag}',
        notes=(f'EViT-trained DeiT-S (official release), keep_rate {args["keep_rate"]}, '
               f'fuse_token {args["fuse_token"]}; converted by weights/ in this repository.',),
    )
    return cfg


default_cfgs = generate_default_cfgs({
    'evit_deit_tiny.fb_in1k': _deit_cfg('deit_tiny_patch16_224.fb_in1k'),
    'evit_deit_small.fb_in1k': _deit_cfg('deit_small_patch16_224.fb_in1k'),
    'evit_deit_base.fb_in1k': _deit_cfg('deit_base_patch16_224.fb_in1k'),
    **{f'evit_deit_small.{tag}': _evit_release_cfg(tag) for tag in EVIT_DEIT_SMALL_TAGS},
})


def _requested_tag(pretrained_cfg) -> Optional[str]:
    """The tag timm's create_model passes on ('evit_deit_small.<tag>' arrives as pretrained_cfg='<tag>')."""
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get('tag')
    return getattr(pretrained_cfg, 'tag', None)


def _refuse_unpublished_release_tag(pretrained: bool, kwargs: Dict[str, Any]) -> None:
    # 'evit_deit_small.<tag>' reaches the entrypoint as pretrained_cfg='<tag>' (an hf-hub: name
    # brings the repository's own config, a dict, and loads from there).
    tag = kwargs.get('pretrained_cfg')
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    own_source = any(overlay.get(key) for key in ('file', 'state_dict', 'url', 'hf_hub_id'))
    if not pretrained or not isinstance(tag, str) or tag not in EVIT_DEIT_SMALL_TAGS or own_source:
        return
    if release_weights_published():
        return
    rate, fuse = EVIT_DEIT_SMALL_TAGS[tag]['keep_rate'], EVIT_DEIT_SMALL_TAGS[tag]['fuse_token']
    official = f'evit_deit_small_keep{rate}_{"fuse" if fuse else "drop"}.pth'
    raise RuntimeError(
        f"evit_deit_small.{tag}: these EViT-trained weights are not published on the Hugging Face Hub yet "
        f"({HUB_NAMESPACE}/evit_deit_small.{tag} does not exist). Download the official checkpoint "
        f"({official}, linked from the official EViT repository's README and timm-evit's weights/manifest.csv) "
        f"and load it with timm.create_model('evit_deit_small.{tag}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{official}'))")


def build_evit_model(model_cls, variant: str, pretrained: bool, pretrained_filter_fn, **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg`` for an EViT model class, as timm builds its ViTs (feature
    getter, out_indices). The official EViT and Token Labeling release files pickle the training
    script's argparse.Namespace beside the weights: that one harmless class is allowed in timm's
    weights_only loading."""
    out_indices = kwargs.pop('out_indices', 3)
    with torch.serialization.safe_globals(ALLOWED_PICKLE_GLOBALS):
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=pretrained_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )


def _create_evit_deit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerEViT:
    return build_evit_model(VisionTransformerEViT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def evit_deit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformerEViT:
    """EViT-DeiT-Ti (patch 16, 224 px); keep_rate 0.7 with fusion in blocks (3, 6, 9) by default."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_evit_deit('evit_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_small(pretrained: bool = False, **kwargs) -> VisionTransformerEViT:
    """EViT-DeiT-S (patch 16, 224 px); keep_rate 0.7 with fusion in blocks (3, 6, 9) by default."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    tag_args = dict(EVIT_DEIT_SMALL_TAGS.get(_requested_tag(kwargs.get('pretrained_cfg')), {}))
    model_args.update(tag_args)
    _refuse_unpublished_release_tag(pretrained, kwargs)
    return _create_evit_deit('evit_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_deit_base(pretrained: bool = False, **kwargs) -> VisionTransformerEViT:
    """EViT-DeiT-B (patch 16, 224 px); keep_rate 0.7 with fusion in blocks (3, 6, 9) by default."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_evit_deit('evit_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))


class VisionTransformerDistilledEViT(VisionTransformerEViT, VisionTransformerDistilled):
    """Distilled DeiT (timm's ``VisionTransformerDistilled``: class and distillation tokens, two
    heads) with EViT token reorganisation; both tokens are prefix tokens, never reorganised."""
