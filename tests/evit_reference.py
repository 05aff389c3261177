"""An independent, plain EViT reference for the tests: materialised attention, one image at a
time, Python loops for the selection (docs/design.md, "EViT, exactly"). Reads timm-style state
dicts."""
import math

import torch
import torch.nn.functional as F


def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + '.weight'], sd[name + '.bias'], eps=eps)


def _linear(x, sd, name):
    bias = sd.get(name + '.bias')
    return x @ sd[name + '.weight'].T + (0 if bias is None else bias)


def deit_patch_tokens(sd, image, patch_size):
    """Patch embedding of one image [3, H, W]: a strided convolution -> [P, C]."""
    x = F.conv2d(image[None], sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch_size)
    return x.flatten(2)[0].T


def most_attentive_first(block, a, num_keep):
    """The reference's own choice: the ``num_keep`` largest of ``a``, in descending order."""
    return sorted(range(len(a)), key=lambda j: a[j], reverse=True)[:num_keep]


def checked_choice(model_kept, rel_tol=1e-5):
    """A ``choose`` that adopts the model's kept tokens ``model_kept[block]`` (a list of token
    indices) after checking them against the reference's own attention ``a``: exactly ``num_keep``
    distinct tokens, in descending order of ``a`` and none less attended than a dropped one, up to
    ``rel_tol * max(a)``. Two numerical paths (SDPA against this materialised softmax, another
    CPU's vector width) may order tokens whose attention differs by a few ulps either way; such
    near-ties are all this tolerance forgives (docs/design.md, "Testing")."""
    def choose(block, a, num_keep):
        kept = list(model_kept[block])
        assert len(kept) == num_keep, f'block {block}: kept {len(kept)} tokens, ceil rule says {num_keep}'
        assert len(set(kept)) == num_keep and all(0 <= j < len(a) for j in kept), f'block {block}: bad indices'
        tol = rel_tol * max(a)
        for rank, (first, second) in enumerate(zip(kept, kept[1:])):
            assert a[first] >= a[second] - tol, \
                f'block {block}: kept token at rank {rank} is less attended than the next ({a[first]} < {a[second]})'
        dropped = set(range(len(a))) - set(kept)
        if dropped:
            assert min(a[j] for j in kept) >= max(a[j] for j in dropped) - tol, \
                f'block {block}: a dropped token is more attended than a kept one'
        return kept
    return choose


def reference_forward(sd, image, num_heads, patch_size, keep_rates, fuse_token, choose=most_attentive_first):
    """DeiT + EViT: logits for one image [3, H, W], the non-class tokens after every block, events."""
    x, block_tokens, events, _ = reference_tokens(
        sd, deit_patch_tokens(sd, image, patch_size), num_heads, keep_rates, fuse_token, choose=choose)
    return _linear(x[0], sd, 'head'), block_tokens, events


def reference_tokens(sd, patch_tokens, num_heads, keep_rates, fuse_token, eps=1e-6, skip_lam=1.0,
                     choose=most_attentive_first):
    """The transformer with EViT, one image: final normed tokens [1 + n, C], the non-class tokens
    after every block (in order), what happened to fused tokens, and which final tokens are fused.

    ``keep_rates`` maps block index -> keep rate; residual branches are divided by ``skip_lam``.
    ``choose(block, a, num_keep)`` gives the kept tokens in order (``most_attentive_first``, or a
    model's choice checked against ``a`` by ``checked_choice``).
    """
    x = torch.cat([sd['cls_token'][0], patch_tokens]) + sd['pos_embed'][0]
    is_fused = [False] * (x.shape[0] - 1)
    block_tokens, events = [], {'fused_kept': 0, 'fused_refused': 0}
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    for i in range(depth):
        p = f'blocks.{i}.'
        h = _ln(x, sd, p + 'norm1', eps)
        q, k, v = _linear(h, sd, p + 'attn.qkv').chunk(3, dim=-1)
        head_dim = q.shape[-1] // num_heads
        outs, cls_rows = [], []
        for hd in range(num_heads):
            s = slice(hd * head_dim, (hd + 1) * head_dim)
            attn = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(head_dim), dim=-1)   # N x N, materialised
            outs.append(attn @ v[:, s])
            cls_rows.append(attn[0, 1:])
        x = x + _linear(torch.cat(outs, dim=-1), sd, p + 'attn.proj') / skip_lam

        n = x.shape[0] - 1
        if i in keep_rates and math.ceil(keep_rates[i] * n) < n:
            num_keep = math.ceil(keep_rates[i] * n)
            a = [sum(float(row[j]) for row in cls_rows) / num_heads for j in range(n)]
            kept = choose(i, a, num_keep)
            dropped = sorted(set(range(n)) - set(kept))
            tokens = [x[0]] + [x[1 + j] for j in kept]
            events['fused_kept'] += sum(is_fused[j] for j in kept)
            events['fused_refused'] += sum(is_fused[j] for j in dropped) if fuse_token else 0
            new_is_fused = [is_fused[j] for j in kept]
            if fuse_token:
                fused = torch.zeros_like(x[0])
                for j in dropped:
                    fused = fused + a[j] * x[1 + j]
                tokens.append(fused)
                new_is_fused.append(True)
            x, is_fused = torch.stack(tokens), new_is_fused

        h = _ln(x, sd, p + 'norm2', eps)
        x = x + _linear(F.gelu(_linear(h, sd, p + 'mlp.fc1')), sd, p + 'mlp.fc2') / skip_lam
        block_tokens.append(x[1:])
    return _ln(x, sd, 'norm', eps), block_tokens, events, is_fused


def score_from_probabilities(score, head_probs, num_prefix_tokens, queries=None, query_sizes=None):
    """A block's score of its non-prefix tokens (floats) from its softmax rows, one [N, N] per head
    (docs/design.md, "What ranks the tokens"): ``'class'`` the class row, ``'mean'`` the attention
    each token receives from the ``queries`` present (row indices; None: every row), both averaged
    over heads, a query of size ``query_sizes[i]`` counted that many times (None: once);
    ``'pool'`` is not read from the block's attention (None)."""
    if score == 'pool':
        return None
    rows = [0] if score == 'class' else range(head_probs[0].shape[0]) if queries is None else queries
    weight = {i: 1. if query_sizes is None or score == 'class' else float(query_sizes[i]) for i in rows}
    a = []
    for j in range(num_prefix_tokens, head_probs[0].shape[1]):
        received = sum(weight[i] * float(probs[i, j]) for probs in head_probs for i in rows)
        a.append(received / (len(head_probs) * sum(weight.values())))
    return a


def choice_for_block(block, a, n, keep_rates, choose):
    """The tokens one image keeps in ``block`` (None: no reorganisation there): a fixed count
    ``ceil(rate * n)`` where ``keep_rates`` has the block, taken by ``choose``. ``a``: a callable
    giving the block's scores (read only where the block reorganises)."""
    if block in keep_rates and math.ceil(keep_rates[block] * n) < n:
        scores = a()
        return choose(block, scores, math.ceil(keep_rates[block] * n)), scores
    return None


def size_bias(num_prefix_tokens, sizes):
    """The key bias [N] of size-aware attention: 0 for a prefix token, ``log(size)`` for the others."""
    return torch.tensor([0.] * num_prefix_tokens + [math.log(s) for s in sizes])


def reorganise_by_hand(x, num_prefix_tokens, a, kept, fuse_token, fusion, sizes):
    """One image's tokens ``x`` [N, C] after a reorganisation that keeps ``kept`` (in order): the
    prefix tokens, the kept ones and, with fusion, the dropped ones fused: ``sum a_j x_j`` (the paper)
    or ``sum a_j x_j / sum a_j`` carrying the sum of their sizes (``'size'``). Returns the tokens
    and the sizes of the non-prefix ones."""
    P, n = num_prefix_tokens, x.shape[0] - num_prefix_tokens
    tokens = [x[j] for j in range(P)] + [x[P + j] for j in kept]
    new_sizes = [sizes[j] for j in kept]
    if fuse_token:
        dropped = sorted(set(range(n)) - set(kept))
        total = sum(a[j] for j in dropped) if fusion == 'size' else 1.
        fused = torch.zeros_like(x[0])
        for j in dropped:
            fused = fused + (a[j] / total) * x[P + j]
        tokens.append(fused)
        new_sizes.append(sum(sizes[j] for j in dropped))
    return torch.stack(tokens), new_sizes


def timm_forward_head(model, x):
    """timm's own ``forward_head`` of the timm class the model converts (not EViT's)."""
    timm_cls = next(cls for cls in type(model).__mro__ if cls.__module__.startswith('timm.'))
    return timm_cls.forward_head(model, x)


def head_by_hand(model, x, sizes, fusion):
    """The model's head on one image's final tokens ``x`` [1, N, C], with size-aware pooling
    (``fusion='size'``): ``avg`` the mean over the non-prefix tokens weighted by their sizes, an
    attention pool with ``log(size)`` added to its keys' logits; ``token`` pooling reads the class
    token. Otherwise timm's own head."""
    P = model.num_prefix_tokens
    pool = getattr(model, 'attn_pool', None)
    if fusion != 'size' or (pool is None and model.global_pool != 'avg'):
        return timm_forward_head(model, x)[0]
    if pool is not None:
        sees_prefix = getattr(model, 'pool_include_prefix', True)   # Eva's pool sees every token
        tokens = x if sees_prefix else x[:, P:]
        bias = size_bias(P if sees_prefix else 0, sizes)
        pooled = pool(tokens, attn_mask=bias.view(1, 1, 1, -1))
    else:
        w = torch.tensor(sizes, dtype=x.dtype)
        pooled = sum(w[j] * x[0, P + j] for j in range(len(sizes)))[None] / w.sum()
    return model.head(model.head_drop(model.fc_norm(pooled)))[0]


def pool_score_by_hand(model, x, num_prefix_tokens, key_bias=None):
    """The ``'pool'`` score of one image's tokens ``x`` [N, C] (floats): the model's attention pool,
    its own modules, head by head: its latent queries against ``norm(x)`` keyed by its ``kv``,
    softmax over the tokens (``key_bias`` [N] added: -inf masks a token out), averaged over heads
    and the latents whose output the pool keeps (the first where it returns that one, 'token')."""
    pool = model.attn_pool
    width = pool.num_heads * pool.head_dim
    latents = pool.latent[0, :1] if pool.pool == 'token' else pool.latent[0]
    q = pool.q(latents)                                          # [latents, width]
    k = pool.kv(model.norm(x[None])[0])[:, :width]               # the keys: first half of kv
    rows = []
    for hd in range(pool.num_heads):
        s = slice(hd * pool.head_dim, (hd + 1) * pool.head_dim)
        logits = pool.q_norm(q[:, s]) @ pool.k_norm(k[:, s]).T * pool.scale
        if key_bias is not None:
            logits = logits + key_bias
        rows.extend(torch.softmax(logits, dim=-1))
    return [sum(float(row[j]) for row in rows) / len(rows) for j in range(num_prefix_tokens, x.shape[0])]


def _attention_by_hand(blk, x, num_prefix_tokens, key_bias=None, score='class', queries=None, query_sizes=None):
    """A timm Block's attention for one image ``x`` [N, C], materialised head by head with its own
    layers (qkv, q/k norms, scale norm, gate, proj): the output [N, C] and the block's ``score`` of
    the non-prefix tokens (``score_from_probabilities``; a list of floats, None for ``'pool'``).
    ``key_bias`` [N] is added to every row's logits (-inf: a key masked out)."""
    attn = blk.attn
    h = blk.norm1(x[None])[0]
    q, k, v = attn.qkv(h).chunk(3, dim=-1)
    head_dim = q.shape[-1] // attn.num_heads
    outs, head_probs = [], []
    for hd in range(attn.num_heads):
        s = slice(hd * head_dim, (hd + 1) * head_dim)
        logits = attn.q_norm(q[:, s]) @ attn.k_norm(k[:, s]).T * attn.scale
        if key_bias is not None:
            logits = logits + key_bias
        probs = torch.softmax(logits, dim=-1)
        outs.append(probs @ v[:, s])
        head_probs.append(probs)
    out = attn.norm(torch.cat(outs, dim=-1))
    if getattr(attn, 'gate', None) is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj(out), score_from_probabilities(score, head_probs, num_prefix_tokens, queries, query_sizes)


def reference_timm_vit(model, image, keep_rates, fuse_token, choose=most_attentive_first, score='class',
                       fusion='paper'):
    """EViT on a timm ViT of ``Block`` blocks, one image [3, H, W]: the model's own embedding and
    per-token layers (norms, MLP, LayerScale, head), attention materialised head by head, selection
    by ``score`` and fusion in Python loops. Returns the logits and, per block, the tokens after it
    [N_i, C] (prefix tokens first). ``keep_rates`` maps block index -> keep rate. ``fusion='size'``:
    every token carries its size, attention to it gets ``+ log(size)``, ``'mean'`` counts it as
    ``size`` queries, the head pools by size (docs/design.md, "A fused token that keeps its size")."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    sizes = [1.] * (x.shape[0] - P)
    block_tokens = []
    for i, blk in enumerate(model.blocks):
        sized = fusion == 'size'
        bias = size_bias(P, sizes) if sized else None
        attn_out, a = _attention_by_hand(blk, x, P, bias, score, query_sizes=[1.] * P + sizes if sized else None)
        x = x + blk.ls1(attn_out)
        scores = (lambda: pool_score_by_hand(model, x, P, key_bias=bias)) if score == 'pool' else (lambda: a)
        choice = choice_for_block(i, scores, x.shape[0] - P, keep_rates, choose)
        if choice is not None:
            kept, a = choice
            x, sizes = reorganise_by_hand(x, P, a, kept, fuse_token, fusion, sizes)
        x = x + blk.ls2(blk.mlp(blk.norm2(x[None]))[0])
        block_tokens.append(x)
    return head_by_hand(model, model.norm(x[None]), sizes, fusion), block_tokens


def masked_reference_timm_vit(plain, image, keep_rates, choose=most_attentive_first, score='class'):
    """EViT without fusion as masking (docs/design.md, "EViT on any timm ViT"): the *unconverted*
    timm model ``plain`` (a VisionTransformer or an Eva), its own block forward, where a dropped
    token is masked out of all later attention instead (an MLP works per token); an Eva's blocks
    get timm's rotary embedding of all the tokens, as in timm. The ``score`` is read from the
    attention under the mask so far, over the queries still alive (``'pool'``: the model's pool
    with the dropped keys masked). Pooling leaves the dropped tokens out (``_masked_head``).
    Returns the logits and, per block, the indices of the tokens alive after it (into the
    sequence entering the first block) in the order EViT would hold them."""
    P = plain.num_prefix_tokens
    rope = None
    if hasattr(plain, 'rope'):                                  # timm's Eva
        x, rope = _eva_embedded(plain, image, None)
        x = x[None]
    else:
        x = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(image[None]))))
    alive = list(range(x.shape[1] - P))       # non-prefix tokens, in EViT's order
    bias = torch.zeros(x.shape[1])
    alive_after = []
    for i, blk in enumerate(plain.blocks):
        rope_kwargs = {}
        if rope is not None:
            rows = rope[i if rope.shape[0] > 1 else 0]             # [H or 1, N - P, 2D]
            rope_kwargs = dict(rope=rows if getattr(plain, 'rope_mixed', False) else rows[0])   # as timm passes it
        mask = bias.view(1, 1, 1, -1).expand(1, 1, x.shape[1], -1)
        n = len(alive)
        if i in keep_rates and math.ceil(keep_rates[i] * n) < n:
            # the selection reads this block's attention under the mask so far, from the live queries
            queries = list(range(P)) + [P + j for j in alive]
            if rope is None:
                attn_out, a_all = _attention_by_hand(blk, x[0], P, bias, score, queries)
                residual = blk.ls1(attn_out)
            else:
                attn_out, a_all = _eva_attention_by_hand(
                    blk, x[0], P, [rows[:, j] for j in range(rows.shape[1])], bias, score, queries)
                residual = _scaled(blk.gamma_1, attn_out)
            if score == 'pool':
                a_all = pool_score_by_hand(plain, x[0] + residual, P, key_bias=bias)
            a = [a_all[j] for j in alive]
            kept = choose(i, a, math.ceil(keep_rates[i] * n))
            # this block's attention still sees every token alive before it; later blocks do not
            x = blk(x, attn_mask=mask, **rope_kwargs)
            bias = bias.clone()
            for j in set(range(n)) - set(kept):
                bias[P + alive[j]] = float('-inf')
            alive = [alive[j] for j in kept]
        else:
            x = blk(x, attn_mask=mask, **rope_kwargs)
        alive_after.append(list(alive))
    return _masked_head(plain, plain.norm(x), bias), alive_after


def _masked_head(plain, x, bias):
    """timm's ``forward_head`` of one image's final tokens ``x`` [1, N, C] with the tokens whose
    ``bias`` is -inf left out of the pooling: ``map`` masks them out of the pool's keys, ``avg``
    averages the others; ``token`` pooling reads prefix tokens only, which are never dropped."""
    P = plain.num_prefix_tokens
    if getattr(plain, 'attn_pool', None) is not None:
        pooled = plain.attn_pool(x, attn_mask=bias.view(1, 1, 1, -1))
    elif plain.global_pool == 'avg':
        alive = torch.isfinite(bias[P:]).to(x.dtype)
        pooled = (x[:, P:] * alive[None, :, None]).sum(dim=1) / alive.sum()
    else:
        assert plain.global_pool == 'token', plain.global_pool
        return plain.forward_head(x)[0]
    return plain.head(plain.head_drop(plain.fc_norm(pooled)))[0]


def kept_indices_by_block(model, images):
    """The model's logits, and the kept indices each block reported (through forward hooks, as a
    user would see them): ``{block: [B, num_keep]}``."""
    kept = {}

    def recorder(block):
        def hook(module, args, kwargs, output):
            if kwargs.get('kept_indices'):
                kept[block] = kwargs['kept_indices'][-1]
        return hook
    handles = [blk.register_forward_hook(recorder(i), with_kwargs=True) for i, blk in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, kept


def _rotate(x, sin, cos, half):
    """RoPE by hand for one head's vectors ``x`` [D] (docs/design.md, "EViT on any timm ViT": a
    token keeps its angles). ``half``: pairs are (i, i + D/2); else neighbours (2i, 2i + 1)."""
    if half:
        first, second = x.chunk(2)
        turned = torch.cat([-second, first])
    else:
        turned = torch.stack([-x[1::2], x[0::2]], dim=-1).flatten()
    return x * cos + turned * sin


def _eva_qkv_by_hand(attn, h):
    """q, k, v [N, H * D] of one image from an EvaAttention / AttentionRope's own weights."""
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, 'q_bias', None) is not None:      # EvaAttention: q and v biases, no k bias
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        out = h @ attn.qkv.weight.T + (0 if bias is None else bias)
        return out.chunk(3, dim=-1)
    assert getattr(attn, 'num_kv_heads', attn.num_heads) == attn.num_heads, 'grouped k/v heads: not in the reference'
    return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)


def _eva_attention_by_hand(blk, x, num_prefix_tokens, token_rope, key_bias=None, score='class', queries=None,
                           query_sizes=None):
    """An EvaBlock's attention for one image ``x`` [N, C], materialised head by head, RoPE applied
    token by token: ``token_rope[t]`` is the rotary row [H or 1, 2D] of non-prefix token ``t``
    (None: no rotation, as a prefix or fused token). Returns the output [N, C] and the block's
    ``score`` of the non-prefix tokens (``score_from_probabilities``)."""
    attn, P = blk.attn, num_prefix_tokens
    h = blk.norm1(x[None])[0]
    q, k, v = _eva_qkv_by_hand(attn, h)
    D = attn.head_dim
    half = getattr(attn, 'rotate_half', False)
    outs, head_probs = [], []
    for hd in range(attn.num_heads):
        s = slice(hd * D, (hd + 1) * D)
        qh, kh = attn.q_norm(q[:, s]), attn.k_norm(k[:, s])
        qr, kr = [qh[t] for t in range(P)], [kh[t] for t in range(P)]
        for t, row in enumerate(token_rope):
            if row is None:
                qr.append(qh[P + t]), kr.append(kh[P + t])
            else:
                sin, cos = row[hd if row.shape[0] > 1 else 0].chunk(2)
                qr.append(_rotate(qh[P + t], sin, cos, half)), kr.append(_rotate(kh[P + t], sin, cos, half))
        logits = torch.stack(qr) @ torch.stack(kr).T * attn.scale
        if key_bias is not None:
            logits = logits + key_bias
        probs = torch.softmax(logits, dim=-1)
        outs.append(probs @ v[:, s])
        head_probs.append(probs)
    out = attn.norm(torch.cat(outs, dim=-1))
    if getattr(attn, 'gate', None) is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj(out), score_from_probabilities(score, head_probs, P, queries, query_sizes)


def _eva_embedded(model, image, embedded):
    """Tokens [N, C] entering the blocks and the rotary rows [depth or 1, H or 1, N - P, 2D] (None: no RoPE)."""
    if embedded is None:
        x, rope = model._pos_embed(model.patch_embed(image[None]))
        embedded = model.norm_pre(x)[0], rope            # (in eval the rope has no batch dim)
    x, rope = embedded
    if rope is not None and not getattr(model, 'rope_mixed', False):
        rope = rope.reshape(1, 1, *rope.shape[-2:])      # one for every block and head
    return x, rope


def _scaled(gamma, y):
    return y if gamma is None else gamma * y


def reference_eva(model, image, keep_rates, fuse_token, choose=most_attentive_first, embedded=None, score='class',
                  fusion='paper'):
    """EViT on a timm Eva of EvaBlocks, one image [3, H, W] (or ``embedded``: its tokens [N, C] and
    rotary embedding as the model's ``_pos_embed`` gives them for this image): the model's own
    embedding and per-token layers, attention materialised head by head with RoPE applied token by
    token (every kept token keeps its patch's rotary row, a fused token none), selection and fusion
    in loops. Returns the logits and, per block, the tokens after it [N_i, C] (prefix tokens first).
    ``fusion`` as in ``reference_timm_vit``."""
    P = model.num_prefix_tokens
    x, rope = _eva_embedded(model, image, embedded)
    patch_of = list(range(x.shape[0] - P))             # the entering token each token came from; None: fused
    sizes = [1.] * len(patch_of)
    block_tokens = []
    for i, blk in enumerate(model.blocks):
        rows = None if rope is None else rope[i if rope.shape[0] > 1 else 0]
        token_rope = [None if rows is None or j is None else rows[:, j] for j in patch_of]
        sized = fusion == 'size'
        bias = size_bias(P, sizes) if sized else None
        attn_out, a = _eva_attention_by_hand(blk, x, P, token_rope, bias, score,
                                             query_sizes=[1.] * P + sizes if sized else None)
        x = x + _scaled(blk.gamma_1, attn_out)
        scores = (lambda: pool_score_by_hand(model, x, P, key_bias=bias)) if score == 'pool' else (lambda: a)
        choice = choice_for_block(i, scores, x.shape[0] - P, keep_rates, choose)
        if choice is not None:
            kept, a = choice
            x, sizes = reorganise_by_hand(x, P, a, kept, fuse_token, fusion, sizes)
            patch_of = [patch_of[j] for j in kept] + ([None] if fuse_token else [])
        x = x + _scaled(blk.gamma_2, blk.mlp(blk.norm2(x[None]))[0])
        block_tokens.append(x)
    return head_by_hand(model, model.norm(x[None]), sizes, fusion), block_tokens
