"""EViT on LV-ViT (Token Labeling, Jiang et al. 2021), which timm does not ship.

`All Tokens Matter: Token Labeling for Training Better Vision Transformers` - https://arxiv.org/abs/2104.10858
LV-ViT is a ViT with a 4-convolution patch embedding, residual branches scaled by 1 / skip_lam,
MLP ratio 3, no qkv bias, and an auxiliary head over the patch tokens. It reuses timm's
VisionTransformer, Block, Attention and Mlp, and the same token reorganisation as EViT-DeiT.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model

from .checkpoints import require_matching_keys, unwrap_state_dict
from .evit_deit import VisionTransformerEViT, build_evit_model
from .options import KeepRate
from .reorg import tokens_to_patch_grid

__all__ = ['LVViTPatchEmbed', 'ResidualScale', 'VisionTransformerEViTLVViT', 'checkpoint_filter_fn']


class LVViTPatchEmbed(PatchEmbed):
    """Token Labeling's 4-convolution patch embedding.

    Three convolutions (7x7 stride 2, 3x3, 3x3; each with BatchNorm and ReLU) then a projection
    of kernel and stride ``patch_size / 2``: the same grid as timm's ``PatchEmbed``, whose
    shape handling (grid size, dynamic sizes, flattening) it keeps.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, stem_chans=64, bias=True,
                 device=None, dtype=None, **kwargs):
        # timm's factory arguments, passed on only where given (timm releases before them have none)
        dd = {k: v for k, v in dict(device=device, dtype=dtype).items() if v is not None}
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs, **dd)
        if any(p % 2 for p in self.patch_size):
            raise ValueError(f'patch_size must be even for the LV-ViT stem (stride 2, then patch_size / 2), got {patch_size}')
        half = tuple(p // 2 for p in self.patch_size)
        self.proj = nn.Sequential(OrderedDict([
            ('conv1', nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False, **dd)),
            ('bn1', nn.BatchNorm2d(stem_chans, **dd)),
            ('act1', nn.ReLU(inplace=True)),
            ('conv2', nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False, **dd)),
            ('bn2', nn.BatchNorm2d(stem_chans, **dd)),
            ('act2', nn.ReLU(inplace=True)),
            ('conv3', nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False, **dd)),
            ('bn3', nn.BatchNorm2d(stem_chans, **dd)),
            ('act3', nn.ReLU(inplace=True)),
            ('proj', nn.Conv2d(stem_chans, embed_dim, kernel_size=half, stride=half, bias=bias, **dd)),
        ]))


class ResidualScale(nn.Module):
    """Divides a residual branch by ``skip_lam`` (LV-ViT); sits where timm's Block has LayerScale."""

    def __init__(self, skip_lam: float):
        super().__init__()
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam

    def extra_repr(self) -> str:
        return f'skip_lam={self.skip_lam}'


class VisionTransformerEViTLVViT(VisionTransformerEViT):
    """LV-ViT with EViT token reorganisation.

    Prediction (train and eval alike): ``head(class token) + 0.5 * max over patch tokens of
    aux_head(token)``, as Token Labeling's evaluation. With reorganisation the auxiliary head sees
    the tokens that remain, and fused tokens are left out of its max: they have no patch of their
    own. With ``dense_output=True`` (Token Labeling's dense-label training, opt-in), a training
    forward returns ``(cls_logits, aux_logits, bbox)`` instead: ``aux_logits`` ``[B, H*W, classes]``
    on the patch grid (each patch gets the logits of the token that carries it, zeros if dropped
    without fusion) and, with ``mix_token=True``, the MixToken box ``(y1, x1, y2, x2)`` in grid
    cells, already undone in ``aux_logits`` so that they line up with the unmixed per-patch
    targets; ``cls_logits`` is the class head alone.

    Args:
        skip_lam: residual branches are divided by it.
        dense_output: return dense outputs in training (see above).
        mix_token: MixToken augmentation in training (needs ``dense_output``).
        stem_chans: channels of the convolution stem.
        **kwargs: ``VisionTransformerEViT`` / timm ``VisionTransformer`` arguments.
    """

    def __init__(
            self,
            skip_lam: float = 2.0,
            dense_output: bool = False,
            mix_token: bool = False,
            stem_chans: int = 64,
            **kwargs,
    ) -> None:
        if not skip_lam > 0:
            raise ValueError(f'skip_lam must be > 0, got {skip_lam!r}')
        if mix_token and not dense_output:
            raise ValueError('mix_token=True needs dense_output=True (MixToken trains the dense auxiliary head)')
        if dense_output and kwargs.get('patch_drop_rate', 0.) > 0:
            raise ValueError('dense_output=True needs patch_drop_rate=0: dense outputs cover every patch of the grid')
        kwargs.setdefault('embed_layer', partial(LVViTPatchEmbed, stem_chans=stem_chans))
        kwargs.setdefault('norm_layer', partial(nn.LayerNorm, eps=1e-5))
        kwargs.setdefault('qkv_bias', False)
        kwargs.setdefault('mlp_ratio', 3.)
        super().__init__(**kwargs)
        for blk in self.blocks:
            blk.ls1, blk.ls2 = ResidualScale(skip_lam), ResidualScale(skip_lam)
        self.skip_lam = skip_lam
        self.dense_output = dense_output
        self.mix_token = mix_token
        self.aux_head = self._new_aux_head(self.num_classes)

    def _new_aux_head(self, num_classes: int) -> nn.Module:
        # on the model's device and dtype (create_model(device='meta', dtype=...) included)
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        return nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = self._new_aux_head(num_classes)
        self.aux_head.train(self.training)

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
            token_patch_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``head(cls) + 0.5 * max aux_head(patch tokens)``; ``pre_logits`` gives the class token's features.

        Fused tokens are left out of the max: ``token_patch_ids`` (from
        ``forward_features(x, return_token_patch_ids=True)``) marks them (-1); without them, the
        ids of ``x`` where it is what ``forward_features`` returned; where neither is known and the
        model's budgets fuse, a ValueError says so.
        """
        if token_patch_ids is None:
            token_trace = self._token_state_for_head(x, pre_logits)
            token_patch_ids = None if token_trace is None else token_trace.token_patch_ids
        return self._head_with_ids(x, pre_logits, token_patch_ids)

    def _head_reads_token_state(self, pre_logits: bool) -> bool:
        aux_reads_ids = not pre_logits and self.num_classes > 0 and self.fuse_token and any(
            b.reorganises for b in self._budgets())
        return aux_reads_ids or super()._head_reads_token_state(pre_logits)

    def _head_with_ids(self, x: torch.Tensor, pre_logits: bool, token_patch_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if pre_logits or self.num_classes == 0:
            return super()._head(x, pre_logits, None)
        cls_logits = super()._head(x, False, None)
        aux = self.aux_head(x[:, self.num_prefix_tokens:])
        if token_patch_ids is not None:
            aux = aux.masked_fill((token_patch_ids < 0).unsqueeze(-1), float('-inf'))
        aux_max = aux.max(dim=1).values
        # Only fused tokens left (a keep rate so low that a kept token is itself fused): no patch votes.
        aux_max = torch.where(torch.isinf(aux_max), torch.zeros_like(aux_max), aux_max)
        return cls_logits + 0.5 * aux_max

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
            return_token_patch_ids: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Tokens after the final norm; with ``return_token_patch_ids`` also ``[B, n]`` patch ids
        (-1: fused). ``forward_head`` of exactly these tokens leaves out what it should."""
        x, token_trace = self._features(x, attn_mask, is_causal, keep_rate, trace=True)
        self._remember(x, token_trace)
        return (x, token_trace.token_patch_ids) if return_token_patch_ids else x

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
    ):
        if self.dense_output and self.training:
            if attn_mask is not None or is_causal:
                raise ValueError('attn_mask / is_causal are not supported with dense_output=True training')
            return self._forward_dense(x, keep_rate)
        x, token_trace = self._features(x, attn_mask, is_causal, keep_rate, trace=True)
        return self._head_with_ids(x, False, token_trace.token_patch_ids)

    def _forward_dense(self, x: torch.Tensor, keep_rate: Optional[KeepRate]):
        grid_h, grid_w = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        tokens, _, budgets = self._preamble(x, keep_rate)
        bbox = (0, 0, 0, 0)
        if self.mix_token:
            tokens, bbox = _mix_tokens(tokens, grid_h, grid_w)
        # every patch traced to the token that carries it, to put the aux logits back on the grid
        tokens, trace, _ = self._block_loop(tokens, budgets, trace_patches=True)
        tokens = self.norm(tokens)
        cls_logits = super()._head(tokens, False, None)
        aux = tokens_to_patch_grid(self.aux_head(tokens[:, self.num_prefix_tokens:]), trace.patch_token_index)
        if self.mix_token:
            aux = _unmix_grid(aux, bbox, grid_h, grid_w)
        return cls_logits, aux, bbox


def _mix_tokens(tokens: torch.Tensor, grid_h: int, grid_w: int):
    """MixToken: a random box of patch tokens comes from the batch flipped (area ratio ~ Beta(1, 1))."""
    lam = float(torch.distributions.Beta(1., 1.).sample())
    cut = (1. - lam) ** 0.5
    cut_h, cut_w = int(grid_h * cut), int(grid_w * cut)
    cy, cx = int(torch.randint(grid_h, ())), int(torch.randint(grid_w, ()))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, grid_h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, grid_w)
    patches = tokens[:, 1:].unflatten(1, (grid_h, grid_w))
    mixed = patches.clone()
    mixed[:, y1:y2, x1:x2] = patches.flip(0)[:, y1:y2, x1:x2]
    return torch.cat([tokens[:, :1], mixed.flatten(1, 2)], dim=1), (y1, x1, y2, x2)


def _unmix_grid(aux: torch.Tensor, bbox, grid_h: int, grid_w: int) -> torch.Tensor:
    y1, x1, y2, x2 = bbox
    grid = aux.unflatten(1, (grid_h, grid_w))
    out = grid.clone()
    out[:, y1:y2, x1:x2] = grid.flip(0)[:, y1:y2, x1:x2]
    return out.flatten(1, 2)


_STEM_KEYS = ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VisionTransformerEViTLVViT) -> Dict[str, torch.Tensor]:
    """Official Token Labeling checkpoint -> our state dict.

    Unwraps ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` nesting (EMA first, as
    timm's own loader), strips ``module.`` prefixes, maps the stem into ``patch_embed.proj`` (our
    own state dicts pass unchanged),
    resamples position embeddings to the model's grid, and fails with the names of any missing or
    unexpected keys.
    """
    out = {}
    for k, v in unwrap_state_dict(state_dict).items():
        # official layout -> ours; keys already in our layout (our own exports) pass unchanged
        if k.split('.')[:2] in [['patch_embed', name] for name in _STEM_KEYS]:
            k = 'patch_embed.proj.' + k[len('patch_embed.'):]
        elif k in ('patch_embed.proj.weight', 'patch_embed.proj.bias'):
            k = 'patch_embed.proj.proj.' + k.rsplit('.', 1)[1]
        if k == 'pos_embed' and v.shape != model.pos_embed.shape:
            v = resample_abs_pos_embed(v, new_size=model.patch_embed.grid_size, num_prefix_tokens=1, verbose=True)
        out[k] = v
    require_matching_keys(out, model)
    return out


def _cfg(url: str, **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj.conv1', 'classifier': ('head', 'aux_head'),
        'license': 'apache-2.0', 'origin_url': 'https://github.com/zihangJiang/TokenLabeling',
        'paper_ids': 'arXiv:2104.10858', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'evit_lvvit_s.tl_in1k': _cfg(
        'https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/lvvit_s-26M-224-83.3.pth.tar'),
    'evit_lvvit_m.tl_in1k': _cfg(
        'https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/lvvit_m-56M-224-84.0.pth.tar',
        crop_pct=1.0),
})


def _create_evit_lvvit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerEViTLVViT:
    return build_evit_model(VisionTransformerEViTLVViT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def evit_lvvit_s(pretrained: bool = False, **kwargs) -> VisionTransformerEViTLVViT:
    """EViT-LV-ViT-S: 16 blocks, dim 384, 6 heads; reorganising in blocks (4, 8, 12) by default."""
    model_args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, skip_lam=2., reorg_layers=(4, 8, 12))
    return _create_evit_lvvit('evit_lvvit_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_lvvit_m(pretrained: bool = False, **kwargs) -> VisionTransformerEViTLVViT:
    """EViT-LV-ViT-M: 20 blocks, dim 512, 8 heads; reorganising in blocks (5, 10, 15) by default."""
    model_args = dict(patch_size=16, embed_dim=512, depth=20, num_heads=8, skip_lam=2., reorg_layers=(5, 10, 15))
    return _create_evit_lvvit('evit_lvvit_m', pretrained=pretrained, **dict(model_args, **kwargs))
