"""``timm_evit.apply`` on timm's ViT families with a class token: DeiT, DeiT III, augreg ViT, DINOv2
with registers, CLIP (OpenAI and LAION configurations), distilled DeiT. Each at a small size with
random weights scaled so that every part matters (LayerScale, prefix tokens, position embeddings):
keep 1.0 is the original model exactly; lower keep rates equal a stepped reference (attention by
hand, selection and fusion in loops) and, without fusion, the original model with the dropped
tokens masked out of all later attention (docs/design.md, "Testing")."""
import copy
import math
import pickle

import pytest
import timm
import torch

import timm_evit
from evit_reference import checked_choice, kept_indices_by_block, masked_reference_timm_vit, reference_timm_vit

SMALL = dict(depth=4, embed_dim=48, num_heads=2)
# family -> (timm model name, small architecture, image size)
FAMILIES = {
    'deit': ('deit_tiny_patch16_224', SMALL, 96),
    'deit3': ('deit3_small_patch16_224', SMALL, 96),                               # LayerScale, no_embed_class
    'augreg': ('vit_base_patch16_224.augreg2_in21k_ft_in1k', SMALL, 96),
    'dinov2_reg': ('vit_small_patch14_reg4_dinov2', SMALL, 84),                    # 4 registers, LayerScale
    'clip_openai': ('vit_base_patch16_clip_224.openai', SMALL, 96),                # norm_pre, quick GELU
    'clip_laion': ('vit_base_patch16_clip_224.laion2b', SMALL, 96),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', SMALL, 96),              # class + distillation token
}
PREFIX_TOKENS = {'dinov2_reg': 5, 'deit_distilled': 2}


def randomised_original(family, seed=0):
    name, arch, size = FAMILIES[family]
    model = timm.create_model(name, img_size=size, **arch).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith('gamma'):                                   # LayerScale: large enough to matter
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            elif 'norm' in key and key.endswith('weight'):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif key in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                std = 0.1 if 'qkv' in key or 'head' in key else 0.05
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model, size


def images(size, batch=2, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def converted(family, keep_rate, fuse_token, fused_attn=True):
    original, size = randomised_original(family)
    for m in original.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused_attn
    model = timm_evit.apply(copy.deepcopy(original), keep_rate=keep_rate, fuse_token=fuse_token)
    return original, model, size


@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_keep_rate_one_is_the_original_model(family, fused_attn):
    original, model, size = converted(family, 0.5, True, fused_attn)
    assert type(model).__name__ in ('VisionTransformerEViT', 'VisionTransformerDistilledEViT')
    assert model.state_dict().keys() == original.state_dict().keys()
    x = images(size)
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(model(x, keep_rate=1.0), expected, rtol=0, atol=0)
        assert not torch.allclose(model(x), expected)                   # keep 0.5 does change it
        model.set_keep_rate(1.0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize('fuse_token', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('keep_rate', [0.7, 0.5])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_against_the_stepped_reference(family, keep_rate, fuse_token):
    _, model, size = converted(family, keep_rate, fuse_token)
    x = images(size)
    logits, kept = kept_indices_by_block(model, x)
    with torch.no_grad():
        out = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True, return_prefix_tokens=True)
    rates = dict(zip(model.reorg_layers, model.keep_rate))
    P = model.num_prefix_tokens
    assert P == PREFIX_TOKENS.get(family, 1)
    for b in range(x.shape[0]):
        choose = checked_choice({block: idx[b].tolist() for block, idx in kept.items()})
        with torch.no_grad():
            ref, ref_tokens = reference_timm_vit(model, x[b], rates, fuse_token, choose=choose)
        assert (logits[b] - ref).abs().max() < 5e-5 * max(1., float(ref.abs().max()))
        for (tokens, prefix), theirs in zip(out, ref_tokens):
            ours = torch.cat([prefix[b], tokens[b]])                 # prefix tokens first, unchanged in count
            assert prefix.shape[1] == P and ours.shape == theirs.shape
            assert (ours - theirs).abs().max() < 1e-4 * max(1., float(theirs.abs().max()))
    assert logits.std() > 0.1


@pytest.mark.parametrize('keep_rate', [0.7, 0.5])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_dropping_equals_masking_in_the_original_model(family, keep_rate):
    original, model, size = converted(family, keep_rate, False)
    x = images(size, seed=2)
    logits, kept = kept_indices_by_block(model, x)
    with torch.no_grad():
        ids = model.forward_intermediates(x, output_dict=True, intermediates_only=True)['token_patch_ids']
    rates = dict(zip(model.reorg_layers, model.keep_rate))
    for b in range(x.shape[0]):
        choose = checked_choice({block: idx[b].tolist() for block, idx in kept.items()})
        with torch.no_grad():
            ref, alive_after = masked_reference_timm_vit(original, x[b], rates, choose=choose)
        assert (logits[b] - ref).abs().max() < 5e-5 * max(1., float(ref.abs().max()))
        assert [ids_i[b].tolist() for ids_i in ids] == alive_after   # the same patches, in the same order


@pytest.mark.parametrize('family', ['dinov2_reg', 'deit_distilled', 'deit3'])
def test_token_counts_follow_the_ceil_rule_with_prefix_tokens_excluded(family):
    _, model, size = converted(family, 0.7, True)
    grid = size // model.patch_embed.patch_size[0]
    n, expected = grid * grid, []
    for block in range(len(model.blocks)):
        if block in model.reorg_layers:
            n = math.ceil(0.7 * n) + 1
        expected.append(n)
    with torch.no_grad():
        out = model.forward_intermediates(images(size), output_fmt='NLC', intermediates_only=True,
                                          return_prefix_tokens=True)
    assert model.reorg_layers == (1, 2, 3)                                 # depth 4: 4 // 4, 4 // 2, 3 * 4 // 4
    assert [tokens.shape[1] for tokens, _ in out] == expected
    assert [prefix.shape[1] for _, prefix in out] == [PREFIX_TOKENS.get(family, 1)] * 4


def test_a_converted_model_pickles_deep_copies_and_prints_as_a_named_class():
    original, model, size = converted('dinov2_reg', 0.5, True)
    x = images(size)
    restored = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
    text = repr(model)
    assert text.startswith('VisionTransformerEViT(') and '(0): EViTBlock(' in text
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # applying again reconfigures instead of converting twice
    assert timm_evit.apply(model, keep_rate=0.9, reorg_layers=(2,), fuse_token=False) is model
    assert model.keep_rate == (0.9,) and model.reorg_layers == (2,) and model.fuse_token is False


def test_what_apply_refuses_is_named():
    from timm.models.vision_transformer import ResPostBlock
    cases = [
        (timm.create_model('vit_base_patch16_siglip_224', **SMALL), 'no class token'),
        (timm.create_model('vit_small_patch16_224', block_fn=ResPostBlock, **SMALL), 'block 0 is a ResPostBlock'),
        (timm.create_model('resnet18'), 'ResNet is not a supported timm class'),
    ]
    for model, words in cases:
        with pytest.raises(ValueError, match=words):
            timm_evit.apply(model)
        assert 'EViT' not in type(model).__name__                       # left as it was
    model = timm.create_model('deit_tiny_patch16_224', **SMALL)
    with pytest.raises(ValueError, match='reorg_layers entry 4 is out of range'):
        timm_evit.apply(model, reorg_layers=(1, 4))
    assert type(model).__name__ == 'VisionTransformer' and type(model.blocks[0]).__name__ == 'Block'
