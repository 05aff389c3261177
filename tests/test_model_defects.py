"""A timm model in every way: features_only for every name, state dicts that always load back,
empty batches (issue 18, items 8 to 10)."""
import pytest
import timm
import torch

from helpers import SMALL_VIT, TINY_DEIT

# One generated name per family, small: (timm architecture, creation arguments).
VIT = dict(SMALL_VIT, img_size=32)
PATCH14 = dict(VIT, img_size=28)
FAMILIES = {
    'deit3': ('deit3_small_patch16_224', VIT),
    'augreg vit': ('vit_small_patch16_224', VIT),
    'dinov2 registers': ('vit_small_patch14_reg4_dinov2', PATCH14),
    'clip': ('vit_base_patch16_clip_224', VIT),
    'distilled deit': ('deit_tiny_distilled_patch16_224', VIT),
    'eva02': ('eva02_tiny_patch14_224', PATCH14),
    'dinov3': ('vit_small_patch16_dinov3', VIT),
    'pe': ('vit_pe_core_tiny_patch16_384', VIT),
    'rope mixed': ('vit_small_patch16_rope_mixed_224', VIT),
}
# The paper's names beside the timm model they reorganise
PAPER = {'evit_deit_tiny': ('deit_tiny_patch16_224', dict(VIT, patch_size=16))}


def _images(kwargs, batch=2):
    return torch.randn(batch, 3, kwargs['img_size'], kwargs['img_size'])


def _feature_pair(evit_name, timm_name, kwargs, **feature_args):
    """timm's features_only model and EViT's at keep 1.0 with its weights."""
    plain = timm.create_model(timm_name, features_only=True, **kwargs, **feature_args).eval()
    evit = timm.create_model(evit_name, features_only=True, keep_rate=1.0, **kwargs, **feature_args).eval()
    evit.load_state_dict(plain.state_dict())
    return plain, evit


@pytest.mark.parametrize('evit_name, timm_name, kwargs', [
    *[('evit_' + arch, arch, kwargs) for arch, kwargs in FAMILIES.values()],
    *[(name, arch, kwargs) for name, (arch, kwargs) in PAPER.items()],
], ids=[*FAMILIES, *PAPER])
def test_features_only_is_timms_feature_wrapper_for_every_family(evit_name, timm_name, kwargs):
    plain, evit = _feature_pair(evit_name, timm_name, kwargs)
    assert type(evit) is type(plain)
    assert evit.feature_info.get_dicts() == plain.feature_info.get_dicts()
    assert evit.feature_info.out_indices == plain.feature_info.out_indices
    assert evit.state_dict().keys() == plain.state_dict().keys()
    x = _images(kwargs)
    with torch.no_grad():
        theirs, ours = plain(x), evit(x)
        assert len(ours) == len(theirs)
        for a, b in zip(theirs, ours):
            assert torch.equal(a, b)      # keep 1.0: timm's features, exactly
        evit.model.set_keep_rate(0.5)
        assert [f.shape for f in evit(x)] == [f.shape for f in theirs]   # NCHW: timm's shapes below 1.0 too


@pytest.mark.parametrize('family', ['deit3', 'eva02'])
def test_features_only_takes_timms_out_indices_and_feature_classes(family):
    arch, kwargs = FAMILIES[family]
    x = _images(kwargs, batch=1)
    for feature_args in (dict(out_indices=(0, 2)), dict(feature_cls='hook'), dict(feature_cls='fx')):
        plain, evit = _feature_pair('evit_' + arch, arch, kwargs, **feature_args)
        assert type(evit) is type(plain), feature_args
        assert evit.feature_info.get_dicts() == plain.feature_info.get_dicts(), feature_args
        with torch.no_grad():
            for a, b in zip(plain(x), evit(x)):
                assert torch.equal(a, b), feature_args


def test_features_only_counts_reorg_layers_over_the_full_depth():
    # converted before timm's wrapper prunes the blocks after the last index, as the paper's names are
    arch, kwargs = FAMILIES['deit3']
    evit = timm.create_model('evit_' + arch, features_only=True, out_indices=(0, 1), reorg_layers=(1, 3), **kwargs)
    assert len(evit.model.blocks) == 2 and evit.model.reorg_layers == (1,)
    default = timm.create_model('evit_' + arch, features_only=True, out_indices=(0, 1), **kwargs)
    assert default.model.reorg_layers == (1,)    # of the default (1, 2, 3) for depth 4


def test_features_only_loads_timms_pretrained_weights(tmp_path):
    from safetensors.torch import save_file
    arch, kwargs = FAMILIES['deit3']
    plain = timm.create_model(arch, **kwargs)
    weights = tmp_path / 'model.safetensors'
    save_file(plain.state_dict(), str(weights))
    evit = timm.create_model(f'evit_{arch}.fb_in22k_ft_in1k', pretrained=True, features_only=True, **kwargs,
                             pretrained_cfg_overlay=dict(file=str(weights)))
    for name, tensor in evit.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name.removeprefix('model.')]), name
    theirs = timm.create_model(f'{arch}.fb_in22k_ft_in1k', pretrained=True, features_only=True, **kwargs,
                               pretrained_cfg_overlay=dict(file=str(weights)))
    # timm's cfg for the tag, naming the architecture that builds this model (issue 30, item 3)
    assert evit.pretrained_cfg == {**theirs.pretrained_cfg, 'architecture': f'evit_{arch}'}


# --- item 9: state dicts ---------------------------------------------------------------------

WARMUP = dict(keep_rate_warmup_start=1, keep_rate_warmup_steps=4)


def _images64(batch=1):
    return torch.randn(batch, 3, 64, 64)


def _plain_and_evit(**evit_args):
    torch.manual_seed(0)
    plain = timm.create_model('deit_tiny_patch16_224', **SMALL_VIT, img_size=64)
    evit = timm.create_model('evit_deit_tiny', **TINY_DEIT, img_size=64, **evit_args)
    return plain, evit


def _train_steps(model, steps=3):
    model.train()
    for _ in range(steps):
        model(_images64()).sum().backward()
    return model.eval()


@pytest.mark.parametrize('warmup', [False, True], ids=['no warm-up', 'warm-up'])
def test_plain_weights_load_into_evit_strictly(warmup):
    plain, evit = _plain_and_evit(**(WARMUP if warmup else {}))
    evit.load_state_dict(plain.state_dict())            # strict
    for name, tensor in plain.state_dict().items():
        assert torch.equal(evit.state_dict()[name], tensor), name
    assert set(evit.state_dict()) - set(plain.state_dict()) == ({'keep_rate_step'} if warmup else set())
    if warmup:
        assert int(evit.keep_rate_step) == 0            # a warm-up starts at its first step


def test_evit_weights_load_into_timms_plain_model(tmp_path):
    plain, evit = _plain_and_evit()
    plain.load_state_dict(_train_steps(evit).state_dict())   # no warm-up: the same keys, strict

    plain, evit = _plain_and_evit(**WARMUP)
    _train_steps(evit)
    checkpoint = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 0, 'state_dict': evit.state_dict()}, checkpoint)   # as train.py saves it
    with pytest.raises(RuntimeError, match='Unexpected key.*keep_rate_step'):
        plain.load_state_dict(evit.state_dict())        # the warm-up's progress is the one extra key
    # the README's line
    plain.load_state_dict({k: v for k, v in timm.models.load_state_dict(str(checkpoint)).items() if k != 'keep_rate_step'})
    x = _images64(2)
    with torch.no_grad():
        assert torch.equal(plain(x), evit(x, keep_rate=1.0))


@pytest.mark.parametrize('first, then', [
    ({}, {}), ({}, WARMUP), (WARMUP, {}), (WARMUP, WARMUP), (WARMUP, dict(keep_rate_warmup_steps=9)),
], ids=['none-none', 'none-warmup', 'warmup-none', 'warmup-warmup', 'warmup-other'])
def test_own_state_dict_loads_back_strictly_whatever_was_applied(first, then):
    import timm_evit
    _, model = _plain_and_evit(keep_rate=0.5, **first)
    _train_steps(model)
    before = model.state_dict()
    timm_evit.apply(model, keep_rate=0.7, reorg_layers=(1, 2), **then)
    model.load_state_dict(model.state_dict())           # strict: its own state dict
    model.load_state_dict(before)                       # and the one saved before the re-apply
    assert ('keep_rate_step' in model.state_dict()) == bool(then)
    assert [name for name, _ in model.named_buffers()] == (['keep_rate_step'] if then else [])
    copy = timm.create_model('evit_deit_tiny', **TINY_DEIT, img_size=64, keep_rate=0.7, **then)
    copy.load_state_dict(model.state_dict())            # and into a model built with those arguments
    model.train()(_images64())          # trains on: the warm-up counts, or nothing does


# --- item 10: empty batches, a model without reorganising blocks ------------------------------

EMPTY_BATCH_MODELS = {
    'vit': ('evit_deit3_small_patch16_224', VIT),
    'vit registers': ('evit_vit_small_patch14_reg4_dinov2', PATCH14),
    'distilled': ('evit_deit_tiny_distilled_patch16_224', VIT),
    'eva rope (pe)': ('evit_vit_pe_core_tiny_patch16_384', VIT),
    'eva rope mixed': ('evit_vit_small_patch16_rope_mixed_224', VIT),
    'lvvit': ('evit_lvvit_s', dict(VIT, reorg_layers=(1, 2))),
}


@pytest.mark.parametrize('fuse', [True, False], ids=['fuse', 'drop'])
@pytest.mark.parametrize('name, kwargs', EMPTY_BATCH_MODELS.values(), ids=EMPTY_BATCH_MODELS)
def test_an_empty_batch_gives_empty_outputs_of_the_batchs_shapes(name, kwargs, fuse):
    model = timm.create_model(name, keep_rate=0.5, fuse_token=fuse, **kwargs).eval()
    one, empty = _images(kwargs, batch=1), _images(kwargs, batch=0)
    with torch.no_grad():
        for call in (model, model.forward_features):
            assert call(empty).shape == (0, *call(one).shape[1:]), call
        final, intermediates = model.forward_intermediates(empty)
        final_1, intermediates_1 = model.forward_intermediates(one)
        assert final.shape == (0, *final_1.shape[1:])
        assert [t.shape for t in intermediates] == [(0, *t.shape[1:]) for t in intermediates_1]
        nlc = model.forward_intermediates(empty, output_fmt='NLC', intermediates_only=True)
        nlc_1 = model.forward_intermediates(one, output_fmt='NLC', intermediates_only=True)
        assert [t.shape for t in nlc] == [(0, *t.shape[1:]) for t in nlc_1]


def test_eva_attention_step_takes_an_empty_batch():
    # timm's own EvaAttention cannot (its reshape infers the head size), so Eva02 fails on an empty
    # batch in timm's blocks, at keep 1.0 as in timm's model; EViT's step itself does not
    from timm_evit import rope_attention_with_class_attention
    model = timm.create_model('eva02_tiny_patch14_224', **PATCH14).eval()
    attn, x = model.blocks[0].attn, torch.randn(0, 5, 48)
    rope = model.rope.get_embed()
    with torch.no_grad():
        out, cls_attn = rope_attention_with_class_attention(attn, x, rope, num_prefix_tokens=1)
    assert out.shape == (0, 5, 48) and cls_attn.shape == (0, 4)


def test_masks_of_a_model_without_reorganising_blocks_are_the_input_alone():
    from timm_evit.tools.visualize import KEPT, reorganisation_masks
    model = timm.create_model('evit_deit3_small_patch16_224', reorg_layers=(), **VIT)
    masks = reorganisation_masks(model, _images(VIT))
    assert masks.shape == (2, 0, 2, 2) and masks.dtype == torch.int8     # zero stages
    from timm_evit.tools._io import pyplot
    from timm_evit.tools.visualize import masks_figure
    fig = masks_figure(torch.rand(3, 32, 32), masks[0], [])               # the input panel alone
    assert len(fig.axes) == 1
    pyplot().close(fig)
    model = timm.create_model('evit_deit3_small_patch16_224', keep_rate=0.5, reorg_layers=(1, 3), **VIT)
    assert reorganisation_masks(model, _images(VIT, batch=0)).shape == (0, 2, 2, 2)
    masks = reorganisation_masks(model, _images(VIT, batch=1), keep_rate=1.0)
    assert masks.shape == (1, 2, 2, 2) and (masks == KEPT).all()


def test_reorganising_an_empty_batch():
    from timm_evit import reorganize_tokens
    for fuse in (True, False):
        tokens, kept = reorganize_tokens(torch.randn(0, 5, 8), torch.rand(0, 4), 2, fuse)
        assert tokens.shape == (0, 1 + 2 + fuse, 8) and kept.shape == (0, 2)


def _evit_state(model):
    blocks = [(type(b).__name__, getattr(b, 'budget', None), getattr(b, 'fusion', None), getattr(b, 'score', None),
               getattr(b, 'fuse_token', None)) for b in model.blocks]
    evit = {name: getattr(model, name, None) for name in ('keep_rate', 'reorg_layers', 'fuse_token',
                                                           'fusion', 'score')}
    return type(model).__name__, type(model.blocks).__name__, blocks, evit


@pytest.mark.parametrize('first', [None, dict(keep_rate=0.5, fusion='paper', score='mean')], ids=['timm', 'evit'])
@pytest.mark.parametrize('refused', [dict(score='class'), dict(keep_rate=[0.5, 0.5]), dict(keep_rate=2.),
                                     dict(reorg_layers=(3, 1)), dict(fusion='sized'), dict(keep_rate_warmup_steps=-1)],
                         ids=['score', 'rates per block', 'rate', 'layers', 'fusion', 'warm-up'])
def test_a_refused_apply_leaves_the_model_as_it_was(first, refused):
    # every argument is checked against the model before anything changes (a half-converted model,
    # EViT effectively off, before)
    import timm_evit
    model = timm.create_model('vit_medium_patch16_reg4_gap_256', img_size=64, **SMALL_VIT).eval()   # no class token
    if first is not None:
        timm_evit.apply(model, **first)
    before = _evit_state(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises((TypeError, ValueError)):
        timm_evit.apply(model, **{'keep_rate': 0.3, 'fusion': 'size', **refused})
    assert _evit_state(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
