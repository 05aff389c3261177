"""The EViT mechanism over a timm ViT, written once for every family (docs/design.md, "Layers and
file ownership"): keep rates held by the blocks, the one block loop (per-block keep rates, rotary
rows for the tokens that remain, tracing tokens to their patches), ``forward_intermediates``.

A family class is ``class XEViT(EViTMixin, TimmClass)``: it provides ``_embed_with_rope`` (the
tokens entering the blocks and, for RoPE families, their rotary embedding) and blocks whose forward
takes ``keep_rate`` and ``kept_indices`` (``EViTBlock``, ``EViTEvaBlock``). Its parts: the warm-up
(``schedule.KeepRateWarmup``), token tracing (``tracing.TokenTrace``), the functions FX keeps whole
(``opaque``).
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import AttentionPoolLatent
from timm.models import checkpoint
from timm.models._features import feature_take_indices

from . import opaque
from .layers import PoolScore
from .options import (
    EViTOptions, KeepRate, check_fuse_token, check_fusion, check_keep_mass, check_keep_rate, default_reorg_layers,
    resolve_score,
)
from .reorg import size_key_bias, size_weighted_pool, tokens_to_patch_grid
from .schedule import KeepRateWarmup
from .tracing import TokenTrace

__all__ = ['EViTMixin', 'default_reorg_layers']


class EViTMixin(KeepRateWarmup):
    """EViT on a timm ViT class: put it first among the bases (``class XEViT(EViTMixin, TimmViT)``).

    Holds what every family shares: ``keep_rate`` (held by the reorganising blocks), ``fuse_token``,
    ``reorg_layers``, the keep-rate warm-up, ``set_keep_rate``, the block loop, ``forward_features``,
    ``forward``, ``forward_intermediates`` with tokens traced to their patches, pruning. The family
    class gives ``_embed_with_rope`` (default: ``_embed`` without RoPE) and blocks that reorganise.
    """

    def _init_evit(self, options: EViTOptions) -> None:
        """EViT's state on a built model whose blocks are EViTBlocks (from __init__, or from ``apply``)."""
        options = options.checked(len(self.blocks))
        for blk in self.blocks:
            blk.num_prefix_tokens = self.num_prefix_tokens
            blk.keep_rate = 1.0
        self.reorg_layers = options.reorg_layers
        self.fuse_token = options.fuse_token
        self.fusion = options.fusion
        self.score = options.score
        self.set_keep_rate(options.keep_rate)
        self._init_warmup(options.keep_rate_warmup_start, options.keep_rate_warmup_steps, self._place()['device'])
        self.set_keep_mass(options.keep_mass)

    def _place(self) -> Dict[str, Any]:
        """The device and dtype of the model's weights (a class token is not always there)."""
        weight = next(self.parameters())
        return dict(device=weight.device, dtype=weight.dtype)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say what to use instead of failing deep in its compiler.
        raise RuntimeError(
            f'{type(self).__name__} does not support TorchScript (torch.jit.script is deprecated in torch 2.x '
            'and cannot follow the data-dependent token counts of EViT); to deploy, use torch.export.export(model, '
            '(images,)) or export to ONNX (torch.onnx.export(model, (images,), dynamo=True))')

    @property
    def keep_rate(self) -> Optional[Tuple[float, ...]]:
        """Keep rate of each reorganising block (held by the blocks themselves); None while
        ``keep_mass`` sets each image's count instead."""
        if self.keep_mass is not None:
            return None
        return tuple(self.blocks[layer].keep_rate for layer in self.reorg_layers)

    @keep_rate.setter
    def keep_rate(self, keep_rate: KeepRate) -> None:
        self.set_keep_rate(keep_rate)

    @property
    def keep_mass(self) -> Optional[Tuple[float, ...]]:
        """Keep mass of each reorganising block (docs/design.md, "Per-image token budgets"); None:
        the keep rate fixes every image's count."""
        masses = tuple(self.blocks[layer].keep_mass for layer in self.reorg_layers)
        return masses if masses and masses[0] is not None else None

    @keep_mass.setter
    def keep_mass(self, keep_mass: Optional[KeepRate]) -> None:
        self.set_keep_mass(keep_mass)

    @property
    def score(self) -> str:
        """What ranks the tokens: ``'class'``, ``'mean'`` or ``'pool'`` (docs/design.md, "What ranks
        the tokens"). Settable; None sets the default (``options.resolve_score``)."""
        return self._score

    @score.setter
    def score(self, score: Optional[str]) -> None:
        pool = self._pool_for_score()
        self._score = resolve_score(score, self.cls_token is not None, pool is not None)
        norm = getattr(self, 'score_norm', self.norm)   # (see prune_intermediate_layers)
        pool_score = PoolScore(pool, norm, self.num_prefix_tokens) if self._score == 'pool' else None
        for blk in self.blocks:
            blk.score, blk.pool_score = self._score, pool_score

    def _pool_for_score(self) -> Optional[nn.Module]:
        # timm's attention pool, where the 'pool' score can use it (a pool with its own position
        # embedding is laid out for the tokens entering the blocks, not for the reorganised ones)
        pool = getattr(self, 'attn_pool', None)
        if pool is None:   # the head pruned for features: the pool kept for ranking (prune_intermediate_layers)
            pool = getattr(self, 'score_pool', None)
        if isinstance(pool, AttentionPoolLatent) and pool.pos_embed is None:
            return pool
        return None

    @property
    def fuse_token(self) -> bool:
        return self._fuse_token

    @fuse_token.setter
    def fuse_token(self, fuse_token: bool) -> None:
        self._fuse_token = check_fuse_token(fuse_token)
        for blk in self.blocks:
            blk.fuse_token = self._fuse_token

    @property
    def fusion(self) -> str:
        """How the inattentive tokens are fused: ``'paper'`` (the raw attention-weighted sum, one token
        from then on) or ``'size'`` (the attention-weighted mean, keeping its size: docs/design.md,
        "A fused token that keeps its size"). Without ``fuse_token`` every size is 1 and both are one."""
        return self._fusion

    @fusion.setter
    def fusion(self, fusion: str) -> None:
        fusion = check_fusion(fusion)
        pool = getattr(self, 'attn_pool', None)
        if fusion == 'size' and pool is not None and not isinstance(pool, AttentionPoolLatent):
            raise ValueError(f"fusion='size' weighs pooled tokens by size, which this model's {type(pool).__name__} "
                             "pool cannot: use fusion='paper'")
        self._fusion = fusion
        for blk in self.blocks:
            blk.fusion = fusion

    @property
    def _size_aware(self) -> bool:
        # tokens carry sizes into every later attention and the pooling
        return self.fusion == 'size' and self.fuse_token

    def set_keep_rate(self, keep_rate: KeepRate) -> None:
        """Change the keep rate (one float, or one per reorganising block); no retraining needed.
        It takes the place of a ``keep_mass``."""
        rates = check_keep_rate(keep_rate, len(self.reorg_layers))
        for layer, rate in zip(self.reorg_layers, rates):
            self.blocks[layer].keep_rate = rate
            self.blocks[layer].keep_mass = None

    def set_keep_mass(self, keep_mass: Optional[KeepRate]) -> None:
        """Give each image its own count (one float in (0, 1], or one per reorganising block: the
        share of its score the kept tokens hold); it takes the place of the keep rate, which the
        blocks keep at 1.0. None: back to a fixed keep rate, 1.0 until ``set_keep_rate``."""
        if keep_mass is not None and self.has_keep_rate_warmup:
            raise ValueError('keep_mass cannot be used with the keep-rate warm-up (keep_rate_warmup_start / '
                             'keep_rate_warmup_steps), which schedules keep_rate')
        masses = (None,) * len(self.reorg_layers) if keep_mass is None else check_keep_mass(
            keep_mass, len(self.reorg_layers))
        for layer, mass in zip(self.reorg_layers, masses):
            if mass is not None:
                self.blocks[layer].keep_rate = 1.0
            self.blocks[layer].keep_mass = mass

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        pruning = getattr(self, '_pruning_head', False)   # timm's pruning drops the head, not the ranking
        if self.score == 'pool' and not pruning and global_pool is not None and global_pool != 'map':
            raise ValueError(f"global_pool={global_pool!r} removes the attention pool that score='pool' ranks tokens "
                             "with: set model.score = 'mean' first")
        super().reset_classifier(num_classes, global_pool)
        # timm before 1.0.31 builds the new heads on the default device and dtype: put them beside the weights
        for name in ('head', 'head_dist'):
            head = getattr(self, name, None)
            if isinstance(head, nn.Module):
                head.to(**self._place())

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning; ``reorg_layers`` (and their keep rates) keep only the blocks that remain.

        A ``'pool'`` model's blocks rank with the attention pool and final norm that pruning takes
        out of the head (timm's feature extraction prunes the head): the blocks keep using them,
        and the model keeps them registered as ``score_pool`` / ``score_norm`` (moved and saved
        with it)."""
        pool, norm = self._pool_for_score(), self.norm
        self._pruning_head = True
        try:
            take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        finally:
            self._pruning_head = False
        if self.score == 'pool':
            if getattr(self, 'attn_pool', None) is not pool:
                self.score_pool = pool
            if self.norm is not norm:
                self.score_norm = norm
        self.reorg_layers = tuple(layer for layer in self.reorg_layers if layer < len(self.blocks))
        return take_indices

    def _budgets_for_call(
            self,
            keep_rate: Optional[KeepRate],
            keep_mass: Optional[KeepRate] = None,
    ) -> Tuple[List[float], List[Optional[float]]]:
        """This call's keep rate and keep mass for every block (rate 1.0 and no mass: the block keeps
        all its tokens): those given for the call (one of the two), else the model's."""
        # FX tracing (timm feature extraction) turns every forward argument into a Proxy;
        # a traced graph keeps the model's budgets, fixed at tracing time.
        keep_rate = None if isinstance(keep_rate, torch.fx.Proxy) else keep_rate
        keep_mass = None if isinstance(keep_mass, torch.fx.Proxy) else keep_mass
        num_layers = len(self.reorg_layers)
        if keep_rate is not None and keep_mass is not None:
            raise ValueError(f'give keep_rate or keep_mass, not both (got keep_rate={keep_rate!r}, '
                             f'keep_mass={keep_mass!r})')
        if keep_rate is not None:
            rates, masses = check_keep_rate(keep_rate, num_layers), (None,) * num_layers
        elif keep_mass is not None:
            rates, masses = (1.0,) * num_layers, check_keep_mass(keep_mass, num_layers)
        elif self.keep_mass is not None:
            rates, masses = (1.0,) * num_layers, self.keep_mass
        elif self.training and self.has_keep_rate_warmup:
            rates, masses = self.scheduled_keep_rate(), (None,) * num_layers
        else:  # evaluation always uses the target keep rate
            rates, masses = self.keep_rate, (None,) * num_layers
        per_block_rates = [blk.keep_rate for blk in self.blocks]
        per_block_masses = [None] * len(self.blocks)
        for layer, rate, mass in zip(self.reorg_layers, rates, masses):
            per_block_rates[layer], per_block_masses[layer] = rate, mass
        return per_block_rates, per_block_masses

    def _run_block(
            self,
            blk: nn.Module,
            x: torch.Tensor,
            keep_rate: float,
            keep_mass: Optional[float] = None,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            rope: Optional[torch.Tensor] = None,
            token_sizes: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Runs one block through its ``__call__`` (hooks see it); returns the tokens and the kept
        indices, or None where the block keeps every token at this rate (and has no ``keep_mass``).
        ``rope``: the rotary rows of the tokens entering it (RoPE families only); ``token_sizes``:
        the weights of its tokens (``TokenTrace.attention_weights``)."""
        reorganises = keep_rate < 1.0 or keep_mass is not None
        kept_indices = [] if reorganises else None
        budget = dict(keep_rate=keep_rate) if keep_mass is None else dict(keep_mass=keep_mass)
        kwargs = dict(budget, kept_indices=kept_indices)
        if rope is not None:
            kwargs.update(rope=rope)
        if token_sizes is not None:
            kwargs.update(token_sizes=token_sizes)
        if not reorganises and (attn_mask is not None or is_causal):
            # (check_attention_mask has made sure that no mask meets a reorganising block; under
            # FX tracing both are placeholders, passed on to the plain blocks as timm does)
            kwargs.update(attn_mask=attn_mask, is_causal=is_causal)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # keyword arguments bound first: reentrant checkpointing (timm's set_reentrant_ckpt) takes none
            x = checkpoint(partial(blk, **kwargs), x)
        else:
            x = blk(x, **kwargs)
        return x, (kept_indices[0] if kept_indices else None)

    def _embed_with_rope(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokens entering the blocks and their rotary position embedding (None: no RoPE)."""
        return self._embed(x), None

    def _entering_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        opaque.check_image_batch(x, self.in_chans)
        return self._embed_with_rope(x)

    def _block_loop(
            self,
            x: torch.Tensor,
            rates: Sequence[float],
            masses: Sequence[Optional[float]],
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            rope: Optional[torch.Tensor] = None,
            trace: bool = False,
            trace_patches: bool = False,
            take_indices: Sequence[int] = (),
            num_blocks: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Optional[TokenTrace], List[Tuple[torch.Tensor, TokenTrace]]]:
        """The one block loop: the first ``num_blocks`` blocks (default all) at their keep ``rates``
        or, where given, keep ``masses`` (per-image counts: the trace then carries every token's
        size, 0 for padding, and every later block gets the weights that hide the padding).

        With ``rope`` (timm's rotary embedding of the entering tokens; ``[depth, ...]`` where the model
        has one per block, ``rope_mixed``), each block gets the rows of the tokens that remain: every
        kept token its patch's rotation, a fused token none. With size-aware fusion each block gets
        the tokens' sizes. Returns the tokens, their ``TokenTrace`` (None unless ``trace``,
        ``trace_patches``, ``rope`` or size-aware fusion asked for one; its ``patch_token_index`` only
        with ``trace_patches`` or ``take_indices``, its sizes with those or size-aware fusion), and for
        each block in ``take_indices`` its tokens and trace.
        """
        opaque.check_attention_mask(attn_mask, is_causal, rates, masses)
        take_indices = list(take_indices)
        token_trace = None
        size_aware = self._size_aware
        adaptive = any(mass is not None for mass in masses)
        if trace or trace_patches or take_indices or rope is not None or size_aware or adaptive:
            token_trace = TokenTrace.start(x, self.num_prefix_tokens, trace_patches or bool(take_indices),
                                           with_sizes=size_aware or adaptive or bool(take_indices))
        # one image alone is never padded (under FX tracing the batch size is unknown: padded)
        batch = x.shape[0]
        alone = isinstance(batch, int) and batch == 1
        rope_per_block = rope is not None and getattr(self, 'rope_mixed', False)
        reorganised, block_rope, taken = False, rope, []
        for i in range(len(self.blocks) if num_blocks is None else num_blocks):
            if rope_per_block:
                block_rope = rope[i]
                if reorganised:
                    block_rope = opaque.rotary_rows_for_tokens(block_rope, token_trace.token_patch_ids)
            block_weights = None if token_trace is None else token_trace.attention_weights(size_aware)
            x, kept_idx = self._run_block(
                self.blocks[i], x, rates[i], masses[i], attn_mask, is_causal, block_rope, block_weights)
            if kept_idx is not None and token_trace is not None:
                fused = x.shape[1] - self.num_prefix_tokens > kept_idx.shape[1]   # the block appended a fused slot
                token_trace = token_trace.after(kept_idx, fused, may_pad=masses[i] is not None and not alone)
                # before any reorganisation, timm's own rope goes to the blocks (keep_rate 1.0 is timm's model)
                reorganised = True
                if rope is not None and not rope_per_block:
                    block_rope = opaque.rotary_rows_for_tokens(rope, token_trace.token_patch_ids)
            if i in take_indices:
                taken.append((x, token_trace))
        return x, token_trace, taken

    def _features_and_sizes(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
            keep_rate: Optional[KeepRate],
            keep_mass: Optional[KeepRate] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``forward_features`` and the weights the head pools the remaining non-prefix tokens with
        (``TokenTrace.attention_weights``; None: each once)."""
        x, rope = self._entering_tokens(x)
        rates, masses = self._budgets_for_call(keep_rate, keep_mass)
        self._advance_warmup()
        x, trace, _ = self._block_loop(x, rates, masses, attn_mask, is_causal, rope)
        return self.norm(x), (None if trace is None else trace.attention_weights(self._size_aware))

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
            keep_mass: Optional[KeepRate] = None,
    ) -> torch.Tensor:
        """Tokens after the final norm: ``[B, prefix + remaining tokens, C]`` (with ``keep_mass`` in
        a batch, an image's padding too: ``forward_intermediates`` gives its sizes, 0). ``attn_mask``
        / ``is_causal`` go to every block's attention as in timm, with ``keep_rate`` 1.0 only."""
        return self._features_and_sizes(x, attn_mask, is_causal, keep_rate, keep_mass)[0]

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
            token_sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """timm's head; with ``token_sizes`` ``[B, n]`` (size-aware fusion, or padding with size 0) an
        ``avg`` / ``avgmax`` pooling weighs each non-prefix token by its size, ``max`` leaves the
        padding out, and an attention pool adds ``log(size)`` to its logits (``forward`` passes
        them; without them every token counts once)."""
        pool = getattr(self, 'attn_pool', None)
        if token_sizes is None or (pool is None and self.global_pool not in ('avg', 'avgmax', 'max')):
            return super().forward_head(x, pre_logits=pre_logits)
        # timm's ViT says whether its pool sees the prefix tokens; Eva's attention pool sees them, its average not
        include_prefix = getattr(self, 'pool_include_prefix', pool is not None)
        if pool is None:
            x = size_weighted_pool(x, token_sizes, self.global_pool, self.num_prefix_tokens, include_prefix)
        else:
            num_prefix = self.num_prefix_tokens if include_prefix else 0
            bias = size_key_bias(token_sizes, num_prefix, x.dtype)
            x = pool(x[:, self.num_prefix_tokens - num_prefix:], attn_mask=bias)
        # the rest of timm's forward_head
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
            keep_mass: Optional[KeepRate] = None,
    ) -> torch.Tensor:
        """Logits; ``keep_rate`` or ``keep_mass`` overrides the model's budget for this call only."""
        x, token_sizes = self._features_and_sizes(x, attn_mask, is_causal, keep_rate, keep_mass)
        return self.forward_head(x, token_sizes=token_sizes)

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
            keep_mass: Optional[KeepRate] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates``, with tokens traced back to their patches.

        ``NCHW`` keeps timm's shapes: each patch shows the token that carries it (its own if
        kept, the fused token it went into, zeros if dropped without fusion). ``NLC`` gives the
        raw non-prefix tokens, fewer after each reorganisation. With ``output_dict=True`` the
        result also holds, per intermediate, ``token_patch_ids`` ``[B, n]`` (the patch each token
        came from, -1 for a fused token, -2 for padding) and ``patch_token_index`` ``[B, H*W]`` (the
        token now carrying each patch, -1 if dropped) and ``token_sizes`` ``[B, n]`` (the patches
        each token stands for: 1, or for a fused token the patches it replaced; 0: padding). With
        ``keep_mass``, an image's count after a block is its tokens of size > 0.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        images = x
        x, rope = self._entering_tokens(images)
        grid_h, grid_w = self.patch_embed.dynamic_feat_size(images.shape[-2:])
        if output_fmt == 'NCHW':
            opaque.check_patch_grid(x.shape[1] - self.num_prefix_tokens, (grid_h, grid_w))

        rates, masses = self._budgets_for_call(keep_rate, keep_mass)
        self._advance_warmup()
        num_blocks = max_index + 1 if stop_early else len(self.blocks)
        x, _, taken = self._block_loop(
            x, rates, masses, attn_mask, is_causal, rope, take_indices=take_indices, num_blocks=num_blocks)

        intermediates, prefix_tokens, token_ids_out, patch_index_out, sizes_out = [], [], [], [], []
        for y, trace in taken:
            y = self.norm(y) if norm else y
            prefix_tokens.append(y[:, :self.num_prefix_tokens])
            tokens = y[:, self.num_prefix_tokens:]
            if output_fmt == 'NCHW':
                tokens = tokens_to_patch_grid(tokens, trace.patch_token_index)
                tokens = tokens.unflatten(1, (grid_h, grid_w)).permute(0, 3, 1, 2).contiguous()
            intermediates.append(tokens)
            token_ids_out.append(trace.token_patch_ids)
            patch_index_out.append(trace.patch_token_index)
            sizes_out.append(trace.sizes_or_ones())

        if output_dict:
            result = {
                'image_intermediates': intermediates,
                'token_patch_ids': token_ids_out,
                'patch_token_index': patch_index_out,
                'token_sizes': sizes_out,
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
