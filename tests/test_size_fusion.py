"""``fusion='size'``: a fused token that keeps its size (docs/design.md, "A fused token that keeps its
size"). The fused token is the attention-weighted mean of what it replaces, every token carries the
patches it stands for, later attention adds ``log(size)`` to its key, and the head pools by size.
Against the family references (attention by hand with the bias, selection, the weighted mean and
the sizes in loops), for a class-token model, registers, Eva with RoPE, average-pooled and
attention-pooled models; and against timm's own model where the fused tokens were identical, the
case in which proportional attention is exact."""
import math

import pytest
import timm
import torch

import timm_evit
from helpers import FAMILIES, check_against_family_reference, converted, family_params, images, randomise_weights

# a class token, registers, RoPE (interleaved, and half with registers), an 'avg' head, 'map' heads
SIZE_FAMILIES = ['deit', 'dinov2_reg', 'eva02', 'dinov3', 'reg_gap', 'siglip', 'pe_map', 'eva02_gap']


@pytest.mark.parametrize('family', family_params(SIZE_FAMILIES))
def test_keep_rate_one_is_the_original_model(family):
    original, model = converted(family, 1.0, True, fusion='size')
    x = images(FAMILIES[family].size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
@pytest.mark.parametrize('family', family_params(SIZE_FAMILIES))
def test_against_the_stepped_reference(family, fused_attn):
    _, model = converted(family, 0.5, True, fused_attn, fusion='size')
    assert model.fusion == 'size'
    check_against_family_reference(model, family, images(FAMILIES[family].size))


@pytest.mark.parametrize('family,score', [
    pytest.param(f, s, id=f'{f}-{s}', marks=p.marks)
    for f, s in [('deit', 'mean'), ('siglip', 'mean'), ('pe', 'pool'), ('dinov2_reg', 'mean')]
    for p in family_params([f])])
def test_every_score_against_the_stepped_reference(family, score):
    # 'mean' counts a token of size s as s queries; 'pool' adds log(size) to the pool's logits
    _, model = converted(family, 0.5, True, fusion='size')
    model.score = score
    check_against_family_reference(model, family, images(FAMILIES[family].size))


def test_a_lower_keep_rate_fuses_a_fused_token_again_and_the_sizes_add_up():
    _, model = converted('reg_gap', 0.5, True, fusion='size')
    model.reorg_layers = (0, 1, 2, 3)
    model.set_keep_rate(0.4)
    x = images(FAMILIES['reg_gap'].size, batch=3)
    with torch.no_grad():
        out = model.forward_intermediates(x, output_dict=True, intermediates_only=True)
    num_patches = model.patch_embed.num_patches
    for ids, patch_index, sizes in zip(out['token_patch_ids'], out['patch_token_index'], out['token_sizes']):
        assert ids.shape == sizes.shape
        assert torch.equal(sizes.sum(dim=1), torch.full((3,), float(num_patches)))   # every patch, once
        assert torch.all(sizes[ids >= 0] == 1)                                       # a kept patch is one
        # each token's size is the number of patches it carries (a fused token fused again: theirs add)
        carried = torch.stack([torch.bincount(p, minlength=ids.shape[1]) for p in patch_index]).float()
        assert torch.equal(carried, sizes)
    # by the last block a fused token was fused again: some token stands for more than one block dropped
    assert out['token_sizes'][-1][:, -1].min() > 1


def test_a_fused_token_of_identical_tokens_is_exact():
    # Where every patch token is the same vector, attention to one fused token of size s with + log(s)
    # is attention to its s copies, the MLP works per token and 'avg' / 'map' pooling by size is the
    # pooling of the copies: EViT with size-aware fusion equals timm's own model at every keep rate
    # (the paper's fusion does not: its fused token is scaled by the dropped share of the attention).
    for name, kwargs in [('deit_tiny_patch16_224', {}),
                         ('vit_medium_patch16_reg4_gap_256', {}),
                         ('vit_base_patch16_siglip_224', {})]:
        original = timm.create_model(name, img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                     num_classes=5, **kwargs).eval()
        randomise_weights(original, seed=0)
        with torch.no_grad():
            original.pos_embed.zero_()       # so that a uniform image gives identical patch tokens
            if original.cls_token is not None and not original.no_embed_class:
                original.cls_token.add_(0.5)
        x = torch.rand(2, 3, 1, 1).expand(2, 3, 32, 32).contiguous()
        with torch.no_grad():
            expected = original(x)
            for fusion, exact in (('size', True), ('paper', False)):
                model = timm_evit.apply(timm.create_model(name, img_size=32, patch_size=8, embed_dim=48, depth=4,
                                                          num_heads=3, num_classes=5, **kwargs).eval(),
                                        keep_rate=0.4, reorg_layers=(0, 1, 2), fusion=fusion)
                model.load_state_dict(original.state_dict())
                assert model(x).shape == expected.shape
                close = torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
                assert close == exact, (name, fusion)


def test_forward_head_of_forward_features_pools_by_size_as_forward_does():
    # docs/design.md, "One token state": forward_head of exactly what forward_features returned knows
    # its sizes; other tokens need token_sizes, and without them the head refuses rather than
    # pooling every token once (4.4 off on this model before)
    _, model = converted('reg_gap', 0.5, True, fusion='size')
    x = images(FAMILIES['reg_gap'].size)
    with torch.no_grad():
        expected = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), expected, rtol=0, atol=0)
        out = model.forward_intermediates(x, output_dict=True, intermediates_only=True)
        sizes = out['token_sizes'][-1]
        copied = features.clone()
        torch.testing.assert_close(model.forward_head(copied, token_sizes=sizes), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(sizes, sizes.round())   # whole numbers: as integers, the same head
        torch.testing.assert_close(model.forward_head(copied, token_sizes=sizes.long()), expected, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match=r'forward_head needs the token state .* token_sizes='):
            model.forward_head(copied)
        # pre_logits pools too: the same rule
        torch.testing.assert_close(model.forward_head(features, pre_logits=True),
                                   model.forward_head(copied, pre_logits=True, token_sizes=sizes), rtol=1e-6, atol=1e-6)
        # the paper's fusion at a fixed rate pools every token once: nothing to know, nothing refused
        model.fusion = 'paper'
        torch.testing.assert_close(model.forward_head(model.forward_features(x).clone()), model(x), rtol=0, atol=0)


def test_the_paper_s_names_keep_the_paper_s_fusion_apply_and_timm_names_default_to_size():
    small = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2)
    assert timm.create_model('evit_deit_tiny', **small).fusion == 'paper'
    assert timm.create_model('evit_lvvit_s', reorg_layers=(1, 2), **small).fusion == 'paper'
    assert timm.create_model('evit_deit_tiny_patch16_224', **small).fusion == 'size'
    assert timm_evit.apply(timm.create_model('deit_tiny_patch16_224', **small)).fusion == 'size'
    assert timm.create_model('evit_deit_tiny_patch16_224', fusion='paper', **small).fusion == 'paper'
    model = timm.create_model('evit_deit_tiny', img_size=32, patch_size=8, fusion='size')
    assert model.fusion == 'size' and all(blk.fusion == 'size' for blk in model.blocks)
    model.fusion = 'paper'
    assert all(blk.fusion == 'paper' for blk in model.blocks)


@pytest.mark.parametrize('bad', ['sized', True, None, 1])
def test_a_bad_fusion_is_refused_naming_the_argument(bad):
    if bad is not None:   # (timm's create_model leaves out arguments given as None)
        with pytest.raises(ValueError, match=r"fusion must be one of 'paper', 'size'"):
            timm.create_model('evit_deit_tiny', img_size=32, patch_size=8, fusion=bad)
    model = timm.create_model('evit_deit_tiny', img_size=32, patch_size=8)
    with pytest.raises(ValueError, match='fusion must be one of'):
        model.fusion = bad
    assert model.fusion == 'paper'


def test_a_pool_that_cannot_weigh_by_size_is_refused():
    plain = timm.create_model('vit_base_patch16_224', img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                              class_token=False, global_pool='prr')
    if getattr(plain, 'attn_pool', None) is None:
        pytest.skip(f"timm {timm.__version__} has no 'prr' pool")
    with pytest.raises(ValueError, match=r"fusion='size' weighs pooled tokens by size.*fusion='paper'"):
        timm_evit.apply(plain, fusion='size')


def test_visualize_panels_count_the_patches_the_fused_tokens_stand_for():
    pytest.importorskip('matplotlib')
    from timm_evit.tools._io import pyplot
    from timm_evit.tools.visualize import masks_figure, reorganisation_masks, stage_names
    model = timm.create_model('evit_deit_tiny', embed_dim=48, depth=12, num_heads=2, reorg_layers=(3, 6, 9),
                              keep_rate=0.5, fusion='size').eval()
    x = torch.randn(1, 3, 224, 224)
    masks = reorganisation_masks(model, x)
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=[3, 6, 9], output_dict=True, intermediates_only=True)
    fig = masks_figure(x[0].clamp(0, 1), masks[0], stage_names(model))
    try:
        titles = [ax.get_title() for ax in fig.axes][1:]
    finally:
        pyplot().close(fig)
    for layer, title, ids, sizes in zip(model.reorg_layers, titles, out['token_patch_ids'], out['token_sizes']):
        kept, fused = int((ids[0] >= 0).sum()), int(sizes[0][ids[0] < 0].sum())
        assert kept + fused == 196 and fused > 0
        assert title == f'block {layer}: {kept} kept, {fused} fused'


@pytest.mark.parametrize('family', family_params(['siglip', 'reg_gap', 'eva02']))
def test_autocast_and_bf16_weights_run_with_the_size_bias(family):
    # the size bias and the pool's mask follow the dtype of the attention they join
    _, model = converted(family, 0.5, True, fusion='size')
    x = images(FAMILIES[family].size)
    with torch.no_grad():   # (SDPA refuses a mask of another dtype than its query's)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.isfinite(model(x)).all()
        assert torch.isfinite(model.to(torch.bfloat16)(x.bfloat16())).all()


@pytest.mark.parametrize('dtype,sharpen', [(torch.float32, 60.), (torch.float16, 8.), (torch.bfloat16, 60.)],
                         ids=['fp32-peaky', 'fp16', 'bf16'])
def test_size_aware_fusion_stays_finite_where_the_dropped_attention_underflows(dtype, sharpen, monkeypatch):
    # docs/design.md, "A fused token that keeps its size": the fused token is the attention-weighted
    # mean of the dropped tokens, taken from their log-scores; where every one of their probabilities
    # underflows to 0 in the model's dtype (peaky attention, half precision: 0 / 0, NaN logits, when
    # the mean was taken of the probabilities) it is still that mean
    import timm_evit.reorg as reorg
    underflowed = []
    keep_and_fuse = reorg.keep_and_fuse
    _, model = converted('deit', 0.5, True, fusion='size')
    heads = model.blocks[0].attn.num_heads

    def spy(x, score, kept_idx, fuse, num_prefix_tokens=1, weighted_mean=False):
        # 'class' log-score: log of the class row's probabilities summed over heads (float32)
        probability = (score.double().exp() / heads).to(dtype)
        underflowed.append(bool((probability.scatter(1, kept_idx, 0.).sum(dim=1) == 0).any()))
        out = keep_and_fuse(x, score, kept_idx, fuse, num_prefix_tokens, weighted_mean)
        weights = score.double().scatter(1, kept_idx, -float('inf')).softmax(dim=1)   # by hand, float64
        expected = (weights.unsqueeze(1) @ x[:, num_prefix_tokens:].double()).squeeze(1)
        torch.testing.assert_close(out[:, -1].double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
        return out
    monkeypatch.setattr(reorg, 'keep_and_fuse', spy)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * blk.attn.qkv.in_features].mul_(sharpen)   # queries and keys
    model = model.to(dtype)
    with torch.no_grad():
        assert torch.isfinite(model(images(FAMILIES['deit'].size).to(dtype))).all()
    assert any(underflowed)   # the case is reached: every dropped probability of some image is 0


def test_the_fused_token_is_the_mean_by_score_even_where_every_score_underflows():
    from timm_evit.reorg import keep_and_fuse
    x = torch.randn(2, 1 + 5, 4, dtype=torch.float64)
    # log-scores: tokens 2..4 dropped, their probabilities exp(-2000..) are 0 even in float64
    score = torch.tensor([[0., -1., -2000., -2001., -2003.], [-0.5, -0.7, -1500., -1500., -1499.]], dtype=torch.float64)
    kept = torch.tensor([[0, 1], [0, 1]])
    assert score.exp()[:, 2:].sum() == 0
    out = keep_and_fuse(x, score, kept, True, 1, weighted_mean=True)
    for b in range(2):
        shifted = [float(score[b, j] - score[b, 2:].max()) for j in (2, 3, 4)]   # by hand: exp(s_j - max)
        a = [math.exp(s) for s in shifted]
        by_hand = sum(a_j * x[b, 1 + j] for a_j, j in zip(a, (2, 3, 4))) / sum(a)
        torch.testing.assert_close(out[b, -1], by_hand)
    # where the scores do not underflow, the mean by probability: sum a_j x_j / sum a_j, a = exp(score)
    score = torch.tensor([[0., -1., -2., -0.5, -3.]], dtype=torch.float64)
    out = keep_and_fuse(x[:1], score, kept[:1], True, 1, weighted_mean=True)
    a = score.exp()[0, 2:]
    torch.testing.assert_close(out[0, -1], (a[:, None] * x[0, 3:]).sum(0) / a.sum())


