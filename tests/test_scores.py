"""``score``: what ranks the tokens, ``'class'``, ``'mean'`` or ``'pool'`` (docs/design.md, "What ranks
the tokens"), and EViT on timm's ViTs without a class token. The families without a class token
are in the family table (helpers.FAMILIES), where every family test runs them at their default
score; here: the other scores each family serves, against the same independent references, and
what is refused."""
import copy
import pickle

import pytest
import timm
import torch

import timm_evit.opaque as opaque
from evit_reference import masked_reference_timm_vit
from helpers import (
    FAMILIES, SMALL_VIT, check_against_family_reference, compare_with_reference, converted, family_params, images,
    randomise_weights,
)
from timm_evit.layers import PoolScore
from timm_evit.reorg import (
    class_attention, mean_received_attention, mean_received_log_row, mean_received_row, pool_attention,
)

# every score each family serves beyond its default (the default runs in every family test)
OTHER_SCORES = [
    pytest.param(family, score, id=f'{family}-{score}', marks=param.marks)
    for family, scores in [('deit', ['mean']), ('dinov2_reg', ['mean']), ('eva02', ['mean']), ('pe', ['mean', 'pool']),
                           ('siglip', ['mean']), ('pe_map', ['mean'])]
    for score in scores
    for param in family_params([family])
]


def scored(family, score, keep_rate, fuse_token, fused_attn=True):
    original, model = converted(family, keep_rate, fuse_token, fused_attn)
    model.score = score
    return original, model


@pytest.mark.parametrize('family,score', OTHER_SCORES)
def test_keep_rate_one_is_the_original_model_at_every_score(family, score):
    original, model = scored(family, score, 1.0, True)
    x = images(FAMILIES[family].size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
@pytest.mark.parametrize('fuse_token', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('family,score', OTHER_SCORES)
def test_every_score_against_the_stepped_reference(family, score, fuse_token, fused_attn):
    _, model = scored(family, score, 0.5, fuse_token, fused_attn)
    check_against_family_reference(model, family, images(FAMILIES[family].size))


@pytest.mark.parametrize('family,score', OTHER_SCORES)
def test_every_score_without_fusion_is_masking(family, score):
    original, model = scored(family, score, 0.5, False)
    x = images(FAMILIES[family].size)
    with torch.no_grad():
        ids = model.forward_intermediates(x, output_dict=True, intermediates_only=True)['token_patch_ids']
    rates = dict(zip(model.reorg_layers, model.keep_rate))

    def masked_reference(b, choose):
        ref, alive_after = masked_reference_timm_vit(original, x[b], rates, choose=choose, score=score)
        assert [ids_i[b].tolist() for ids_i in ids] == alive_after
        return ref
    compare_with_reference(model, x, masked_reference)


@pytest.mark.parametrize('max_chunk_elements', [1, 2 * 3 * 7 * 3, 1 << 22], ids=['row-by-row', 'uneven', 'whole'])
def test_the_received_attention_in_chunks_is_the_mean_of_the_whole_softmax(max_chunk_elements):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    whole = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)          # [B, H, N, N], materialised
    expected = whole.sum(dim=(1, 2))[:, 2:] / (3 * 7)                       # over heads and queries, P = 2
    torch.testing.assert_close(mean_received_attention(q, k, 0.5, 2, max_chunk_elements), expected)
    torch.testing.assert_close(mean_received_row(whole, 2), expected)


def test_a_score_the_model_cannot_serve_is_refused_naming_what_it_lacks():
    with pytest.raises(ValueError, match=r"score='class' needs a class token.*use score='mean' or score='pool'"):
        timm.create_model('evit_vit_base_patch16_siglip_224', score='class', **SMALL_VIT)
    with pytest.raises(ValueError, match=r"score='pool' needs timm's attention-pool head.*use score='mean' or score='class'"):
        timm.create_model('evit_deit_tiny', score='pool', **SMALL_VIT)
    with pytest.raises(ValueError, match=r"score must be one of 'class', 'mean', 'pool', got 'cls'"):
        timm.create_model('evit_deit_tiny', score='cls', **SMALL_VIT)
    with pytest.raises(ValueError, match=r"score='class' needs a class token"):        # before construction
        timm.create_model('evit_deit_tiny', class_token=False, global_pool='avg', score='class', **SMALL_VIT)
    # the defaults: the class token's attention, else the attention pool's query, else the received attention
    assert timm.create_model('evit_deit_tiny', **SMALL_VIT).score == 'class'
    assert timm.create_model('evit_vit_base_patch16_siglip_224', **SMALL_VIT).score == 'pool'
    model = timm.create_model('evit_vit_medium_patch16_reg4_gap_256', **SMALL_VIT)
    assert model.score == 'mean'
    with pytest.raises(ValueError, match=r"score='pool' needs"):
        model.score = 'pool'
    assert model.score == 'mean' and {blk.score for blk in model.blocks} == {'mean'}


def test_the_pool_score_survives_copies_and_refuses_losing_its_pool():
    model = timm.create_model('evit_vit_base_patch16_siglip_224', score='pool', img_size=64, **SMALL_VIT).eval()
    plain = timm.create_model('vit_base_patch16_siglip_224', img_size=64, **SMALL_VIT)
    assert model.state_dict().keys() == plain.state_dict().keys()       # the score's references are not modules
    x = images(64)
    with torch.no_grad():
        expected = model(x)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert all(blk.pool_score.model is twin and blk.pool_score.model._score_modules() == (twin.attn_pool, twin.norm)
                       for blk in twin.blocks)
            torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"global_pool='avg' removes the attention pool that score='pool'"):
        model.reset_classifier(5, global_pool='avg')
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.score = 'mean'
    model.reset_classifier(5, global_pool='avg')
    assert model.attn_pool is None and model(x).shape == (2, 5)


def _mean_is_the_class_row(q, k, scale, num_prefix_tokens=1, max_chunk_elements=None, key_bias=None,
                           query_log_weights=None, log_space=False):
    return class_attention(q, k, scale, num_prefix_tokens, log_space=log_space)


def _mean_over_half_the_queries(q, k, scale, num_prefix_tokens=1, max_chunk_elements=None, key_bias=None,
                                query_log_weights=None, log_space=False):
    half = q.shape[2] // 2
    logits = (q[:, :, :half] * scale) @ k.transpose(-2, -1)
    if log_space:
        return mean_received_log_row(logits, num_prefix_tokens)
    return mean_received_row(logits.softmax(dim=-1), num_prefix_tokens)


def _pool_keyed_by_values(self, x, key_bias=None, log_space=False):
    pool, norm = self.model._score_modules()
    width = pool.num_heads * pool.head_dim
    values = torch.nn.functional.linear(norm(x), pool.kv.weight[width:], pool.kv.bias[width:])
    return _pool_score_of(self, values, log_space)


def _pool_without_the_final_norm(self, x, key_bias=None, log_space=False):
    pool, _ = self.model._score_modules()
    width = pool.num_heads * pool.head_dim
    return _pool_score_of(self, torch.nn.functional.linear(x, pool.kv.weight[:width], pool.kv.bias[:width]), log_space)


def _pool_score_of(self, keys, log_space):
    (pool, _), (B, N, _) = self.model._score_modules(), keys.shape
    q = pool.q(pool.latent).reshape(1, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    keys = keys.reshape(B, N, pool.num_heads, pool.head_dim).transpose(1, 2)
    return pool_attention(pool.q_norm(q), pool.k_norm(keys), pool.scale, self.model.num_prefix_tokens,
                          log_space=log_space)


@pytest.mark.parametrize('fusion', ['paper', 'size'])
@pytest.mark.parametrize('mutation', ['mean is the class row', 'mean over half the queries', 'pool keyed by values',
                                      'pool without the final norm'])
def test_the_reference_comparison_catches_each_score_mistake(monkeypatch, mutation, fusion):
    if mutation.startswith('mean'):
        mistake = _mean_is_the_class_row if mutation == 'mean is the class row' else _mean_over_half_the_queries
        monkeypatch.setattr(opaque, 'mean_received_attention', mistake)
        score = 'mean'
    else:
        call = _pool_keyed_by_values if mutation == 'pool keyed by values' else _pool_without_the_final_norm
        monkeypatch.setattr(PoolScore, '__call__', call)
        score = 'pool'
    _, model = scored('siglip', score, 0.5, True)
    model.fusion = fusion   # (size-aware fusion ranks by log-scores: the same mistakes, on that path)
    with pytest.raises(AssertionError):
        check_against_family_reference(model, 'siglip', images(FAMILIES['siglip'].size))


def test_pruning_the_head_keeps_the_pool_that_ranks_the_tokens():
    # timm's feature extraction prunes the head (and with it the attention pool and, optionally, the
    # final norm); a 'pool' model's blocks still rank with them, so they stay registered on the model
    _, model = converted('siglip', 0.5, True)
    assert model.score == 'pool'
    x = images(FAMILIES['siglip'].size)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[3], output_dict=True, intermediates_only=True)
    model.prune_intermediate_layers([3], prune_head=True, prune_norm=True)
    assert model.attn_pool is None and isinstance(model.score_pool, torch.nn.Module)
    assert any(name.startswith('score_pool.') for name in model.state_dict())   # moved and saved with the model
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[3], output_dict=True, intermediates_only=True)
        assert torch.equal(after['token_patch_ids'][0], before['token_patch_ids'][0])
        model.to(torch.float64)
        assert model.score_pool.latent.dtype == torch.float64
        model.forward_intermediates(x.double(), indices=[3], intermediates_only=True)
    with pytest.raises(ValueError, match="removes the attention pool that score='pool' ranks"):
        converted('siglip', 0.5, True)[1].reset_classifier(0, 'avg')   # a user's reset still says why


def test_pruning_every_reorganising_block_keeps_no_unused_parameter():
    # timm's pruning contract (tests/test_models.py of timm's source distribution): every parameter
    # left is used by the forward, as DistributedDataParallel without find_unused_parameters needs
    _, model = converted('siglip', 0.5, True)
    model.prune_intermediate_layers([0], prune_head=True, prune_norm=True)   # block 0 alone: no reorganisation
    assert model.reorg_layers == ()
    assert not any(name.startswith(('score_pool.', 'score_norm.')) for name in model.state_dict())
    model.forward_intermediates(images(FAMILIES['siglip'].size), indices=[0], intermediates_only=True)[0].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_features_only_on_a_model_ranked_by_its_pool():
    model = timm.create_model('evit_vit_base_patch16_siglip_224', features_only=True, img_size=32, patch_size=8,
                              **SMALL_VIT)
    features = model(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in features][-1] == (2, 48, 4, 4)


def test_pool_ranks_with_the_pool_and_norm_the_model_holds_now():
    # a user who replaces model.attn_pool or model.norm gets rankings from the new modules (before:
    # from the ones the blocks were built with, no longer in the model or its state dict)
    _, model = scored('siglip', 'pool', 0.5, True)
    x = images(FAMILIES['siglip'].size)
    fresh = copy.deepcopy(model)
    randomise_weights(fresh, seed=7, peaky_std=0.3)
    model.attn_pool, model.norm = fresh.attn_pool, fresh.norm
    check_against_family_reference(model, 'siglip', x)
    # a pool the score cannot read is named, not ignored
    model.attn_pool = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"score='pool' ranks tokens with timm's attention pool .* Identity"):
        with torch.no_grad():
            model(x)


@pytest.mark.parametrize('pool_type', ['token', 'avg'])
def test_pool_ranks_by_the_latents_the_pool_keeps(pool_type):
    # timm's pool with pool_type='token' returns its first latent: only that latent's query ranks
    _, model = scored('siglip', 'pool', 0.5, True)
    model.attn_pool.pool = pool_type
    with torch.no_grad():
        model.attn_pool.latent_len = 3
        model.attn_pool.latent = torch.nn.Parameter(torch.randn(1, 3, model.attn_pool.latent.shape[-1]))
    x = images(FAMILIES['siglip'].size)
    check_against_family_reference(model, 'siglip', x)


def _log_mean_exp_by_hand(log_probs, dims, log_weights=None):
    # float64: the log of the (weighted) sum of probabilities over dims, each shifted by its maximum
    if log_weights is not None:
        log_probs = log_probs + log_weights
    peak = log_probs.amax(dim=dims, keepdim=True)
    return ((log_probs - peak).exp().sum(dim=dims, keepdim=True).log() + peak).squeeze(dims)


def _up_to_a_constant(log_score):
    return log_score - log_score.amax(dim=1, keepdim=True)


@pytest.mark.parametrize('dtype,gaps', [(torch.float16, (30., 45., 60.)), (torch.bfloat16, (110., 140., 170.))],
                         ids=['fp16', 'bf16'])
def test_log_scores_hold_where_the_probabilities_underflow(dtype, gaps):
    # docs/design.md, "A fused token that keeps its size": under size-aware fusion every score is a
    # log-score, computed from the logits, so a token whose probabilities underflow in the model's
    # dtype from every query and head (fp16 below 6e-8; bf16 and float32 below 1e-38, as here) still
    # has its score, and they still rank; against the same rounded inputs in float64 by hand, up to
    # the constant a log-score leaves out
    from timm_evit.reorg import scaled_logits
    g = torch.Generator().manual_seed(0)
    B, H, N, D, P, scale = 2, 3, 9, 8, 1, 0.5
    q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    q[..., 0] = 4.                                                       # every query, every head
    for token, gap in zip((4, 6, 8), gaps):                              # three keys far below the rest
        k[:, :, token, 0] = -gap / (4. * scale)
    q, k = q.to(dtype), k.to(dtype)
    sizes = torch.randint(1, 9, (B, N - P), generator=g).double()
    bias64 = torch.nn.functional.pad(sizes.log(), (P, 0)).view(B, 1, 1, N)
    logits64 = (q.double() @ k.double().transpose(-2, -1)) * scale + bias64
    log_probs = logits64.log_softmax(dim=-1)
    underflowed = (logits64.to(dtype).softmax(dim=-1) == 0).all(dim=2).all(dim=1)   # [B, N]: from all of them
    assert underflowed[:, [4, 6, 8]].all()                               # the case is reached
    bias, query_log_weights = bias64.to(dtype), bias64.flatten(1).float()
    log_weights = query_log_weights.double().log_softmax(dim=1)[:, None, :, None]
    class_by_hand = _log_mean_exp_by_hand(log_probs[:, :, :1], (1, 2))[:, P:]
    mean_by_hand = _log_mean_exp_by_hand(log_probs, (1, 2), log_weights)[:, P:]
    latents = q[:1, :, :2]                                               # an attention pool's two queries
    pool_by_hand = _log_mean_exp_by_hand(
        ((latents.double() @ k.double().transpose(-2, -1)) * scale + bias64).log_softmax(dim=-1), (1, 2))[:, P:]
    scores = {
        'class': (class_attention(q, k, scale, P, bias, log_space=True), class_by_hand),
        'pool': (pool_attention(latents, k, scale, P, bias, log_space=True), pool_by_hand),
        'mean, math path': (mean_received_log_row(scaled_logits(q, k.transpose(-2, -1), scale, bias), P,
                                                  query_log_weights), mean_by_hand),
    }
    if dtype == torch.float16:   # (the fused path's sums are float32's: these gaps underflow none there)
        scores['mean, fused path'] = (mean_received_attention(q, k, scale, P, 5 * N, bias, query_log_weights,
                                                              log_space=True), mean_by_hand)
    tolerance = 4 * max(gaps) * torch.finfo(dtype).eps   # the logits' own rounding in the model's dtype
    for name, (got, by_hand) in scores.items():
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        torch.testing.assert_close(_up_to_a_constant(got.double()), _up_to_a_constant(by_hand),
                                   rtol=0, atol=tolerance, msg=name)
        assert ((got[:, 3] > got[:, 5]) & (got[:, 5] > got[:, 7])).all(), name   # the underflowed ones still rank


def test_a_received_attention_that_underflows_even_in_float32_weighs_as_the_floor():
    # 'mean' on the fused path sums float32 probabilities: below 1e-38 a token's sum is 0, and its
    # log-score the floor (log of float32's smallest normal), shared by every such token, never -inf
    q = torch.zeros(1, 1, 5, 2)
    q[..., 0] = 1.
    k = torch.zeros(1, 1, 5, 2)
    k[0, 0, 3, 0] = k[0, 0, 4, 0] = -200.   # every query gives tokens 3 and 4 exp(-200): 0 in float32
    score = mean_received_attention(q, k, 1., 1, log_space=True)
    floor = torch.tensor(torch.finfo(torch.float32).tiny).log().item()   # (in float32)
    assert torch.isfinite(score).all()
    assert score[0, 2:].tolist() == [floor, floor] and (score[0, :2] > floor + 80).all()
