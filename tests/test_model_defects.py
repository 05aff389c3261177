"""A timm model in every way: features_only for every name, state dicts that always load back,
empty batches (issue 18, items 8 to 10)."""
import pytest
import timm
import torch

from conftest import TINY

# One generated name per family, small: (timm architecture, creation arguments).
VIT = dict(img_size=32, depth=4, embed_dim=48, num_heads=2)
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
    assert evit.pretrained_cfg == theirs.pretrained_cfg
