"""EViT-DeiT logits against an independent, plain reference: materialised attention, one image
at a time, Python loops for the selection (docs/design.md, "EViT, exactly")."""
import math

import pytest
import timm
import torch

from evit_reference import reference_forward
import timm_evit.reorg as reorg
from helpers import assert_tokens_match, compare_with_reference, randomised_evit_deit, set_attention_path


def check_against_reference(model, images):
    """Logits and tokens image by image against ``reference_forward``; the fused tokens' events."""
    sd = model.state_dict()
    rates = dict(zip(model.reorg_layers, model.keep_rate))
    with torch.no_grad():
        tokens = model.forward_intermediates(images, output_fmt='NLC', intermediates_only=True)
    all_events = []

    def reference(b, choose):
        ref, ref_tokens, events = reference_forward(
            sd, images[b], model.blocks[0].attn.num_heads, model.patch_embed.patch_size[0], rates, model.fuse_token,
            choose=choose)
        # token by token, in order: the logits alone cannot see the order of tokens
        assert [t.shape[1] for t in tokens] == [t.shape[0] for t in ref_tokens]
        for ours, theirs in zip(tokens, ref_tokens):
            assert_tokens_match(ours[b], theirs)
        all_events.append(events)
        return ref
    compare_with_reference(model, images, reference)
    return all_events


@pytest.mark.parametrize('fused_attn', [False, True], ids=['math', 'sdpa'])
@pytest.mark.parametrize('batch', [1, 4])
@pytest.mark.parametrize('fuse_token', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('keep_rate', [1.0, 0.9, 0.7, 0.5, 0.25])
def test_logits_match_reference(keep_rate, fuse_token, batch, fused_attn):
    model = randomised_evit_deit(keep_rate, fuse_token, fused_attn)
    check_against_reference(model, torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)))


def test_attention_paths_agree_and_keep_rate_one_is_timms_deit_exactly():
    images = torch.randn(2, 3, 224, 224)
    math_model, sdpa_model = randomised_evit_deit(0.5, True, False), randomised_evit_deit(0.5, True, True)
    with torch.no_grad():
        assert (math_model(images) - sdpa_model(images)).abs().max() < 1e-5
        for model in (math_model, sdpa_model):
            deit = timm.create_model('deit_tiny_patch16_224').eval()
            deit.load_state_dict(model.state_dict())
            set_attention_path(deit, model.blocks[0].attn.fused_attn)
            assert torch.equal(model(images, keep_rate=1.0), deit(images))


def test_an_images_output_does_not_depend_on_its_batch():
    images = torch.randn(4, 3, 224, 224)
    for fuse_token in (True, False):
        model = randomised_evit_deit(0.5, fuse_token, True)
        with torch.no_grad():
            batched = model(images)
            for b in range(4):
                assert (model(images[b:b + 1])[0] - batched[b]).abs().max() < 1e-5


def test_fused_tokens_count_in_the_ceil_rule_and_can_be_kept_or_fused_again():
    # 16 patches, reorganising in every one of the first 4 blocks at keep 0.5, with fusion:
    # 16 -> ceil(8) + 1 = 9 -> ceil(4.5) + 1 = 6 -> ceil(3) + 1 = 4 -> ceil(2) + 1 = 3
    model = randomised_evit_deit(0.5, True, True, img_size=64, reorg_layers=(0, 1, 2, 3))
    events = check_against_reference(model, torch.randn(16, 3, 64, 64))
    with torch.no_grad():
        counts = [t.shape[1] for t in model.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt='NLC', intermediates_only=True)]
    assert counts[:4] == [9, 6, 4, 3]
    assert sum(e['fused_kept'] for e in events) > 0 and sum(e['fused_refused'] for e in events) > 0


def test_float64_ceil_parity_with_100_tokens():
    # 160 px = 10 x 10 = 100 patches; ceil(0.7 * 100) in float64 is 70 (0.7 * 100 rounds to 70.0)
    model = randomised_evit_deit(0.7, True, True, img_size=160)
    check_against_reference(model, torch.randn(1, 3, 160, 160))
    with torch.no_grad():
        tokens = model.forward_intermediates(torch.randn(1, 3, 160, 160), output_fmt='NLC', intermediates_only=True)
    assert tokens[3].shape[1] == 70 + 1


# Each mutation is a plausible way to get EViT subtly wrong, planted in the one place where tokens are
# kept and fused (reorg.keep_and_fuse) or in the count; the reference comparison must catch every one
# of them (so the tolerances cannot hide them).
_keep_and_fuse = reorg.keep_and_fuse


def _kept_in_position_order(x, score, kept_idx, fuse, num_prefix_tokens=1, weighted_mean=False):
    return _keep_and_fuse(x, score, kept_idx.sort(dim=1).values, fuse, num_prefix_tokens, weighted_mean)


def _renormalised_fusion(x, score, kept_idx, fuse, num_prefix_tokens=1, weighted_mean=False):
    out = _keep_and_fuse(x, score, kept_idx, fuse, num_prefix_tokens, weighted_mean)
    if not fuse:
        return out
    dropped = score.scatter(1, kept_idx, 0.)
    return torch.cat([out[:, :-1], out[:, -1:] / dropped.sum(1, keepdim=True)[..., None]], dim=1)


def _fused_token_first(x, score, kept_idx, fuse, num_prefix_tokens=1, weighted_mean=False):
    out = _keep_and_fuse(x, score, kept_idx, fuse, num_prefix_tokens, weighted_mean)
    if not fuse:
        return out
    P = num_prefix_tokens
    return torch.cat([out[:, :P], out[:, -1:], out[:, P:-1]], dim=1)


@pytest.mark.parametrize('mutation', ['position order', 'count', 'renormalised weights', 'fused token first'])
def test_the_reference_comparison_catches_each_mutation(monkeypatch, mutation):
    if mutation == 'count':   # floor instead of ceil
        monkeypatch.setattr(reorg, 'num_kept_tokens', lambda rate, n: max(1, math.floor(rate * n)))
    else:
        monkeypatch.setattr(reorg, 'keep_and_fuse', {
            'position order': _kept_in_position_order,
            'renormalised weights': _renormalised_fusion,
            'fused token first': _fused_token_first,
        }[mutation])
    model = randomised_evit_deit(0.7, True, False)   # 196 -> ceil(137.2) = 138: floor would keep 137
    with pytest.raises(AssertionError):
        check_against_reference(model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
