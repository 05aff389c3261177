"""EViT token reorganisation as small pure tensor functions.

One place to read the algorithm (docs/design.md, "EViT, exactly" and "EViT on any timm ViT"); every
architecture calls these. Shapes: ``B`` images, ``P`` prefix tokens (the class token first, then
any distillation or register tokens: never dropped or fused), ``n`` other tokens, ``C`` channels,
``H`` heads.

Tracing names two indices, each with one meaning (docs/design.md, "Traced indices"). A *patch* is a
non-prefix token as it entered the blocks, numbered in that order (the image's patches in raster
order; under timm's patch dropout, in training, the patches it kept). ``token_patch_ids`` ``[B, n]``:
for each token now present, the patch it came from (-1: a fused token). ``patch_token_index``
``[B, patches]``: for each patch, the token now carrying it (-1: dropped without fusion).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'num_kept_tokens', 'head_averaged_class_row', 'scaled_logits', 'averaged_softmax', 'class_attention', 'mean_received_row',
    'mean_received_log_row',
    'mean_received_attention', 'pool_attention', 'keep_and_fuse', 'reorganize_tokens', 'reorganize',
    'size_key_bias', 'bias_as', 'log_sizes_after', 'size_weighted_pool',
    'trace_token_patch_ids', 'trace_patch_token_index', 'tokens_to_patch_grid', 'rotary_rows_for_tokens',
]


def num_kept_tokens(keep_rate: float, num_tokens: int) -> int:
    """Number of attentive tokens a reorganising block keeps: ``ceil(keep_rate * num_tokens)``.

    ``num_tokens`` counts every non-class token present, an earlier fused token included. The
    product is taken in Python float (float64), as in the official code, so parity includes its
    rounding (``0.7 * 100`` rounds to exactly 70.0: 70 kept). Since ``keep_rate > 0`` the result
    is at least 1: a rate that would leave zero tokens keeps one.
    """
    return math.ceil(keep_rate * num_tokens)


def head_averaged_class_row(attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Class token's attention probabilities to the non-prefix tokens, averaged over heads.

    ``attn`` holds softmax rows ``[B, H, Q, N]`` whose first row is the class token's (Q may be 1).
    Returns ``[B, N - P]``; the prefix columns are dropped without renormalising.
    """
    return attn[:, :, 0, num_prefix_tokens:].mean(dim=1)


def scaled_logits(
        q: torch.Tensor,
        k_t: torch.Tensor,
        scale: float,
        key_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention logits ``scale * q @ k_t`` plus ``key_bias`` where given. Without a bias as timm's
    unfused attention makes them (the query scaled first); with one the scale rides in the add, one
    operation (a GPU launch) fewer, on the unscaled ``q @ k_t`` (in fp16 finite while the scaled
    logits stay below 65504 times the scale: 8188 for 64-wide heads, far past a one-hot softmax)."""
    if key_bias is None:
        return (q * scale) @ k_t
    return torch.add(key_bias, q @ k_t, alpha=scale)


def averaged_softmax(logits: torch.Tensor, dims: Tuple[int, ...], log_space: bool = False) -> torch.Tensor:
    """The softmax over the last dim of ``logits``, averaged over ``dims``; with ``log_space`` its
    log up to a constant (``log_softmax``, then ``logsumexp`` over ``dims``, in float32 at least;
    under FX's symbolic trace, which knows no dtype, float32): exact where the probabilities
    themselves underflow (peaky attention, fp16, bf16)."""
    if not log_space:
        return logits.softmax(dim=-1).mean(dim=dims)
    return logits.log_softmax(dim=-1, dtype=_wide(logits.dtype)).logsumexp(dim=dims)


def class_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        num_prefix_tokens: int = 1,
        key_bias: Optional[torch.Tensor] = None,
        log_space: bool = False,
) -> torch.Tensor:
    """Head-averaged class-token attention ``[B, N - P]`` from ``q, k`` of shape ``[B, H, N, D]``.

    Computes only the class query's row (``[B, H, 1, N]``), never the ``N x N`` matrix, for use
    beside a fused attention kernel that does not expose its probabilities. ``key_bias``
    ``[B, 1, 1, N]`` is added to the logits (``size_key_bias``). ``log_space``: its log up to a
    constant (the log-score size-aware fusion takes, ``averaged_softmax``).
    """
    logits = scaled_logits(q[:, :, :1], k.transpose(-2, -1), scale, key_bias)
    # (mean over heads and the one query: no select of the row first)
    return averaged_softmax(logits, (1, 2), log_space)[:, num_prefix_tokens:]


def _floored_log(received: torch.Tensor) -> torch.Tensor:
    # the log of a sum of probabilities; where it underflowed to 0 the floor weighs such tokens alike
    return received.clamp_min(torch.finfo(received.dtype).tiny).log()


def mean_received_row(attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """The ``'mean'`` score from softmax rows ``[B, H, N, N]``: the attention each non-prefix token
    receives, averaged over heads and over every query present, ``[B, N - P]`` (not renormalised)."""
    return attn.mean(dim=(1, 2))[:, num_prefix_tokens:]


def mean_received_log_row(
        logits: torch.Tensor,
        num_prefix_tokens: int = 1,
        query_log_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ``'mean'`` log-score (``mean_received_row``'s log up to a constant) from the attention
    logits ``[B, H, N, N]``, in float32 at least: ``logsumexp`` of the ``log_softmax`` rows over
    heads and queries, exact where the probabilities underflow. ``query_log_weights`` ``[B, N]``
    (the log of the tokens' sizes) weight the queries: a token of size ``s`` counts as ``s``
    queries."""
    log_probs = logits.log_softmax(dim=-1, dtype=_wide(logits.dtype))
    if query_log_weights is not None:   # (normalised: their log_softmax)
        log_probs = log_probs + _as(query_log_weights.log_softmax(dim=1), log_probs.dtype)[:, None, :, None]
    return log_probs.logsumexp(dim=(1, 2))[:, num_prefix_tokens:]


def mean_received_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        num_prefix_tokens: int = 1,
        max_chunk_elements: int = 1 << 20,
        key_bias: Optional[torch.Tensor] = None,
        query_log_weights: Optional[torch.Tensor] = None,
        log_space: bool = False,
) -> torch.Tensor:
    """``mean_received_row`` from ``q, k`` ``[B, H, N, D]``, for use beside a fused attention kernel:
    the softmax rows are made a chunk of queries at a time (at most ``max_chunk_elements``
    probabilities per image, 4 MB in float32), summed over heads and queries, and dropped, so no
    ``[B, H, N, N]`` buffer exists where ``N`` is large. Its matmuls are ``q k^T`` once more.
    ``key_bias``, ``query_log_weights`` and ``log_space`` as in ``class_attention`` and
    ``mean_received_log_row``; the log-score, in float32, is the floored log of the float32 sums
    of float32 probabilities (a token whose received attention underflowed even there, below
    1e-38, weighs as the floor: such tokens alike).

    The chunks depend on ``H`` and ``N`` only, never on the batch: a graph traced at one batch
    (ONNX, ``torch.export`` with a dynamic batch) holds the same chunks at every batch. The sum is
    kept in float32 (in bf16 or fp16 a sum over thousands of probabilities loses the small ones)."""
    _, H, N, _ = q.shape
    rows = max(1, max_chunk_elements // max(1, H * N))
    k_t = k.transpose(-2, -1)
    wide = _wide(q.dtype)
    received = None
    w = None
    if query_log_weights is not None:   # normalised first: no sum of sizes times probabilities grows large
        w = query_log_weights.softmax(dim=1, dtype=wide)
    for start in range(0, N, rows):
        logits = scaled_logits(q[:, :, start:start + rows], k_t, scale, key_bias)
        probs = logits.softmax(dim=-1, dtype=wide) if log_space else logits.softmax(dim=-1)
        if w is None:
            part = probs.sum(dim=(1, 2), dtype=wide)
        else:
            part = (probs.sum(dim=1, dtype=wide) * w[:, start:start + rows, None]).sum(dim=1)
        received = part if received is None else received + part
    if log_space:   # (the division by the count is a constant the log-score leaves out)
        return _floored_log(received)[:, num_prefix_tokens:]
    total = H * N if w is None else H
    return (received[:, num_prefix_tokens:] / total).to(q.dtype)


def pool_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        num_prefix_tokens: int = 1,
        key_bias: Optional[torch.Tensor] = None,
        log_space: bool = False,
) -> torch.Tensor:
    """The ``'pool'`` score: an attention pool's latent queries ``q`` ``[B or 1, H, L, D]`` against
    the tokens' keys ``k`` ``[B, H, N, D]``, softmax over all ``N`` tokens, averaged over heads and
    latents, at the non-prefix columns: ``[B, N - P]``. ``key_bias`` and ``log_space`` as in
    ``class_attention``."""
    logits = scaled_logits(q, k.transpose(-2, -1), scale, key_bias)
    return averaged_softmax(logits, (1, 2), log_space)[:, num_prefix_tokens:]


def keep_and_fuse(
        x: torch.Tensor,
        score: torch.Tensor,
        kept_idx: torch.Tensor,
        fuse: bool,
        num_prefix_tokens: int = 1,
        weighted_mean: bool = False,
) -> torch.Tensor:
    """The one place where tokens are kept and fused (docs/design.md, "EViT, exactly").

    Args:
        x: tokens ``[B, P + n, C]``, the ``P`` prefix tokens (class token first) before the others.
        score: the score of the ``n`` others ``[B, n]`` (``class_attention``, ``mean_received_attention``,
            ``pool_attention``): the fusion weights.
        kept_idx: ``[B, K]`` the tokens to keep, in their new order (indices into the ``n``; ``K < n``:
            the fused token has at least one token to fuse).
        fuse: append one fused token after the kept ones: ``sum_j a_j * x_j`` over the dropped ``j``
            (raw weights, the paper's).
        weighted_mean: the fused token is ``sum_j a_j x_j / sum_j a_j`` instead (size-aware fusion,
            docs/design.md, "A fused token that keeps its size"), from ``score`` holding log-scores
            (``log a_j`` up to a constant, ``log_space``): the weights are the softmax of the
            dropped tokens' log-scores, so no division is taken and nothing underflows to 0 / 0.

    Returns ``[prefix..., kept..., (fused)]``: ``[B, P + K (+ 1), C]``.
    """
    parts = [x[:, :num_prefix_tokens], _non_prefix_rows(x, kept_idx, num_prefix_tokens)]
    if fuse:
        # the score with the kept tokens left out: the fused token is one batched matmul, with no
        # complement index and no second gather
        if weighted_mean:
            weights = score.scatter(1, kept_idx, -math.inf).softmax(dim=1)
        else:
            weights = score.scatter(1, kept_idx, 0.)
        parts.append(_as(weights, x.dtype).unsqueeze(1) @ x[:, num_prefix_tokens:])
    return torch.cat(parts, dim=1)


def _wide(dtype: torch.dtype) -> torch.dtype:
    # the precision of a sum over many small weights: float32 at least (plain Python, no operation)
    if isinstance(dtype, torch.fx.Proxy):   # (FX's symbolic trace: the dtype is not known there)
        return torch.float32
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a conversion only where the dtype differs: each call is an operation (a GPU launch) even when it copies nothing
    if isinstance(t, torch.fx.Proxy):   # (FX's symbolic trace: the dtype is not known there)
        return t.to(dtype)
    return t if t.dtype == dtype else t.to(dtype)


def reorganize_tokens(
        x: torch.Tensor,
        score: torch.Tensor,
        num_keep: int,
        fuse_token: bool,
        num_prefix_tokens: int = 1,
        weighted_mean: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``num_keep`` highest-scored tokens of every image, ordered by score descending
    (``topk(sorted=True)``), and, with ``fuse_token``, fuse the rest into one (``keep_and_fuse``,
    whose arguments these are).

    Returns ``([prefix..., kept..., (fused)], kept_idx)``; ``kept_idx`` ``[B, num_keep]`` indexes the
    ``n`` non-prefix tokens of ``x``.
    """
    _, kept_idx = score.topk(num_keep, dim=1, largest=True, sorted=True)
    x = keep_and_fuse(x, score, kept_idx, fuse_token, num_prefix_tokens, weighted_mean)
    return x, kept_idx


def _non_prefix_rows(x: torch.Tensor, idx: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The non-prefix tokens ``idx`` ``[B, k]`` of ``x`` ``[B, P + n, C]``: ``[B, k, C]``.

    Rows of x flattened to [B * N, C], taken by one index_select: it copies whole rows, where a
    gather with the index expanded over channels goes element by element (3x slower at batch 1,
    over 10x at batch 32 on a CPU). Few operations: at batch 1 each one's fixed cost is what this
    step costs. (The range's end leaves an empty batch no rows.)"""
    B, N, C = x.shape
    rows = idx + torch.arange(num_prefix_tokens, B * N + num_prefix_tokens, N, device=x.device).unsqueeze(1)
    return x.reshape(B * N, C).index_select(0, rows.flatten()).view(B, idx.shape[1], C)


def reorganize(
        x: torch.Tensor,
        score: torch.Tensor,
        keep_rate: float,
        fuse_token: bool,
        num_prefix_tokens: int = 1,
        weighted_mean: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block's reorganisation under its budget (docs/design.md, "Budgets"): every image keeps
    ``num_kept_tokens(keep_rate, n)`` (``reorganize_tokens``, whose arguments these are). Where that
    is every token nothing happens: ``x`` is returned with the identity as kept indices, so that
    callers need no branch.

    Returns the tokens and the kept indices ``[B, K]`` into the ``n`` non-prefix tokens of ``x``.
    """
    B, n = score.shape
    num_keep = num_kept_tokens(keep_rate, n)
    if num_keep >= n:
        return x, torch.arange(n, device=x.device).expand(B, -1)
    return reorganize_tokens(x, score, num_keep, fuse_token, num_prefix_tokens, weighted_mean)


def size_key_bias(log_sizes: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The tokens' ``log(size)`` as a key bias ``[B, 1, 1, P + n]`` (prefix tokens: size 1, bias 0),
    for attention logits ``[B, H, queries, P + n]``: a token of size ``s`` is attended to as ``s``
    copies of itself (ToMe's proportional attention). ``log_sizes`` ``[B, n]``; the bias keeps their
    dtype (``bias_as``)."""
    bias = F.pad(log_sizes, (num_prefix_tokens, 0))
    return bias.view(bias.shape[0], 1, 1, bias.shape[1])


def bias_as(key_bias: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``key_bias`` in ``like``'s dtype, converted only where it differs (each conversion is one
    more operation, and a GPU launch, per block)."""
    return key_bias if key_bias is None else _as(key_bias, like.dtype)


def log_sizes_after(
        log_sizes: Optional[torch.Tensor],
        kept_idx: torch.Tensor,
        fused: bool,
        num_patches: int,
) -> torch.Tensor:
    """The log of the sizes (patches each token stands for) after a reorganisation, float32: each
    kept token keeps its size and, where the block made a fused slot (``fused``: the last token),
    it holds the patches of the dropped ones (the sizes always sum to ``num_patches``):
    ``[B, num_keep (+1)]``. ``log_sizes`` ``[B, n]`` before the block (None: every token has size
    1). Carried as logs: the key bias is their padding, a pooling's weights their softmax, and the
    fused slot's is one ``logsumexp``."""
    if log_sizes is None:   # every token one patch: the fused slot holds the rest, a number known here
        kept = kept_idx.new_zeros(kept_idx.shape, dtype=torch.float32)
        return F.pad(kept, (0, 1), value=math.log(num_patches - kept_idx.shape[1])) if fused else kept
    kept = log_sizes.gather(1, kept_idx)
    if not fused:
        return kept
    dropped = log_sizes.scatter(1, kept_idx, -math.inf).logsumexp(dim=1, keepdim=True)
    return torch.cat([kept, dropped], dim=1)


def size_weighted_pool(
        x: torch.Tensor,
        log_sizes: torch.Tensor,
        pool_type: str,
        num_prefix_tokens: int,
        include_prefix: bool = False,
) -> torch.Tensor:
    """timm's ``avg`` / ``avgmax`` / ``max`` pooling of tokens ``[B, P + n, C]`` where each non-prefix
    token stands for ``exp(log_sizes)`` ``[B, n]`` patches (prefix tokens, where included, for one):
    the mean is weighted by size (the mean over the patches), the max is over the tokens."""
    if include_prefix:
        log_sizes = F.pad(log_sizes, (num_prefix_tokens, 0))
    else:
        x = x[:, num_prefix_tokens:]
    if pool_type in ('max', 'avgmax'):
        peak = x.amax(dim=1)
    if pool_type == 'max':
        return peak
    # the weights normalised (the softmax of the log sizes, in their own precision, float32): no sum
    # of sizes times tokens grows large in half precision
    weights = _as(log_sizes.softmax(dim=1), x.dtype)
    mean = (weights.unsqueeze(1) @ x).squeeze(1)
    if pool_type == 'avg':
        return mean
    if pool_type == 'avgmax':
        return 0.5 * (peak + mean)
    raise ValueError(f"pool_type must be 'avg', 'avgmax' or 'max', got {pool_type!r}")


def trace_token_patch_ids(token_patch_ids: torch.Tensor, kept_idx: torch.Tensor, fused: bool) -> torch.Tensor:
    """``token_patch_ids`` after a reorganisation: the patch each token came from (-1: fused).

    ``token_patch_ids`` ``[B, n]`` holds it for the non-prefix tokens before the block; the result
    ``[B, num_keep (+1)]`` after it, where ``fused`` says the block made a fused slot (last).
    """
    ids = token_patch_ids.gather(1, kept_idx)
    if fused:
        ids = F.pad(ids, (0, 1), value=-1)
    return ids


def trace_patch_token_index(
        patch_token_index: torch.Tensor,
        kept_idx: torch.Tensor,
        num_tokens: int,
        fused: bool,
) -> torch.Tensor:
    """``patch_token_index`` after a reorganisation: the token now carrying each patch (-1: none).

    ``patch_token_index`` ``[B, patches]`` indexes the ``num_tokens`` non-prefix tokens before the
    block. A kept token moves to its slot; a dropped one is carried by the fused slot (index
    ``num_keep``, where ``fused``) or by none (-1). Composing this per block traces every patch
    through all stages.
    """
    B, num_keep = kept_idx.shape
    # remap[b, j]: new index of old token j; the extra last column sends -1 to -1.
    remap = kept_idx.new_full((B, num_tokens + 1), num_keep if fused else -1)
    ranks = torch.arange(num_keep, device=kept_idx.device).expand(B, -1)
    remap.scatter_(1, kept_idx, ranks)
    remap[:, num_tokens] = -1
    old = torch.where(patch_token_index < 0, num_tokens, patch_token_index)
    return remap.gather(1, old)


def tokens_to_patch_grid(tokens: torch.Tensor, patch_token_index: torch.Tensor) -> torch.Tensor:
    """Put tokens ``[B, n, C]`` back on the patches: ``[B, patches, C]``.

    Each patch gets the token that carries it (``trace_patch_token_index``): its own token if
    kept, the fused token it went into, or zeros if it was dropped without fusion.
    """
    C = tokens.shape[-1]
    dropped = patch_token_index < 0
    grid = tokens.gather(1, patch_token_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, C))
    return grid.masked_fill(dropped.unsqueeze(-1), 0.)


def rotary_rows_for_tokens(rope: torch.Tensor, token_patch_ids: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding for the tokens that remain: each keeps its patch's rotation.

    ``rope`` is timm's concatenated layout (last dim ``[sin | cos]``, what ``apply_rot_embed_cat``
    splits in two halves) for the ``N`` tokens entering the blocks: ``[N, 2D]`` or ``[H, N, 2D]``
    shared by the batch, or ``[B, 1 or H, N, 2D]`` per image. ``token_patch_ids`` ``[B, n]`` gives
    the patch (entering token) each remaining one came from (-1: a fused token, which like a prefix token
    gets no rotation: sin 0, cos 1). Returns ``[B, 1 or H, n, 2D]``: per image, since images keep
    different tokens.
    """
    B = token_patch_ids.shape[0]
    while rope.ndim < 4:   # [N, 2D] -> [1, 1, N, 2D]; [H, N, 2D] -> [1, H, N, 2D]
        rope = rope.unsqueeze(0)
    rope = rope.expand(B, -1, -1, -1)
    heads, num_rows, width = rope.shape[1], rope.shape[2], rope.shape[3]
    identity = torch.cat([rope.new_zeros(width // 2), rope.new_ones(width - width // 2)])
    # the identity rotation as an extra last row, where fused tokens (-1) point
    rope = torch.cat([rope, identity.expand(B, heads, 1, width)], dim=2)
    rows = torch.where(token_patch_ids < 0, num_rows, token_patch_ids)
    return rope.gather(2, rows[:, None, :, None].expand(-1, heads, -1, width))
