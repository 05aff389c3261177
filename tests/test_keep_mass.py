"""``keep_mass``: per-image token budgets (docs/design.md, "Per-image token budgets"). Each image
keeps its fewest highest-scored tokens whose scores reach a share of its total; a batch is laid
out to its largest count with the rest padding, hidden everywhere after. Against the family
references (the count by hand from materialised probabilities and a cumulative sum, image by
image), against each image run alone, and the padding's bookkeeping."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_evit
from evit_reference import at_mass_threshold, count_by_mass, kept_indices_by_block
from helpers import (
    FAMILIES, SHARPER, check_against_family_reference, content_driven, converted, family_params, images,
    randomise_weights, varied_images,
)
from timm_evit.reorg import num_kept_by_mass

# a class token, registers, RoPE (interleaved; half with registers), 'mean' on an 'avg' head, 'pool' heads
MASS_FAMILIES = ['deit', 'dinov2_reg', 'eva02', 'dinov3', 'reg_gap', 'siglip', 'pe_map']
def counts_per_block(model, x, **kwargs):
    """Each image's count after every block: its tokens of size > 0."""
    with torch.no_grad():
        out = model.forward_intermediates(x, output_dict=True, intermediates_only=True, **kwargs)
    return [(sizes > 0).sum(dim=1).tolist() for sizes in out['token_sizes']], out


# ---- the count --------------------------------------------------------------------------------

@pytest.mark.parametrize('keep_mass', [0.05, 0.3, 0.7, 0.95, 1.0])
def test_the_count_is_the_cumulative_sum_by_hand(keep_mass):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 40, generator=g) ** 4      # peaked and flat rows
    scores[1] = 1 / 40                                 # every token alike
    valid = torch.ones(6, 40, dtype=torch.bool)
    valid[2, 25:] = False                              # padding: never counted
    valid[3, ::3] = False
    counts, order = num_kept_by_mass(scores, keep_mass, valid)
    for b in range(6):
        a = scores[b][valid[b]].tolist()
        expected = count_by_mass(a, keep_mass)
        if counts[b] != expected:   # only where the threshold falls at a tie
            assert at_mass_threshold(a, keep_mass, (int(counts[b]), expected), 1e-12)
        assert 1 <= counts[b] <= valid[b].sum()
        assert valid[b][order[b, :int(valid[b].sum())]].all()   # padding ranks last


def test_the_count_is_at_least_one_and_at_most_the_tokens_present():
    scores = torch.zeros(2, 5)
    counts, _ = num_kept_by_mass(scores, 0.5)
    assert counts.tolist() == [1, 1]
    scores = torch.tensor([[0.5, 0.5, 0., 0., 0.]])
    assert num_kept_by_mass(scores, 1.0)[0].tolist() == [2]   # zero-score tokens add nothing


# ---- exact, against the references --------------------------------------------------------------

@pytest.mark.parametrize('fusion', ['paper', 'size'])
@pytest.mark.parametrize('family', family_params(MASS_FAMILIES))
def test_against_the_stepped_reference(family, fusion):
    _, model = converted(family, 0.5, True, fusion=fusion)
    model.keep_mass = (0.6, 0.8)[:len(model.reorg_layers)] if len(model.reorg_layers) == 2 else 0.7
    check_against_family_reference(model, family, images(FAMILIES[family].size, batch=2))


@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'math'])
@pytest.mark.parametrize('family', family_params(['deit', 'eva02', 'reg_gap']))
def test_without_fusion_and_on_both_attention_paths(family, fused_attn):
    _, model = converted(family, 0.5, False, fused_attn)
    model.keep_mass = 0.6
    check_against_family_reference(model, family, images(FAMILIES[family].size, batch=2))


@pytest.mark.parametrize('family,score', [
    pytest.param(f, s, id=f'{f}-{s}', marks=p.marks)
    for f, s in [('deit', 'mean'), ('siglip', 'mean'), ('pe', 'pool')] for p in family_params([f])])
def test_every_score_against_the_stepped_reference(family, score):
    _, model = converted(family, 0.5, True, fusion='size')
    model.score = score
    model.keep_mass = 0.6
    check_against_family_reference(model, family, images(FAMILIES[family].size, batch=2))


# ---- a batch: padding, and each image as if alone ---------------------------------------------------

@pytest.mark.parametrize('fuse_token,fusion', [(True, 'paper'), (True, 'size'), (False, 'paper')],
                         ids=['fuse-paper', 'fuse-size', 'drop'])
@pytest.mark.parametrize('family', family_params(list(SHARPER)))
def test_a_batch_gives_each_image_what_it_gives_alone(family, fuse_token, fusion):
    _, model = converted(family, 0.5, fuse_token, fusion=fusion)
    model = content_driven(model, SHARPER[family])
    model.keep_mass = 0.8
    x = varied_images(FAMILIES[family].size)
    counts, _ = counts_per_block(model, x)
    first = counts[model.reorg_layers[0]]
    assert max(first) >= 1.4 * min(first), first   # very different counts: padding in the batch
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[b:b + 1]) for b in range(x.shape[0])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))
    assert together.std() > 0.1


@pytest.mark.parametrize('global_pool', ['avg', 'avgmax', 'max'])
def test_pooling_leaves_the_padding_out(global_pool):
    _, model = converted('reg_gap', 0.5, True, fusion='paper', global_pool=global_pool)
    model = content_driven(model, SHARPER['reg_gap'])
    model.keep_mass = 0.8
    x = varied_images(FAMILIES['reg_gap'].size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[b:b + 1]) for b in range(4)]), rtol=1e-5, atol=1e-5)


def test_the_padding_is_marked_and_carries_nothing():
    _, model = converted('deit', 0.5, True, fusion='size')
    model = content_driven(model, SHARPER['deit'])
    model.keep_mass = 0.8
    x = varied_images(FAMILIES['deit'].size)
    logits, kept = kept_indices_by_block(model, x)
    counts, out = counts_per_block(model, x)
    num_patches = model.patch_embed.num_patches
    for block, idx in kept.items():
        # the kept indices hold -1 in an image's padding slots; its count is what it filled
        filled = (idx >= 0).sum(dim=1)
        fused = [1 if c < n else 0 for c, n in zip(filled.tolist(), counts[block - 1])] if block else None
        if fused is not None:
            assert [f + k for f, k in zip(fused, filled.tolist())] == counts[block]
    for ids, patch_index, sizes in zip(out['token_patch_ids'], out['patch_token_index'], out['token_sizes']):
        assert torch.equal(ids == -2, sizes == 0)                                       # padding: size 0, id -2
        assert torch.equal(sizes.sum(dim=1), torch.full((4,), float(num_patches)))    # every patch, once
        carried = torch.stack([torch.bincount(p, minlength=ids.shape[1]) for p in patch_index]).float()
        assert torch.equal(carried, sizes)                                              # no patch in padding


def test_one_image_has_no_padding_and_no_mask(monkeypatch):
    _, model = converted('deit', 0.5, True)
    model.keep_mass = 0.6
    masks, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    x = images(FAMILIES['deit'].size, batch=1)
    counts, out = counts_per_block(model, x)
    assert all(mask is None for mask in masks) and masks
    assert all((sizes > 0).all() for sizes in out['token_sizes'])
    assert counts[-1][0] < model.patch_embed.num_patches


def test_eva_rows_follow_each_image():
    # RoPE: each image's kept tokens keep their own patches' rows, padding or not
    _, model = converted('dinov3', 0.5, True, fusion='size')
    model.keep_mass = 0.7
    x = torch.cat([images(48, batch=1, seed=1), torch.zeros(1, 3, 48, 48), images(48, batch=1, seed=2) * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[b:b + 1]) for b in range(3)]), rtol=1e-5, atol=1e-5)


def test_lvvit_leaves_the_padding_out_of_its_token_labeling_head():
    model = timm.create_model('evit_lvvit_s', img_size=64, depth=4, embed_dim=64, num_heads=2, reorg_layers=(1, 2),
                              keep_mass=0.6, num_classes=10).eval()
    randomise_weights(model)
    x = varied_images(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[b:b + 1]) for b in range(4)]), rtol=1e-5, atol=1e-5)


def test_training_with_keep_mass_sends_gradients():
    model = timm.create_model('evit_deit_tiny', img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2,
                              reorg_layers=(1, 2), keep_mass=0.6, num_classes=3).train()
    model(images(32, batch=3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- the argument ---------------------------------------------------------------------------------

def test_keep_mass_through_every_way_in():
    model = timm.create_model('evit_deit_tiny', keep_mass=0.8, depth=4, embed_dim=48, num_heads=2, reorg_layers=(1, 2))
    assert model.keep_mass == (0.8, 0.8) and model.keep_rate is None
    model.keep_rate = 0.5                           # a keep rate takes its place
    assert model.keep_mass is None and model.keep_rate == (0.5, 0.5)
    model.set_keep_mass((0.9, 0.7))
    assert model.keep_mass == (0.9, 0.7) and model.keep_rate is None
    plain = timm.create_model('vit_tiny_patch16_224', depth=4)
    assert timm_evit.apply(plain, keep_mass=0.6).keep_mass == (0.6,) * 3
    tagged = timm.create_model('evit_deit_small.keep70_fuse_in1k', keep_mass=0.8, depth=4, reorg_layers=(1, 2))
    assert tagged.keep_mass == (0.8, 0.8) and tagged.fuse_token   # the tag's keep rate gives way, not its fusion


def test_a_call_can_give_its_own_budget():
    _, model = converted('deit', 0.5, True)
    x = images(FAMILIES['deit'].size, batch=2)
    with torch.no_grad():
        by_mass = model(x, keep_mass=0.6)
        model.keep_mass = 0.6
        torch.testing.assert_close(by_mass, model(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x, keep_rate=0.5), converted('deit', 0.5, True)[1](x), rtol=0, atol=0)


@pytest.mark.parametrize('make,message', [
    (lambda: timm.create_model('evit_deit_tiny', keep_rate=0.7, keep_mass=0.8), 'keep_rate or keep_mass, not both'),
    (lambda: timm.create_model('evit_deit_tiny', keep_mass=0.), r'keep_mass must be in \(0, 1\]'),
    (lambda: timm.create_model('evit_deit_tiny', keep_mass=1.5), r'keep_mass must be in \(0, 1\]'),
    (lambda: timm.create_model('evit_deit_tiny', keep_mass=(0.5, 0.5)), 'keep_mass has 2 values but there are 3'),
    (lambda: timm.create_model('evit_deit_tiny', keep_mass=0.5, keep_rate_warmup_steps=10), 'keep_mass'),
    (lambda: timm_evit.apply(timm.create_model('vit_tiny_patch16_224', depth=4), keep_rate=0.5, keep_mass=0.5),
     'not both'),
])
def test_ambiguous_or_bad_budgets_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_a_call_with_both_or_a_mask_is_refused():
    _, model = converted('deit', 0.5, True)
    x = images(FAMILIES['deit'].size, batch=1)
    with pytest.raises(ValueError, match='not both'):
        model(x, keep_rate=0.5, keep_mass=0.5)
    with pytest.raises(ValueError, match='attn_mask'):
        model.forward_features(x, attn_mask=torch.zeros(50, 50), keep_mass=0.5)
    warm = timm.create_model('evit_deit_tiny', depth=4, embed_dim=48, num_heads=2, keep_rate_warmup_steps=5)
    with pytest.raises(ValueError, match='warm-up'):
        warm.keep_mass = 0.5


def test_copies_and_state_dicts_are_unchanged():
    _, model = converted('deit', 0.5, True)
    model.keep_mass = 0.6
    clone = copy.deepcopy(model)
    assert clone.keep_mass == (0.6,) * len(model.reorg_layers)
    assert set(model.state_dict()) == set(converted('deit', 0.5, True)[1].state_dict())


def test_fx_symbolic_trace_keeps_the_per_image_counts():
    # the count and the padded layout sit in functions FX keeps whole (opaque): the traced graph
    # computes each image's own count, as the model does
    _, model = converted('deit', 0.5, True, fusion='size')
    model = content_driven(model, SHARPER['deit'])
    model.keep_mass = 0.8
    traced = torch.fx.symbolic_trace(model)
    x = varied_images(FAMILIES['deit'].size)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
