"""timm's blocks with EViT's step between attention and MLP, and the attention cores that read the class row.

One per-block step per timm block type: ``EViTBlock`` (timm's ``Block``) and ``EViTEvaBlock``
(``EvaBlock``, with rotary position embedding: the model gives it the rows of the tokens it holds).
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block

try:  # timm's RoPE attention (PE, RoPE ViTs: attn_type='rope')
    from timm.layers import AttentionRope
except ImportError:  # a timm without it has no Eva that uses it
    AttentionRope = None

from . import opaque
from .options import KEEP_ALL, Budget, budgets_per_block
from .reorg import (
    averaged_softmax, bias_as, class_attention, head_averaged_class_row, mean_received_log_row, mean_received_row,
    pool_attention, scaled_logits,
)

__all__ = [
    'EViTBlock', 'EViTEvaBlock', 'attention_with_class_attention', 'rope_attention_with_class_attention', 'PoolScore',
    'PoolRanking', 'EVA_ATTENTION_CLASSES',
]


def _attend_with_score(
        attn: torch.nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: Optional[torch.Tensor],
        num_prefix_tokens: int,
        score: Optional[str],
        key_bias: Optional[torch.Tensor] = None,
        log_space: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The end both timm attention modules share, from ``q, k, v`` ``[B, H, N, D]`` on: attention,
    heads joined, scale norm, gate, projection; also the block's ``score`` of the non-prefix tokens,
    ``[B, N - P]`` (``'class'``: the head-averaged class row; ``'mean'``: the attention each token
    receives; ``'pool'`` is not the attention's, and None asks for none: None); ``log_space``:
    its log up to a constant (size-aware fusion's log-score).

    ``key_bias`` ``[B, 1, 1, N]`` (after a reorganisation under size-aware fusion: the tokens' log
    sizes, ``TokenTrace.key_bias``, float32): every query attends to a token of size ``s`` with
    ``+ log(s)`` on its logit, in the attention and in the score, and ``'mean'`` counts it as ``s``
    queries.

    Fused / unfused as the module says: the unfused path reads the score from the attention it
    materialises anyway; the fused path computes it beside the SDPA kernel (the class row alone,
    or the received attention a chunk of queries at a time), the size bias as SDPA's additive
    mask, broadcast over heads and queries.
    """
    token_score, query_log_weights = None, None
    if key_bias is not None:
        if score == 'mean':   # (the log sizes before any conversion: float32)
            query_log_weights = key_bias.flatten(1)
        key_bias = bias_as(key_bias, q)
    if attn.fused_attn:
        if score == 'class':
            token_score = class_attention(q, k, attn.scale, num_prefix_tokens, key_bias, log_space)
        elif score == 'mean':
            token_score = opaque.mean_received_attention(
                q, k, attn.scale, num_prefix_tokens, key_bias=key_bias, query_log_weights=query_log_weights,
                log_space=log_space)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_bias, dropout_p=attn.attn_drop.p if attn.training else 0.)
    else:
        logits = scaled_logits(q, k.transpose(-2, -1), attn.scale, key_bias)
        weights = logits.softmax(dim=-1)
        # the log-scores from the logits (no probability underflows), the others from the weights
        if score == 'class' and log_space:
            token_score = averaged_softmax(logits[:, :, :1], (1, 2), True)[:, num_prefix_tokens:]
        elif score == 'class':
            token_score = head_averaged_class_row(weights, num_prefix_tokens)
        elif score == 'mean' and log_space:
            token_score = mean_received_log_row(logits, num_prefix_tokens, query_log_weights)
        elif score == 'mean':
            token_score = mean_received_row(weights, num_prefix_tokens)
        x = attn.attn_drop(weights) @ v

    x = x.transpose(1, 2).flatten(2)   # heads joined; no size inferred: an empty batch works
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), token_score


def attention_with_class_attention(
        attn: Attention,
        x: torch.Tensor,
        num_prefix_tokens: int = 1,
        score: Optional[str] = 'class',
        key_bias: Optional[torch.Tensor] = None,
        log_space: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm ``Attention`` forward that also returns the ``score`` of the ``N - P`` non-prefix
    tokens, ``[B, N - P]``: the head-averaged class attention (``'class'``), the attention each
    receives (``'mean'``), or None (``'pool'``, which the block computes from its tokens, or None).
    ``key_bias`` (the tokens' log sizes) and ``log_space``: as in ``_attend_with_score``.

    Runs the module's own layers (qkv, q/k norms, scale norm, gate, proj, dropouts) in the order of
    timm's ``Attention.forward``, so its output is that forward's (a test compares them), on the
    module's fused or unfused path.
    """
    B, N, _ = x.shape
    gate = getattr(attn, 'gate', None)  # timm added the optional gate after 1.0.26 (1.0.26 has none)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    return _attend_with_score(attn, q, k, v, gate, num_prefix_tokens, score, key_bias, log_space)


class PoolScore:
    """The ``'pool'`` score of a model with timm's ``AttentionPoolLatent`` head (SigLIP's ``map``):
    the pool's own query (``latent`` through ``q`` and ``q_norm``) against a block's tokens, keyed as
    the pool would key them after the model's final ``norm`` (``kv``'s key half, ``k_norm``).

    It looks up the model's pool and norm at every call (``model._score_modules()``), so a pool or
    norm the user replaces is the one that ranks (after pruning the head, the pool's ``PoolRanking``,
    which has the same names). Only the latents the pool's output keeps are
    read: the first where timm's pool returns its first latent (``pool_type='token'``), all of them
    where it averages them. Not a module: the blocks hold it, it holds the model, and nothing is
    registered twice (the state dict stays timm's); copies and pickles follow the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(
            self,
            x: torch.Tensor,
            key_bias: Optional[torch.Tensor] = None,
            log_space: bool = False,
    ) -> torch.Tensor:
        pool, norm = self.model._score_modules()
        num_prefix_tokens = self.model.num_prefix_tokens
        B, N, _ = x.shape
        width = pool.num_heads * pool.head_dim
        latent = pool.latent[:, :1] if pool.pool == 'token' else pool.latent
        q = pool.q(latent).reshape(1, latent.shape[1], pool.num_heads, pool.head_dim).transpose(1, 2)
        kv_bias = None if pool.kv.bias is None else pool.kv.bias[:width]
        k = F.linear(norm(x), pool.kv.weight[:width], kv_bias)    # the key half of the pool's kv only
        k = k.reshape(B, N, pool.num_heads, pool.head_dim).transpose(1, 2)
        key_bias = bias_as(key_bias, k)
        return pool_attention(pool.q_norm(q), pool.k_norm(k), pool.scale, num_prefix_tokens, key_bias, log_space)


class PoolRanking(torch.nn.Module):
    """What the ``'pool'`` score reads of timm's ``AttentionPoolLatent``: its latent queries (``latent``,
    ``q``, ``q_norm``) and the key half of its ``kv`` (``k_norm``), under the pool's names, so that
    ``PoolScore`` reads either.

    ``prune_intermediate_layers`` registers it as ``score_pool`` when pruning takes the pool out of
    the head: the pool's values, output projection, norm and MLP rank nothing, and a parameter no
    forward uses breaks DistributedDataParallel (without ``find_unused_parameters``) and timm's
    pruning contract. The latent, ``q`` and the norms are the pool's own modules; the key half of
    ``kv`` is copied (same values: the ranking is unchanged)."""

    def __init__(self, pool: torch.nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.pool = pool.num_heads, pool.head_dim, pool.scale, pool.pool
        self.latent, self.q, self.q_norm, self.k_norm = pool.latent, pool.q, pool.q_norm, pool.k_norm
        self.kv = _key_half(pool.kv, pool.num_heads * pool.head_dim)


def _key_half(kv: torch.nn.Linear, width: int) -> torch.nn.Linear:
    """A copy of the first ``width`` outputs of ``kv`` (the keys), on its device, dtype and grad setting."""
    key = torch.nn.Linear(kv.in_features, width, bias=kv.bias is not None, device=kv.weight.device,
                          dtype=kv.weight.dtype)
    with torch.no_grad():
        key.weight.copy_(kv.weight[:width])
        if kv.bias is not None:
            key.bias.copy_(kv.bias[:width])
    key.requires_grad_(kv.weight.requires_grad)
    return key


def ranking_part(pool: torch.nn.Module) -> PoolRanking:
    """The part of an attention pool that ranks tokens (a ``PoolRanking`` is returned as it is)."""
    return pool if isinstance(pool, PoolRanking) else PoolRanking(pool)


class _ReorganisingStep:
    """What EViT's two block types share (docs/design.md, "Layers and file ownership"): the state the
    model sets, and the choice per call between timm's own forward (a budget that keeps every
    token, no size bias) and the block's reorganising step, which each block writes out after
    the timm block it follows."""

    budget: Budget = KEEP_ALL               # set by the model (set_keep_rate)
    fuse_token: bool = True
    fusion: str = 'paper'                   # options.FUSIONS
    num_prefix_tokens: int = 1
    score: str = 'class'                    # what ranks the tokens (options.SCORES)
    pool_score: Optional[PoolScore] = None  # for score 'pool'

    @property
    def keep_rate(self) -> float:
        """The block's keep rate (1.0: keeps every token)."""
        return self.budget.keep_rate

    def _budget(
            self,
            keep_rate: Optional[float],
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Budget:
        """This call's budget: the one given (``keep_rate``), else the block's own."""
        budget = self.budget if keep_rate is None else budgets_per_block(keep_rate, 1)[0]
        if budget.reorganises and (attn_mask is not None or is_causal):
            # A mask is laid out for the tokens before this block; the reorganised ones have no place in it.
            raise ValueError('attn_mask / is_causal cannot be used in a block that reorganises tokens '
                             f'(keep_rate {budget.keep_rate}); use keep_rate=1.0 for masked attention')
        return budget

    def _score_at(self, budget: Budget) -> Optional[str]:
        # what the attention core computes beside the attention: no score where no token is dropped
        return self.score if budget.reorganises else None

    @property
    def _log_scores(self) -> bool:
        # size-aware fusion ranks and fuses by log-scores (its fused token is their softmax's mean);
        # without a fused token both fusions are one, on one path
        return self.fusion == 'size' and self.fuse_token

    def _kept_all(self, x: torch.Tensor, kept_indices: Optional[List[torch.Tensor]]) -> torch.Tensor:
        # a block that keeps every token reports the identity (callers need no branch)
        if kept_indices is not None:
            num_tokens = x.shape[1] - self.num_prefix_tokens
            kept_indices.append(torch.arange(num_tokens, device=x.device).expand(x.shape[0], -1))
        return x

    def _reorganise(
            self,
            x: torch.Tensor,
            score: Optional[torch.Tensor],
            budget: Budget,
            kept_indices: Optional[List[torch.Tensor]],
            key_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not budget.reorganises:   # a block that only carries the size bias keeps every token
            return self._kept_all(x, kept_indices)
        if score is None:   # 'pool': from the tokens after the attention residual
            score = self.pool_score(x, key_bias, self._log_scores)
        x, kept_idx = opaque.reorganize(
            x, score, budget.keep_rate, self.fuse_token, self.num_prefix_tokens, self._log_scores)
        if kept_indices is not None:
            kept_indices.append(kept_idx)
        return x


class EViTBlock(_ReorganisingStep, Block):
    """timm ``Block`` that can reorganise its tokens between attention and MLP.

    Same parameters, state-dict keys and output as ``Block`` (a tensor ``[B, N_out, C]``, so forward
    hooks and ``model.blocks(x)`` work as on timm's blocks). Its ``budget`` (read as ``keep_rate``)
    and ``fuse_token`` are set by the model (``set_keep_rate``), as
    is ``num_prefix_tokens`` (class, distillation and register tokens, never reorganised); with a
    budget that keeps every token and no size bias the block is timm's ``Block.forward``.

    ``forward`` also takes ``keep_rate`` for one call, and ``kept_indices``: a list to which the
    block appends the indices ``[B, num_keep]`` of the non-prefix tokens it kept, in their new order
    (the identity when it kept them all). Models use it to trace tokens back to their patches.
    ``key_bias`` ``[B, 1, 1, P + n]``: after a reorganisation under size-aware fusion, the log of
    the patches each token stands for (``TokenTrace.key_bias``, ``reorg.size_key_bias``), which
    biases every attention to it and weighs its query in ``'mean'``; None: each counts once. The
    model's block loop carries it from block to block; so does ``model.blocks(x)`` (``EViTBlocks``).
    """

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[float] = None,
            kept_indices: Optional[List[torch.Tensor]] = None,
            key_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        budget = self._budget(keep_rate, attn_mask, is_causal)
        if not budget.reorganises and key_bias is None:
            return self._kept_all(super().forward(x, attn_mask=attn_mask, is_causal=is_causal), kept_indices)
        # Block.forward with the size bias, and the reorganisation between its two residual branches
        attn_out, score = attention_with_class_attention(
            self.attn, self.norm1(x), self.num_prefix_tokens, self._score_at(budget), key_bias, self._log_scores)
        x = x + self.drop_path1(self.ls1(attn_out))
        x = self._reorganise(x, score, budget, kept_indices, key_bias)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# timm's attention modules an EvaBlock can hold whose core rope_attention_with_class_attention follows
EVA_ATTENTION_CLASSES = tuple(cls for cls in (EvaAttention, AttentionRope) if cls is not None)


def _rope_qkv(attn: torch.nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, heads, N, head_dim]`` (k, v with their own head count) as the module makes them:
    one fused ``qkv`` (EvaAttention's separate ``q_bias`` / ``v_bias`` added as timm does) or
    ``q_proj`` / ``k_proj`` / ``v_proj``."""
    B, N, _ = x.shape
    if attn.qkv is not None:
        q_bias = getattr(attn, 'q_bias', None)   # EvaAttention only; AttentionRope's qkv has its bias
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        return qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    num_kv_heads = getattr(attn, 'num_kv_heads', attn.num_heads)   # grouped-query AttentionRope
    q = attn.q_proj(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).reshape(B, N, num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).reshape(B, N, num_kv_heads, attn.head_dim).transpose(1, 2)
    return q, k, v


def rope_attention_with_class_attention(
        attn: Union[EvaAttention, 'AttentionRope'],
        x: torch.Tensor,
        rope: Optional[torch.Tensor],
        num_prefix_tokens: int = 1,
        score: Optional[str] = 'class',
        key_bias: Optional[torch.Tensor] = None,
        log_space: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm ``EvaAttention`` / ``AttentionRope`` forward that also returns the ``score`` of the
    ``N - P`` non-prefix tokens, ``[B, N - P]`` (as ``attention_with_class_attention``, with its
    ``key_bias`` and ``log_space``).

    Runs the module's own layers in the order of its forward (projections, q/k norms, rotary
    embedding of the non-prefix queries and keys with timm's ``apply_rot_embed_cat``, grouped k/v
    heads, scale norm, gate, proj, dropouts), so its output is that forward's (a test compares
    them), on the module's fused or unfused path. ``rope`` holds one row per non-prefix token in
    ``x``, in their order.
    """
    B, N, _ = x.shape
    gate = getattr(attn, 'gate', None)   # timm added the optional gate after 1.0.26 (1.0.26 has none)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = _rope_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, 'rotate_half', False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    num_kv_groups = getattr(attn, 'num_kv_groups', 1)
    if num_kv_groups > 1:
        k = k.repeat_interleave(num_kv_groups, dim=1)
        v = v.repeat_interleave(num_kv_groups, dim=1)

    return _attend_with_score(attn, q, k, v, gate, num_prefix_tokens, score, key_bias, log_space)


class EViTEvaBlock(_ReorganisingStep, EvaBlock):
    """timm ``EvaBlock`` (EVA-02, DINOv3, PE, RoPE ViTs) that can reorganise its tokens between
    attention and MLP; ``EViTBlock``'s contract (same parameters and output, ``keep_rate`` /
    ``fuse_token`` / ``num_prefix_tokens`` set by the model, ``keep_rate`` and ``kept_indices``
    per call; at ``keep_rate`` 1.0 it is ``EvaBlock.forward``).

    ``rope`` holds the rotary rows of the non-prefix tokens entering the block, in their order:
    the model gathers them after every reorganisation (each kept token keeps its patch's rotation,
    a fused token gets none), so the block itself only passes them to its attention.
    """

    def forward(
            self,
            x: torch.Tensor,
            rope: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            keep_rate: Optional[float] = None,
            kept_indices: Optional[List[torch.Tensor]] = None,
            key_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        budget = self._budget(keep_rate, attn_mask, is_causal)
        if not budget.reorganises and key_bias is None:
            x = super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            return self._kept_all(x, kept_indices)
        # EvaBlock.forward with the size bias, and the reorganisation between its two residual branches
        attn_out, score = rope_attention_with_class_attention(
            self.attn, self.norm1(x), rope, self.num_prefix_tokens, self._score_at(budget), key_bias,
            self._log_scores)
        if self.gamma_1 is not None:
            attn_out = self.gamma_1 * attn_out
        x = x + self.drop_path1(attn_out)
        x = self._reorganise(x, score, budget, kept_indices, key_bias)
        mlp_out = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            mlp_out = self.gamma_2 * mlp_out
        return x + self.drop_path2(mlp_out)
