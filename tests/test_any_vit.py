"""``timm_evit.apply`` on timm's ViT families with a class token, over one family table
(``helpers.FAMILIES``): ``VisionTransformer`` (DeiT, DeiT III, augreg ViT, DINOv2 with registers,
CLIP in OpenAI and LAION configurations, distilled DeiT) and ``Eva`` (EVA-02 with fused or separate
q/k/v, DINOv3, PE, RoPE-Mixed). Each at a small size with random weights scaled so that every part
matters (LayerScale, prefix tokens, position embeddings, RoPE): keep 1.0 is the original model
exactly; lower keep rates equal a stepped reference (attention, and RoPE, by hand, selection and
fusion in loops) and, without fusion, the original model with the dropped tokens masked out of all
later attention (docs/design.md, "Testing"). Eva's own pieces: test_eva.py."""
import copy
import math
import pickle

import pytest
import timm
import torch

import timm_evit
from evit_reference import masked_reference_timm_vit
from helpers import (
    FAMILIES, SMALL_VIT, check_against_family_reference, compare_with_reference, converted, family_params, images,
)


@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
@pytest.mark.parametrize('family', family_params())
def test_keep_rate_one_is_the_original_model(family, fused_attn):
    spec = FAMILIES[family]
    original, model = converted(family, 0.5, True, fused_attn)
    assert type(model).__name__ == spec.evit_class and type(model.blocks[0]).__name__ == spec.block_class
    assert model.state_dict().keys() == original.state_dict().keys()
    x = images(spec.size)
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(model(x, keep_rate=1.0), expected, rtol=0, atol=0)
        assert not torch.allclose(model(x), expected)                   # keep 0.5 does change it
        model.set_keep_rate(1.0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True),
                                   original.forward_intermediates(x, output_fmt='NLC', intermediates_only=True),
                                   rtol=0, atol=0)


@pytest.mark.parametrize('fuse_token', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('keep_rate', [0.7, 0.5])
@pytest.mark.parametrize('family', family_params())
def test_against_the_stepped_reference(family, keep_rate, fuse_token):
    _, model = converted(family, keep_rate, fuse_token)
    assert model.num_prefix_tokens == FAMILIES[family].prefix_tokens
    check_against_family_reference(model, family, images(FAMILIES[family].size))


@pytest.mark.parametrize('keep_rate', [0.7, 0.5])
@pytest.mark.parametrize('family', family_params())
def test_dropping_equals_masking_in_the_original_model(family, keep_rate):
    original, model = converted(family, keep_rate, False)
    x = images(FAMILIES[family].size, seed=2)
    with torch.no_grad():
        ids = model.forward_intermediates(x, output_dict=True, intermediates_only=True)['token_patch_ids']
    rates = dict(zip(model.reorg_layers, model.keep_rate))

    def masked_reference(b, choose):
        ref, alive_after = masked_reference_timm_vit(original, x[b], rates, choose=choose, score=model.score)
        assert [ids_i[b].tolist() for ids_i in ids] == alive_after   # the same patches, in the same order
        return ref
    compare_with_reference(model, x, masked_reference)


@pytest.mark.parametrize('family', family_params(['dinov2_reg', 'deit_distilled', 'deit3']))
def test_token_counts_follow_the_ceil_rule_with_prefix_tokens_excluded(family):
    _, model = converted(family, 0.7, True)
    size = FAMILIES[family].size
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
    assert [prefix.shape[1] for _, prefix in out] == [FAMILIES[family].prefix_tokens] * 4


def test_a_converted_model_pickles_deep_copies_and_prints_as_a_named_class():
    original, model = converted('dinov2_reg', 0.5, True)
    x = images(FAMILIES['dinov2_reg'].size)
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
        (timm.create_model('vit_base_patch16_siglip_224', **SMALL_VIT), "score='class' needs a class token"),
        (timm.create_model('vit_small_patch16_224', block_fn=ResPostBlock, **SMALL_VIT), 'block 0 is a ResPostBlock'),
        (timm.create_model('resnet18'), 'ResNet is not a supported timm class'),
    ]
    for model, words in cases:
        with pytest.raises(ValueError, match=words):
            timm_evit.apply(model, score='class')
        assert 'EViT' not in type(model).__name__                       # left as it was
    model = timm.create_model('deit_tiny_patch16_224', **SMALL_VIT)
    with pytest.raises(ValueError, match='reorg_layers entry 4 is out of range'):
        timm_evit.apply(model, reorg_layers=(1, 4))
    assert type(model).__name__ == 'VisionTransformer' and type(model.blocks[0]).__name__ == 'Block'
