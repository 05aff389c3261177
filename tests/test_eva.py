"""``timm_evit.apply`` on timm's ``Eva``, its own pieces: EVA-02 (fused qkv with q/v biases, or
separate q/k/v), DINOv3 (its RoPE, registers, LayerScale), PE (``AttentionRope``, ``map`` pooling)
and RoPE-Mixed (rotary rows per block and head). The attention core against timm's, rotary rows per
kept token and per image, prefix tokens, masks, refusals, and the RoPE mistakes the reference
comparison must catch. Keep 1.0, the stepped reference and masking for every family, Eva's
included: test_any_vit.py."""
import copy
import math
import pickle

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat

import timm_evit
import timm_evit.opaque as opaque
from helpers import (
    EVA_FAMILIES, EVA_SMALL, FAMILIES, check_against_family_reference, converted, family_params, images,
    randomised_original, set_attention_path,
)
from timm_evit.layers import rope_attention_with_class_attention
from timm_evit.reorg import rotary_rows_for_tokens

SIZE = EVA_SMALL['img_size']


def test_rotary_rows_keep_each_tokens_rotation_and_give_a_fused_token_none():
    rope = torch.randn(6, 8)                                     # [N, 2D]: sin | cos
    ids = torch.tensor([[4, -1, 0], [2, 5, 1]])
    rows = rotary_rows_for_tokens(rope, ids)
    assert rows.shape == (2, 1, 3, 8)
    assert torch.equal(rows[0, 0, 0], rope[4]) and torch.equal(rows[1, 0, 2], rope[1])
    assert torch.equal(rows[0, 0, 1], torch.tensor([0.] * 4 + [1.] * 4))
    q = torch.randn(4)
    for half in (True, False):                                   # timm's rotation leaves it as it is
        torch.testing.assert_close(apply_rot_embed_cat(q, rows[0, 0, 1], half=half), q, rtol=0, atol=0)
    per_head = rotary_rows_for_tokens(torch.randn(3, 6, 8), ids)  # mixed: [H, N, 2D]
    assert per_head.shape == (2, 3, 3, 8)
    per_image = rotary_rows_for_tokens(torch.randn(2, 1, 6, 8), ids)   # patch dropout: [B, 1, N, 2D]
    assert per_image.shape == (2, 1, 3, 8)


@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
@pytest.mark.parametrize('family', family_params(EVA_FAMILIES))
def test_the_attention_core_is_timms_attention_forward(family, fused_attn):
    model = set_attention_path(randomised_original(family), fused_attn)
    with torch.no_grad():
        x, rope = model._pos_embed(model.patch_embed(images(SIZE)))
        x = model.norm_pre(x)
        P = model.num_prefix_tokens
        for i, blk in enumerate(model.blocks):
            block_rope = rope[i] if model.rope_mixed else rope
            h = blk.norm1(x)
            # timm's rope, and per-image rows for reordered tokens (as after a reorganisation)
            ids = torch.stack([torch.randperm(h.shape[1] - P, generator=torch.Generator().manual_seed(b))
                               for b in range(h.shape[0])])
            shuffled = torch.cat([h[:, :P], h[:, P:].gather(1, ids[..., None].expand(-1, -1, h.shape[-1]))], dim=1)
            for r, tokens in ((block_rope, h), (rotary_rows_for_tokens(block_rope, ids), shuffled)):
                out, cls_attn = rope_attention_with_class_attention(blk.attn, tokens, r, P)
                torch.testing.assert_close(out, blk.attn(tokens, rope=r), rtol=0, atol=0)
                assert cls_attn.shape == (h.shape[0], h.shape[1] - P)
                assert ((cls_attn.sum(1) > 0) & (cls_attn.sum(1) <= 1 + 1e-6)).all()
            x = blk(x, rope=block_rope)


@pytest.mark.parametrize('family', family_params(['eva02', 'rope_mixed']))
def test_patch_dropout_rows_are_per_image(family):
    # training with patch dropout: timm's rotary rows arrive per image ([B, 1, N, 2D], or per block
    # [depth, B, H, N, 2D] for mixed); the model's own embedding of the same draw feeds the reference
    _, model = converted(family, 0.5, True, patch_drop_rate=0.4)
    model.train()
    x = images(SIZE, batch=3)
    torch.manual_seed(7)
    with torch.no_grad():
        tokens, rope = model._pos_embed(model.patch_embed(x))
        tokens = model.norm_pre(tokens)
    assert rope.ndim == (5 if model.rope_mixed else 4)
    per_image = (lambda b: (tokens[b], rope[:, b])) if model.rope_mixed else (lambda b: (tokens[b], rope[b]))
    torch.manual_seed(7)
    check_against_family_reference(model, family, x, embedded=per_image)


@pytest.mark.parametrize('family', family_params(['dinov3', 'eva02']))
def test_prefix_tokens_stay_and_token_counts_follow_the_ceil_rule(family):
    _, model = converted(family, 0.7, True)
    P = FAMILIES[family].prefix_tokens
    n, expected = (SIZE // 8) ** 2, []
    for block in range(len(model.blocks)):
        if block in model.reorg_layers:
            n = math.ceil(0.7 * n) + 1
        expected.append(n)
    x = images(SIZE)
    with torch.no_grad():
        out = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True, return_prefix_tokens=True)
        ids = model.forward_intermediates(x, output_dict=True, intermediates_only=True)['token_patch_ids']
        grid = model.forward_intermediates(x, intermediates_only=True)
    assert model.reorg_layers == (1, 2, 3)
    assert [tokens.shape[1] for tokens, _ in out] == expected
    assert [prefix.shape[1] for _, prefix in out] == [P] * 4
    assert [i.shape[1] for i in ids] == expected and (ids[-1][:, -1] == -1).all()   # the fused token is last
    assert all(g.shape == (2, 64, SIZE // 8, SIZE // 8) for g in grid)                # timm's NCHW shapes
    with torch.no_grad():   # a block that keeps every token adds no fused token id
        ids = model.forward_intermediates(x, output_dict=True, intermediates_only=True,
                                          keep_rate=0.99)['token_patch_ids']
    assert [i.shape[1] for i in ids] == [36] * 4 and (ids[-1] >= 0).all()


def test_a_converted_eva_pickles_deep_copies_and_prints_as_a_named_class():
    original, model = converted('dinov3', 0.5, True)
    x = images(SIZE)
    restored = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
    text = repr(model)
    assert text.startswith('EvaEViT(') and 'EViTEvaBlock(' in text and 'EvaBlock(' not in text.replace('EViTEvaBlock(', '')
    assert isinstance(model, timm.models.eva.Eva)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.keep_rate == (0.5,) * 3 and model.fuse_token is True
    model.keep_rate = (0.9, 0.8, 0.7)
    assert model.keep_rate == (0.9, 0.8, 0.7)
    assert timm_evit.apply(model, keep_rate=0.9, reorg_layers=(2,), fuse_token=False) is model
    assert model.keep_rate == (0.9,) and model.reorg_layers == (2,) and model.fuse_token is False


def test_attention_masks_pass_through_at_keep_rate_one_and_are_refused_with_reorganisation():
    original, model = converted('eva02', 0.7, True)
    x = images(SIZE)
    N = 1 + (SIZE // 8) ** 2
    mask = torch.zeros(1, 1, N, N)
    mask[..., -5:] = float('-inf')
    with torch.no_grad():
        torch.testing.assert_close(model(x, attn_mask=mask, keep_rate=1.0), original(x, attn_mask=mask), rtol=0, atol=0)
        with pytest.raises(ValueError, match='attn_mask / is_causal need keep_rate=1.0'):
            model(x, attn_mask=mask)
        with pytest.raises(ValueError, match='cannot be used in a block that reorganises tokens'):
            model.blocks[1](model.norm_pre(model._pos_embed(model.patch_embed(x))[0]), attn_mask=mask, keep_rate=0.5)


def test_what_apply_refuses_on_eva_is_named():
    arch = dict(EVA_SMALL)
    cases = [
        (timm.create_model('eva02_small_patch14_224', class_token=False, **arch), "score='class' needs a class token"),
        (timm.create_model('eva02_small_patch14_224', use_post_norm=True, **arch),
         "block 0 is a EvaBlockPostNorm, not timm's EvaBlock"),
    ]
    for model, words in cases:
        with pytest.raises(ValueError, match=words):
            timm_evit.apply(model, score='class')
        assert type(model).__name__ == 'Eva' and 'EViT' not in type(model.blocks[0]).__name__   # left as it was
    model = timm.create_model('eva02_small_patch14_224', **arch)
    model.blocks[2].attn = timm.layers.Attention(64, num_heads=4)
    with pytest.raises(ValueError, match="block 2 has a Attention, not timm's EvaAttention"):
        timm_evit.apply(model)
    with pytest.raises(ValueError, match='reorg_layers entry 4 is out of range'):
        timm_evit.apply(timm.create_model('eva02_small_patch14_224', **arch), reorg_layers=(1, 4))
    with pytest.raises(ValueError, match="score='pool' needs timm's attention-pool head"):
        timm_evit.EvaEViT(class_token=False, global_pool='avg', score='pool', **arch)


def test_an_eva_built_directly_is_the_converted_one():
    kwargs = dict(EVA_SMALL, use_rot_pos_emb=True, swiglu_mlp=True, ref_feat_shape=(6, 6))
    torch.manual_seed(0)
    direct = timm_evit.EvaEViT(keep_rate=0.6, fuse_token=False, **kwargs).eval()
    plain = timm.models.eva.Eva(**kwargs).eval()
    plain.load_state_dict(direct.state_dict())
    converted_model = timm_evit.apply(plain, keep_rate=0.6, fuse_token=False)
    x = images(SIZE)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), converted_model(x), rtol=0, atol=0)


# Each mutation is a plausible way to get EViT's RoPE wrong; the reference comparison must catch it.
def _fused_token_rotated(rope, ids):
    # the fused token takes the last patch's rotation (patch 0's is the identity where its coordinates are 0)
    return rotary_rows_for_tokens(rope, torch.where(ids < 0, rope.shape[-2] - 1, ids))


def _rows_in_patch_order(rope, ids):
    return rotary_rows_for_tokens(rope, ids.sort(dim=1).values)      # rows not in the kept tokens' order


def _rows_not_gathered(rope, ids):
    return rotary_rows_for_tokens(rope, torch.arange(ids.shape[1]).expand_as(ids))   # the first n rows


@pytest.mark.parametrize('mutation', ['fused token rotated', 'rows in patch order', 'rows not gathered'])
@pytest.mark.parametrize('family', family_params(['eva02', 'dinov3']))
def test_the_reference_comparison_catches_each_mutation(monkeypatch, family, mutation):
    monkeypatch.setattr(opaque, 'rotary_rows_for_tokens', {
        'fused token rotated': _fused_token_rotated,
        'rows in patch order': _rows_in_patch_order,
        'rows not gathered': _rows_not_gathered,
    }[mutation])
    _, model = converted(family, 0.7, True)
    with pytest.raises(AssertionError):
        check_against_family_reference(model, family, images(SIZE))
