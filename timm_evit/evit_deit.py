"""EViT on DeiT: timm's VisionTransformer with token reorganisation in chosen blocks.

`Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations`
(Liang et al., ICLR 2022) - https://arxiv.org/abs/2202.07800
"""
import os
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models import (
    build_model_with_cfg, checkpoint, generate_default_cfgs, get_pretrained_cfg, register_model, register_notrace_function,
)
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .checkpoints import ALLOWED_PICKLE_GLOBALS
from .layers import EViTBlock
from .options import KeepRate, check_fuse_token, check_keep_rate, check_reorg_layers
from .reorg import trace_patch_token_index, trace_token_patch_ids, tokens_to_patch_grid
from .schedule import warmup_keep_rate

__all__ = [
    'VisionTransformerEViT', 'VisionTransformerDistilledEViT', 'default_reorg_layers', 'HUB_NAMESPACE',
    'EVIT_DEIT_SMALL_TAGS', 'EVIT_RELEASE_PUBLISHED', 'release_weights_published',
]


def _keep_rate_step_on_load(module, state_dict, prefix, *args) -> None:
    # Weights without warm-up progress (timm's DeiT, a model trained without warm-up) load into a
    # model with warm-up at step 0; progress in a file is irrelevant to a model without warm-up.
    key = prefix + 'keep_rate_step'
    if getattr(module, 'has_keep_rate_warmup', False):
        state_dict.setdefault(key, torch.zeros((), dtype=torch.long))
    else:
        state_dict.pop(key, None)


# branches on the input: opaque to FX, in whichever module the calling forward lives (torch.fx.wrap)
@torch.fx.wrap
@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'x must be a torch.Tensor of images [B, {in_chans}, H, W], got {type(x).__name__}')
    if x.ndim != 4:
        raise ValueError(f'x must be a batch of images [B, {in_chans}, H, W] (4 dims), got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'x must have {in_chans} channels (in_chans), got shape {tuple(x.shape)}')


def default_reorg_layers(depth: int) -> Tuple[int, ...]:
    """The paper's relative places: blocks ``depth // 4, depth // 2, 3 * depth // 4`` (3, 6, 9 of 12)."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def check_evit_args(
        keep_rate: KeepRate,
        reorg_layers: Optional[Sequence[int]],
        fuse_token: bool,
        depth: int,
        keep_rate_warmup_start: int = 0,
        keep_rate_warmup_steps: int = 0,
) -> Tuple[Tuple[int, ...], bool, Tuple[float, ...]]:
    """The EViT arguments checked: ``(reorg_layers, fuse_token, keep rate per reorganising block)``."""
    for name, value in (('keep_rate_warmup_start', keep_rate_warmup_start),
                        ('keep_rate_warmup_steps', keep_rate_warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f'{name} must be an integer >= 0 (optimizer steps), got {value!r}')
    layers = default_reorg_layers(depth) if reorg_layers is None else check_reorg_layers(reorg_layers, depth)
    return layers, check_fuse_token(fuse_token), check_keep_rate(keep_rate, len(layers))


@torch.fx.wrap  # checks the masks against this call's keep rates: opaque to FX
@register_notrace_function
def check_attention_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, block_keep_rates: Sequence[float]) -> None:
    if (attn_mask is not None or is_causal) and min(block_keep_rates, default=1.0) < 1.0:
        # A mask is laid out for the tokens entering the blocks; reorganised tokens have no place in it.
        raise ValueError('attn_mask / is_causal need keep_rate=1.0: EViT changes the number and order of '
                         'tokens, so a mask for the input tokens does not fit the blocks after a reorganisation')


class VisionTransformerEViT(VisionTransformer):
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
            float for all or one per block of ``reorg_layers``. Changeable after creation with
            ``set_keep_rate`` or per call with ``forward(x, keep_rate=...)``.
        reorg_layers: zero-based indices of the reorganising blocks, strictly increasing; default
            the paper's relative places ``depth // 4, depth // 2, 3 * depth // 4`` (3, 6, 9 of 12).
        fuse_token: fuse the inattentive tokens into one (True) or drop them (False).
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
            keep_rate: KeepRate = 0.7,
            reorg_layers: Optional[Sequence[int]] = None,
            fuse_token: bool = True,
            keep_rate_warmup_start: int = 0,
            keep_rate_warmup_steps: int = 0,
            **kwargs,
    ) -> None:
        if not kwargs.get('class_token', True):
            raise ValueError('EViT needs a class token (class_token=True): selection reads its attention')
        if 'block_fn' in kwargs:
            raise ValueError('block_fn is set by EViT (EViTBlock, timm\'s Block that can reorganise)')
        # checked before the (costly) construction, again in _init_evit
        check_evit_args(keep_rate, reorg_layers, fuse_token, kwargs.get('depth', 12),
                        keep_rate_warmup_start, keep_rate_warmup_steps)
        super().__init__(block_fn=EViTBlock, **kwargs)
        self._init_evit(keep_rate, reorg_layers, fuse_token, keep_rate_warmup_start, keep_rate_warmup_steps)

    def _init_evit(
            self,
            keep_rate: KeepRate,
            reorg_layers: Optional[Sequence[int]],
            fuse_token: bool,
            keep_rate_warmup_start: int = 0,
            keep_rate_warmup_steps: int = 0,
    ) -> None:
        """EViT's state on a built model whose blocks are EViTBlocks (from __init__, or from ``apply``)."""
        reorg_layers, fuse_token, rates = check_evit_args(
            keep_rate, reorg_layers, fuse_token, len(self.blocks), keep_rate_warmup_start, keep_rate_warmup_steps)
        for blk in self.blocks:
            blk.num_prefix_tokens = self.num_prefix_tokens
            blk.keep_rate = 1.0
        self.reorg_layers = reorg_layers
        self.fuse_token = fuse_token
        self.set_keep_rate(rates)
        self.keep_rate_warmup_start = keep_rate_warmup_start
        self.keep_rate_warmup_steps = keep_rate_warmup_steps
        if self.has_keep_rate_warmup:
            # Training progress of the warm-up, saved with the weights so that --resume continues it.
            self.register_buffer('keep_rate_step', torch.zeros((), dtype=torch.long, device=self.cls_token.device))
        self.register_load_state_dict_pre_hook(_keep_rate_step_on_load)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say what to use instead of failing deep in its compiler.
        raise RuntimeError(
            f'{type(self).__name__} does not support TorchScript (torch.jit.script is deprecated in torch 2.x '
            'and cannot follow the data-dependent token counts of EViT); to deploy, use torch.export.export(model, '
            '(images,)) or export to ONNX (torch.onnx.export(model, (images,), dynamo=True))')

    @property
    def keep_rate(self) -> Tuple[float, ...]:
        """Keep rate of each reorganising block (held by the blocks themselves)."""
        return tuple(self.blocks[layer].keep_rate for layer in self.reorg_layers)

    @keep_rate.setter
    def keep_rate(self, keep_rate: KeepRate) -> None:
        self.set_keep_rate(keep_rate)

    @property
    def fuse_token(self) -> bool:
        return self._fuse_token

    @fuse_token.setter
    def fuse_token(self, fuse_token: bool) -> None:
        self._fuse_token = check_fuse_token(fuse_token)
        for blk in self.blocks:
            blk.fuse_token = self._fuse_token

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

    def set_keep_rate(self, keep_rate: KeepRate) -> None:
        """Change the keep rate (one float, or one per reorganising block); no retraining needed."""
        rates = check_keep_rate(keep_rate, len(self.reorg_layers))
        for layer, rate in zip(self.reorg_layers, rates):
            self.blocks[layer].keep_rate = rate

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        # timm before 1.0.31 builds the new heads on the default device and dtype: put them beside the weights
        for name in ('head', 'head_dist'):
            head = getattr(self, name, None)
            if isinstance(head, nn.Module):
                head.to(device=self.cls_token.device, dtype=self.cls_token.dtype)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning; ``reorg_layers`` (and their keep rates) keep only the blocks that remain."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.reorg_layers = tuple(layer for layer in self.reorg_layers if layer < len(self.blocks))
        return take_indices

    def _block_keep_rates(self, keep_rate: Optional[KeepRate]) -> List[float]:
        """This call's keep rate for every block (1.0: the block keeps all its tokens)."""
        if isinstance(keep_rate, torch.fx.Proxy):
            # FX tracing (timm feature extraction) turns every forward argument into a Proxy;
            # a traced graph keeps the model's keep rate, fixed at tracing time.
            keep_rate = None
        if keep_rate is not None:
            rates = check_keep_rate(keep_rate, len(self.reorg_layers))
        elif self.training and self.has_keep_rate_warmup:
            rates = self.scheduled_keep_rate()
        else:  # evaluation always uses the target keep rate
            rates = self.keep_rate
        if self.training and self.has_keep_rate_warmup and torch.is_grad_enabled():
            step = self._warmup_step()
            self.keep_rate_step.add_(1)  # one training forward = one optimizer step
            self._known_step = (self.keep_rate_step, self.keep_rate_step._version, step + 1)
        per_block = [blk.keep_rate for blk in self.blocks]
        for layer, rate in zip(self.reorg_layers, rates):
            per_block[layer] = rate
        return per_block

    def _run_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            keep_rate: float,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Runs one block through its ``__call__`` (hooks see it); returns the tokens and the kept
        indices, or None where the block keeps every token at this rate."""
        kept_indices = [] if keep_rate < 1.0 else None
        kwargs = dict(keep_rate=keep_rate, kept_indices=kept_indices)
        if keep_rate >= 1.0 and (attn_mask is not None or is_causal):
            # (check_attention_mask has made sure that no mask meets a reorganising block; under
            # FX tracing both are placeholders, passed on to the plain blocks as timm does)
            kwargs.update(attn_mask=attn_mask, is_causal=is_causal)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # keyword arguments bound first: reentrant checkpointing (timm's set_reentrant_ckpt) takes none
            x = checkpoint(partial(blk, **kwargs), x)
        else:
            x = blk(x, **kwargs)
        return x, (kept_indices[0] if kept_indices else None)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _forward_blocks(
            self,
            x: torch.Tensor,
            keep_rate: Optional[KeepRate],
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            track_token_ids: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Runs the blocks; with ``track_token_ids`` also returns which patch each remaining
        non-class token came from (-1: a fused token), ``[B, n]``."""
        rates = self._block_keep_rates(keep_rate)
        check_attention_mask(attn_mask, is_causal, rates)
        token_patch_ids = None
        if track_token_ids:
            num_tokens = x.shape[1] - self.num_prefix_tokens
            token_patch_ids = torch.arange(num_tokens, device=x.device).expand(x.shape[0], -1)
        for blk, rate in zip(self.blocks, rates):
            x, kept_idx = self._run_block(blk, x, rate, attn_mask, is_causal)
            if token_patch_ids is not None and kept_idx is not None:
                token_patch_ids = trace_token_patch_ids(token_patch_ids, kept_idx, self.fuse_token)
        return x, token_patch_ids

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
    ) -> torch.Tensor:
        """Tokens after the final norm: ``[B, 1 + remaining tokens, C]``. ``attn_mask`` /
        ``is_causal`` go to every block's attention as in timm, with ``keep_rate`` 1.0 only."""
        x, _ = self._forward_blocks(self._embed(x), keep_rate, attn_mask, is_causal)
        return self.norm(x)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
    ) -> torch.Tensor:
        """Logits; ``keep_rate`` overrides the model's keep rate for this call only."""
        x = self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal, keep_rate=keep_rate)
        return self.forward_head(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates``, with tokens traced back to their patches.

        ``NCHW`` keeps timm's shapes: each patch shows the token that carries it (its own if
        kept, the fused token it went into, zeros if dropped without fusion). ``NLC`` gives the
        raw non-class tokens, fewer after each reorganisation. With ``output_dict=True`` the
        result also holds, per intermediate, ``token_patch_ids`` ``[B, n]`` (the patch each token
        came from, -1 for a fused token) and ``patch_token_index`` ``[B, H*W]`` (the token now
        carrying each patch, -1 if dropped).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        check_image_batch(x, self.in_chans)
        B, _, height, width = x.shape
        x = self._embed(x)
        grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
        num_patches = grid_h * grid_w
        patch_ids = torch.arange(num_patches, device=x.device).expand(B, -1)
        token_patch_ids, patch_token_index = patch_ids, patch_ids

        intermediates, prefix_tokens, token_ids_out, patch_index_out = [], [], [], []
        rates = self._block_keep_rates(keep_rate)
        check_attention_mask(attn_mask, is_causal, rates)
        last = max_index if stop_early else len(self.blocks) - 1
        for i in range(last + 1):
            num_tokens = x.shape[1] - self.num_prefix_tokens
            x, kept_idx = self._run_block(self.blocks[i], x, rates[i], attn_mask, is_causal)
            if kept_idx is not None:
                token_patch_ids = trace_token_patch_ids(token_patch_ids, kept_idx, self.fuse_token)
                patch_token_index = trace_patch_token_index(patch_token_index, kept_idx, num_tokens, self.fuse_token)
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix_tokens.append(y[:, :self.num_prefix_tokens])
                tokens = y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    tokens = tokens_to_patch_grid(tokens, patch_token_index)
                    tokens = tokens.reshape(B, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(tokens)
                token_ids_out.append(token_patch_ids)
                patch_index_out.append(patch_token_index)

        if output_dict:
            result = {
                'image_intermediates': intermediates,
                'token_patch_ids': token_ids_out,
                'patch_token_index': patch_index_out,
            }
            if return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = self.norm(x)
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


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


# Hugging Face Hub namespace of this project's converted checkpoints (weights/ publishes them).
DEFAULT_HUB_NAMESPACE = 'timm-evit'
HUB_NAMESPACE = os.environ.get('TIMM_EVIT_HUB_NAMESPACE', DEFAULT_HUB_NAMESPACE)

# The switch that makes the keep*_in1k tags live: set it once weights/hub.py has published the
# repositories under DEFAULT_HUB_NAMESPACE. Until then `pretrained=True` on such a tag fails at
# once and says how to load the official file. A namespace of your own (TIMM_EVIT_HUB_NAMESPACE)
# is where you published your own conversions: its tags are live.
EVIT_RELEASE_PUBLISHED = False

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


def release_weights_published() -> bool:
    """Whether the keep*_in1k repositories exist where their tags point (see EVIT_RELEASE_PUBLISHED)."""
    return EVIT_RELEASE_PUBLISHED or HUB_NAMESPACE != DEFAULT_HUB_NAMESPACE


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
    model_args.update(EVIT_DEIT_SMALL_TAGS.get(_requested_tag(kwargs.get('pretrained_cfg')), {}))
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
