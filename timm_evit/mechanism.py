"""The EViT mechanism over a timm ViT, written once for every family (docs/design.md, "Layers and
file ownership"): keep rates held by the blocks, the one block loop (per-block keep rates, rotary
rows for the tokens that remain, tracing tokens to their patches), ``forward_intermediates``.

A family class is ``class XEViT(EViTMixin, TimmClass)``: it provides ``_embed_with_rope`` (the
tokens entering the blocks and, for RoPE families, their rotary embedding) and blocks whose forward
takes ``keep_rate`` and ``kept_indices`` (``EViTBlock``, ``EViTEvaBlock``). Its parts: the warm-up
(``schedule.KeepRateWarmup``), token tracing (``tracing.TokenTrace``), the functions FX keeps whole
(``opaque``).
"""
import weakref
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import AttentionPoolLatent
from timm.models import checkpoint
from timm.models._features import feature_take_indices

from . import opaque
from .layers import PoolRanking, PoolScore, ranking_part
from .options import (
    EVIT_ARGS, KEEP_ALL, Budget, EViTOptions, KeepRate, budgets_per_block, check_fuse_token, check_fusion, default_reorg_layers,
    resolve_score,
)
from .reorg import bias_as, size_key_bias, size_weighted_pool, tokens_to_patch_grid
from .schedule import KeepRateWarmup
from .tracing import TokenTrace

__all__ = ['EViTMixin', 'EViTBlocks', 'run_blocks', 'default_reorg_layers']


def run_blocks(
        blocks: Sequence[nn.Module],
        x: torch.Tensor,
        budgets: Sequence[Budget],
        num_prefix_tokens: int,
        size_aware: bool,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        rope: Optional[torch.Tensor] = None,
        rope_per_block: bool = False,
        trace: bool = False,
        trace_patches: bool = False,
        take_indices: Sequence[int] = (),
        call: Optional[Callable[..., torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Optional[TokenTrace], List[Tuple[torch.Tensor, TokenTrace]]]:
    """The one block loop (docs/design.md, "One token state"): ``blocks`` at their ``budgets`` (one
    per block), the token state carried from block to block.

    Once a block has reorganised, the ``TokenTrace`` holds every token's patch and size, and every
    later block gets the size bias it implies (``TokenTrace.key_bias``, under size-aware fusion). With ``rope`` (timm's rotary embedding of the entering tokens;
    ``[depth, ...]`` with ``rope_per_block``), each block gets the rows of the tokens that remain:
    every kept token its patch's rotation, a fused token none. ``call(blk, x, **kwargs)`` runs a
    block (gradient checkpointing); default ``blk(x, **kwargs)``, so hooks see every block.

    Returns the tokens, their ``TokenTrace`` (None where nothing asked for one and nothing needed
    it; its ``patch_token_index`` only with ``trace_patches`` or ``take_indices``), and for each
    block in ``take_indices`` its tokens and trace.
    """
    opaque.check_attention_mask(attn_mask, is_causal, any(b.reorganises for b in budgets))
    take_indices = list(take_indices)
    token_trace = None
    with_ids = trace or bool(take_indices) or rope is not None
    if with_ids or trace_patches or size_aware:
        token_trace = TokenTrace.start(x, num_prefix_tokens, with_ids, trace_patches or bool(take_indices),
                                       with_sizes=size_aware or bool(take_indices), size_aware=size_aware)
    reorganised, block_rope, taken = False, rope, []
    for i, (blk, budget) in enumerate(zip(blocks, budgets)):
        if rope_per_block:
            block_rope = rope[i]
            if reorganised:
                block_rope = opaque.rotary_rows_for_tokens(block_rope, token_trace.token_patch_ids)
        kept_indices = [] if budget.reorganises else None
        kwargs = dict(keep_rate=budget.keep_rate, kept_indices=kept_indices)
        if block_rope is not None:
            kwargs.update(rope=block_rope)
        if token_trace is not None and token_trace.key_bias is not None:   # (built once per reorganisation)
            kwargs.update(key_bias=token_trace.key_bias)
        if not budget.reorganises and (attn_mask is not None or is_causal):
            # (check_attention_mask has made sure that no mask meets a reorganising block; under
            # FX tracing both are placeholders, passed on to the plain blocks as timm does)
            kwargs.update(attn_mask=attn_mask, is_causal=is_causal)
        num_tokens = x.shape[1] - num_prefix_tokens
        x = blk(x, **kwargs) if call is None else call(blk, x, **kwargs)
        if kept_indices and token_trace is not None:
            kept_idx = kept_indices[0]
            fused = x.shape[1] - num_prefix_tokens > kept_idx.shape[1]   # the block appended a fused slot
            token_trace = token_trace.after(kept_idx, num_tokens, fused)
            # before any reorganisation, timm's own rope goes to the blocks (keep_rate 1.0 is timm's model)
            reorganised = True
            if rope is not None and not rope_per_block:
                block_rope = opaque.rotary_rows_for_tokens(rope, token_trace.token_patch_ids)
        if i in take_indices:
            taken.append((x, token_trace))
    return x, token_trace, taken


class EViTBlocks(nn.Sequential):
    """A ViT's ``blocks`` (timm's ``nn.Sequential`` of ``EViTBlock``) whose call carries the token
    state from block to block as the model does (``run_blocks``, at the blocks' own budgets): with
    size-aware fusion, ``model.norm(model.blocks(tokens))`` is
    ``forward_features``. Same modules and state-dict keys as timm's ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        if not blocks:
            return x
        first = blocks[0]
        size_aware = first.fusion == 'size' and first.fuse_token
        return run_blocks(blocks, x, [blk.budget for blk in blocks], first.num_prefix_tokens, size_aware)[0]


# The token state each model's last forward_features left, keyed weakly by the model and held
# beside a weak reference to the tensor it returned: forward_head finds the state of exactly that
# tensor (docs/design.md, "One token state"). Off the model, so copies and pickles never hold it.
_FEATURES_STATE: 'weakref.WeakKeyDictionary[nn.Module, Tuple[weakref.ref, Optional[TokenTrace]]]' = \
    weakref.WeakKeyDictionary()


def _tracing() -> bool:
    # (FX's symbolic trace, torch.export, torch.compile: a graph has no place for the remembered state)
    fx = torch.fx._symbolic_trace
    symbolic = getattr(fx, 'is_fx_symbolic_tracing', fx.is_fx_tracing)
    return symbolic() or torch.compiler.is_compiling()


class EViTMixin(KeepRateWarmup):
    """EViT on a timm ViT class: put it first among the bases (``class XEViT(EViTMixin, TimmViT)``).

    Holds what every family shares: ``keep_rate`` (held by the reorganising blocks), ``fuse_token``,
    ``reorg_layers``, the keep-rate warm-up, ``set_keep_rate``, the block loop, ``forward_features``,
    ``forward``, ``forward_intermediates`` with tokens traced to their patches, pruning. The family
    class gives ``_embed_with_rope`` (default: ``_embed`` without RoPE) and blocks that reorganise.
    """

    def _init_evit(self, options: EViTOptions) -> None:
        """EViT's state on a built model whose blocks are EViTBlocks (from __init__, or from ``apply``).
        Every argument is checked against the model before anything changes: a refusal leaves the
        model as it was."""
        options = options.checked(len(self.blocks))
        score = resolve_score(options.score, self.cls_token is not None, self._pool_for_score() is not None)
        self._check_fusion_fits(options.fusion)
        if '_model_args' in self.__dict__:   # timm's record on a model apply converts: under the property now
            self._model_args = self.__dict__.pop('_model_args')
        for blk in self.blocks:
            blk.num_prefix_tokens = self.num_prefix_tokens
            blk.budget = KEEP_ALL
        self.reorg_layers = options.reorg_layers
        self.fuse_token = options.fuse_token
        self.fusion = options.fusion
        self.score = score
        self._init_warmup(options.keep_rate_warmup_start, options.keep_rate_warmup_steps, self._place()['device'])
        self._set_budgets(options.budgets())

    def evit_args(self) -> Dict[str, Any]:
        """The model's EViT arguments as they are now (``options.EVIT_ARGS``), in the form creation takes."""
        return {name: getattr(self, name) for name in EVIT_ARGS}

    # timm records a model's creation arguments in ``_model_args`` (create_model, from timm 1.0.31),
    # and save_for_hf / push_to_hf_hub write them into config.json, from which local-dir: and hf-hub:
    # build the model again. EViT's arguments change after creation (set_keep_rate, the setters,
    # apply), so they are read from the model when asked for, never from a record that could be stale.
    @property
    def _model_args(self) -> Dict[str, Any]:
        architecture_args = self.__dict__.get('_architecture_args', {})
        if getattr(self, '_pruning_head', False):   # timm's pruning reads them, blocks gone, reorg_layers not yet cut
            return dict(architecture_args)
        return {**architecture_args, **self.evit_args()}

    @_model_args.setter
    def _model_args(self, args: Dict[str, Any]) -> None:
        self.__dict__['_architecture_args'] = {k: v for k, v in args.items() if k not in EVIT_ARGS}

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

    def _budgets(self) -> Tuple[Budget, ...]:
        """The budget of each reorganising block (held by the blocks themselves)."""
        return tuple(self.blocks[layer].budget for layer in self.reorg_layers)

    def _set_budgets(self, budgets: Sequence[Budget]) -> None:
        for layer, budget in zip(self.reorg_layers, budgets):
            self.blocks[layer].budget = budget

    @property
    def keep_rate(self) -> Tuple[float, ...]:
        """Keep rate of each reorganising block (held by the blocks themselves)."""
        return tuple(b.keep_rate for b in self._budgets())

    @keep_rate.setter
    def keep_rate(self, keep_rate: KeepRate) -> None:
        self.set_keep_rate(keep_rate)

    @property
    def score(self) -> str:
        """What ranks the tokens: ``'class'``, ``'mean'`` or ``'pool'`` (docs/design.md, "What ranks
        the tokens"). Settable; None sets the default (``options.resolve_score``)."""
        return self._score

    @score.setter
    def score(self, score: Optional[str]) -> None:
        self._score = resolve_score(score, self.cls_token is not None, self._pool_for_score() is not None)
        pool_score = PoolScore(self) if self._score == 'pool' else None
        for blk in self.blocks:
            blk.score, blk.pool_score = self._score, pool_score
        if self._score != 'pool':   # what pruning kept for 'pool' alone is used by nothing now
            self._register_or_remove('score_pool', None)
            self._register_or_remove('score_norm', None)

    def _pool_for_score(self) -> Optional[nn.Module]:
        # timm's attention pool, where the 'pool' score can use it (a pool with its own position
        # embedding is laid out for the tokens entering the blocks, not for the reorganised ones)
        pool = getattr(self, 'attn_pool', None)
        if pool is None:   # the head pruned for features: the pool's ranking part (prune_intermediate_layers)
            pool = getattr(self, 'score_pool', None)
        if isinstance(pool, PoolRanking) or (isinstance(pool, AttentionPoolLatent) and pool.pos_embed is None):
            return pool
        return None

    def _norm_for_score(self) -> nn.Module:
        # the final norm 'pool' keys the tokens with: the model's, or the one pruning took out of it
        return getattr(self, 'score_norm', self.norm)

    def _score_modules(self) -> Tuple[nn.Module, nn.Module]:
        """The attention pool and final norm that ``'pool'`` ranks with, as the model holds them now."""
        pool = self._pool_for_score()
        if pool is None:
            raise ValueError(f"score='pool' ranks tokens with timm's attention pool (AttentionPoolLatent without a "
                             f"position embedding), and the model's attn_pool is now {type(self.attn_pool).__name__}: "
                             "set model.score = 'mean'")
        return pool, self._norm_for_score()

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
        self._check_fusion_fits(fusion)
        self._fusion = fusion
        for blk in self.blocks:
            blk.fusion = fusion

    def _check_fusion_fits(self, fusion: str) -> None:
        fusion = check_fusion(fusion)
        pool = getattr(self, 'attn_pool', None)
        if fusion == 'size' and pool is not None and not isinstance(pool, AttentionPoolLatent):
            raise ValueError(f"fusion='size' weighs pooled tokens by size, which this model's {type(pool).__name__} "
                             "pool cannot: use fusion='paper'")

    @property
    def _size_aware(self) -> bool:
        # tokens carry sizes into every later attention and the pooling
        return self.fusion == 'size' and self.fuse_token

    def set_keep_rate(self, keep_rate: KeepRate) -> None:
        """Change the keep rate (one float, or one per reorganising block); no retraining needed."""
        self._set_budgets(budgets_per_block(keep_rate, len(self.reorg_layers)))

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
        out of the head (timm's feature extraction prunes the head): where a reorganising block
        remains, the model keeps what they rank with registered as ``score_pool`` (the pool's
        ranking part, ``PoolRanking``) and ``score_norm`` (moved and saved with it); where none
        remains, neither (``_hold_ranking_modules``)."""
        pool, norm = self._pool_for_score(), self._norm_for_score()
        self._pruning_head = True
        try:
            take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        finally:
            self._pruning_head = False
        self.reorg_layers = tuple(layer for layer in self.reorg_layers if layer < len(self.blocks))
        self._hold_ranking_modules(pool, norm)
        return take_indices

    def _hold_ranking_modules(self, pool: Optional[nn.Module], norm: nn.Module) -> None:
        """Register, after pruning, the pool's ranking part and the norm a remaining ``'pool'`` block ranks
        with where the model no longer holds them, and nothing else: a parameter no forward uses breaks
        DistributedDataParallel (without ``find_unused_parameters``) and timm's pruning contract."""
        ranks = self.score == 'pool' and bool(self.reorg_layers)
        pruned_pool = ranks and getattr(self, 'attn_pool', None) is not pool
        pruned_norm = ranks and self.norm is not norm
        self._register_or_remove('score_pool', ranking_part(pool) if pruned_pool else None)
        self._register_or_remove('score_norm', norm if pruned_norm else None)

    def _register_or_remove(self, name: str, module: Optional[nn.Module]) -> None:
        if module is not None:
            setattr(self, name, module)
        elif name in self._modules:
            delattr(self, name)

    def _budgets_for_call(self, keep_rate: Optional[KeepRate]) -> List[Budget]:
        """This call's budget for every block (``KEEP_ALL`` outside ``reorg_layers``): the one given for
        the call (``keep_rate``), else the warm-up's rates in training, else the model's."""
        # FX tracing (timm feature extraction) turns every forward argument into a Proxy;
        # a traced graph keeps the model's budgets, fixed at tracing time.
        keep_rate = None if isinstance(keep_rate, torch.fx.Proxy) else keep_rate
        if keep_rate is not None:
            budgets = budgets_per_block(keep_rate, len(self.reorg_layers))
        elif self.training and self.has_keep_rate_warmup:
            budgets = budgets_per_block(self.scheduled_keep_rate(), len(self.reorg_layers))
        else:   # evaluation always uses the target budget
            budgets = self._budgets()
        per_block = [KEEP_ALL] * len(self.blocks)
        for layer, budget in zip(self.reorg_layers, budgets):
            per_block[layer] = budget
        return per_block

    def _call_block(self, blk: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """One block through its ``__call__`` (hooks see it), checkpointed where the model says so."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # keyword arguments bound first: reentrant checkpointing (timm's set_reentrant_ckpt) takes none
            return checkpoint(partial(blk, **kwargs), x)
        return blk(x, **kwargs)

    def _embed_with_rope(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokens entering the blocks and their rotary position embedding (None: no RoPE)."""
        return self._embed(x), None

    def _preamble(
            self,
            images: torch.Tensor,
            keep_rate: Optional[KeepRate],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Budget]]:
        """What every forward entry point does first, in this order: the input check, the family's
        embedding (tokens entering the blocks, their rotary embedding), this call's budgets, the
        warm-up's step (after the budgets have read it)."""
        opaque.check_image_batch(images, self.in_chans)
        x, rope = self._embed_with_rope(images)
        budgets = self._budgets_for_call(keep_rate)
        self._advance_warmup()
        return x, rope, budgets

    def _block_loop(
            self,
            x: torch.Tensor,
            budgets: Sequence[Budget],
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            rope: Optional[torch.Tensor] = None,
            trace: bool = False,
            trace_patches: bool = False,
            take_indices: Sequence[int] = (),
            num_blocks: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Optional[TokenTrace], List[Tuple[torch.Tensor, TokenTrace]]]:
        """``run_blocks`` over the model's first ``num_blocks`` blocks (default all) with the model's
        prefix tokens, fusion, per-block RoPE and gradient checkpointing."""
        blocks = self.blocks if num_blocks is None else self.blocks[:num_blocks]
        return run_blocks(
            blocks, x, budgets, self.num_prefix_tokens, self._size_aware, attn_mask, is_causal, rope,
            rope_per_block=rope is not None and getattr(self, 'rope_mixed', False), trace=trace,
            trace_patches=trace_patches, take_indices=take_indices, call=self._call_block)

    def _features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
            keep_rate: Optional[KeepRate],
            trace: bool = False,
    ) -> Tuple[torch.Tensor, Optional[TokenTrace]]:
        """The forward preamble every entry point shares (input check, embedding, this call's
        budgets, the warm-up's step), the blocks, the final norm: the tokens and their state."""
        x, rope, budgets = self._preamble(x, keep_rate)
        x, token_trace, _ = self._block_loop(x, budgets, attn_mask, is_causal, rope, trace=trace)
        return self.norm(x), token_trace

    def _remember(self, features: torch.Tensor, token_trace: Optional[TokenTrace]) -> None:
        """What ``forward_head`` needs of ``features`` beyond the tensor (not under tracing or compiling)."""
        if not _tracing():
            _FEATURES_STATE[self] = (weakref.ref(features), token_trace)

    def _state_of(self, features: torch.Tensor) -> Tuple[bool, Optional[TokenTrace]]:
        """Whether ``features`` is what the last ``forward_features`` returned, and its token state."""
        remembered = None if _tracing() else _FEATURES_STATE.get(self)
        if remembered is not None and remembered[0]() is features:
            return True, remembered[1]
        return False, None

    def _head_reads_token_state(self, pre_logits: bool) -> bool:
        """Whether the head's output depends on the token state the model's budgets leave (beyond the
        tokens): pooling by size."""
        pools_tokens = getattr(self, 'attn_pool', None) is not None or self.global_pool in ('avg', 'avgmax', 'max')
        return pools_tokens and self._size_aware and any(b.reorganises for b in self._budgets())

    def _token_state_for_head(self, x: torch.Tensor, pre_logits: bool) -> Optional[TokenTrace]:
        """The token state of features ``x`` handed to ``forward_head`` alone: remembered where ``x``
        is what ``forward_features`` returned; refused where the head needs it and it is unknown."""
        known, token_trace = self._state_of(x)
        if not known and self._head_reads_token_state(pre_logits):
            raise ValueError(
                'forward_head needs the token state of these features (the sizes of fused tokens): '
                'pass the tensor forward_features returned, unchanged, or token_sizes= from '
                "forward_intermediates(..., output_dict=True)['token_sizes'][-1]")
        return token_trace

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[KeepRate] = None,
    ) -> torch.Tensor:
        """Tokens after the final norm: ``[B, prefix + remaining tokens, C]``. ``attn_mask`` /
        ``is_causal`` go to every block's attention as in timm, with ``keep_rate`` 1.0 only.
        ``forward_head`` of exactly this tensor pools it as ``forward`` does (by size)."""
        x, token_trace = self._features(x, attn_mask, is_causal, keep_rate)
        self._remember(x, token_trace)
        return x

    def _head_log_weights(self, token_trace: Optional[TokenTrace]) -> Optional[torch.Tensor]:
        return None if token_trace is None else token_trace.log_weights()

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
            token_sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """timm's head over the tokens that remain, weighing them as ``forward`` does: with
        size-aware fusion an ``avg`` / ``avgmax`` pooling weighs each non-prefix token by its size
        and an attention pool adds ``log(size)`` to its logits. The sizes are those of ``x`` when it is what ``forward_features`` returned,
        else ``token_sizes`` ``[B, n]`` (as ``forward_intermediates(output_dict=True)`` gives them);
        where the head needs them and neither is there, a ValueError says so."""
        if token_sizes is not None:
            log_weights = token_sizes.log() if self._size_aware else None
        else:
            log_weights = self._head_log_weights(self._token_state_for_head(x, pre_logits))
        return self._head(x, pre_logits, log_weights)

    def _head(self, x: torch.Tensor, pre_logits: bool, log_weights: Optional[torch.Tensor]) -> torch.Tensor:
        # log_weights [B, n]: the log of the patches each non-prefix token stands for (size-aware fusion)
        pool = getattr(self, 'attn_pool', None)
        if log_weights is None or (pool is None and self.global_pool not in ('avg', 'avgmax', 'max')):
            return super().forward_head(x, pre_logits=pre_logits)
        # timm's ViT says whether its pool sees the prefix tokens; Eva's attention pool sees them, its average not
        include_prefix = getattr(self, 'pool_include_prefix', pool is not None)
        if pool is None:
            x = size_weighted_pool(x, log_weights, self.global_pool, self.num_prefix_tokens, include_prefix)
        else:
            num_prefix = self.num_prefix_tokens if include_prefix else 0
            bias = bias_as(size_key_bias(log_weights, num_prefix), x)
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
    ) -> torch.Tensor:
        """Logits; ``keep_rate`` overrides the model's keep rates for this call only."""
        x, token_trace = self._features(x, attn_mask, is_causal, keep_rate)
        return self._head(x, False, self._head_log_weights(token_trace))

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
        raw non-prefix tokens, fewer after each reorganisation. With ``output_dict=True`` the
        result also holds, per intermediate, ``token_patch_ids`` ``[B, n]`` (the patch each token
        came from, -1 for a fused token) and ``patch_token_index`` ``[B, H*W]`` (the token now
        carrying each patch, -1 if dropped) and ``token_sizes`` ``[B, n]`` (the patches each token
        stands for: 1, or for a fused token the patches it replaced).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        images = x
        x, rope, budgets = self._preamble(images, keep_rate)
        grid_h, grid_w = self.patch_embed.dynamic_feat_size(images.shape[-2:])
        if output_fmt == 'NCHW':
            opaque.check_patch_grid(x.shape[1] - self.num_prefix_tokens, (grid_h, grid_w))
        num_blocks = max_index + 1 if stop_early else len(self.blocks)
        x, final_trace, taken = self._block_loop(
            x, budgets, attn_mask, is_causal, rope, take_indices=take_indices, num_blocks=num_blocks)

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
            sizes_out.append(trace.sizes())

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
                result['image_features'] = self._remembered_features(x, final_trace, stop_early)
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self._remembered_features(x, final_trace, stop_early), intermediates

    def _remembered_features(self, x: torch.Tensor, token_trace: Optional[TokenTrace], stopped_early: bool) -> torch.Tensor:
        # the final features, remembered for forward_head where every block ran
        x = self.norm(x)
        if not stopped_early:
            self._remember(x, token_trace)
        return x
