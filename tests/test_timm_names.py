"""evit_<timm name>: every timm ViT that apply supports, by name, with timm's own pretrained tags."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import timm_evit
from timm_evit.evit_timm import GENERATED_WITH_TIMM, TIMM_ARCHITECTURES
from timm_evit.tools.plain import parse_model_name

from helpers import SMALL_VIT_IMG32
from timm_evit.tools.supported import architecture_refusal, survey


# (ModelSpec.plain_name, ModelSpec.plain_kwargs): what the tools measure a name against
def plain_model_name(name):
    spec = parse_model_name(name)
    return spec.plain_name, spec.plain_kwargs


def test_the_list_is_what_apply_supports_in_the_installed_timm():
    present = [arch for arch in TIMM_ARCHITECTURES if timm.is_model(arch)]
    assert len(TIMM_ARCHITECTURES) > 100 and len(present) > 0.8 * len(TIMM_ARCHITECTURES)
    assert sorted(timm.list_models('evit_*', exclude_filters=['evit_deit_tiny', 'evit_deit_small', 'evit_deit_base',
                                                              'evit_lvvit_*'])) == sorted('evit_' + a for a in present)
    if timm.__version__ == GENERATED_WITH_TIMM:
        supported, refused = survey()   # every candidate, built on the meta device
        assert supported == list(TIMM_ARCHITECTURES), 'regenerate: python -m timm_evit.tools.supported --write'
        assert 'ParallelScalingBlock' in refused['vit_base_patch16_xp_224']
        # without a class token: SigLIP ('map'), average-pooled register models, PE-G (Eva)
        assert {'vit_base_patch16_siglip_224', 'vit_medium_patch16_reg4_gap_256',
                'vit_pe_core_gigantic_patch14_448'} <= set(supported)
    else:   # another timm: every listed architecture it has must still convert
        assert {arch: architecture_refusal(arch) for arch in present} == {arch: None for arch in present}


def test_unsupported_architectures_have_no_name():
    for arch in ('vit_base_patch16_xp_224', 'vit_small_patch16_18x2_224', 'resnet50'):
        assert not timm.is_model('evit_' + arch)
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('evit_vit_base_patch16_xp_224')


def test_a_generated_name_is_timms_model_converted():
    torch.manual_seed(0)
    plain = timm.create_model('deit3_small_patch16_224', **SMALL_VIT_IMG32).eval()
    evit = timm.create_model('evit_deit3_small_patch16_224', keep_rate=0.5, fuse_token=False, **SMALL_VIT_IMG32).eval()
    assert type(evit) is timm_evit.VisionTransformerEViT and isinstance(evit, VisionTransformer)
    assert evit.keep_rate == (0.5, 0.5, 0.5) and evit.reorg_layers == (1, 2, 3) and not evit.fuse_token
    assert evit.state_dict().keys() == plain.state_dict().keys()
    evit.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(evit(x, keep_rate=1.0), plain(x))
        tokens = evit.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
    assert [t.shape[1] for t in tokens] == [16, 8, 4, 2]   # ceil(16 * 0.5) ..., no fused token


def test_pretrained_tags_are_timms_and_load_timms_weights(tmp_path):
    tags = timm.list_pretrained('evit_deit3_small_patch16_224.*')
    assert tags == ['evit_' + name for name in timm.list_pretrained('deit3_small_patch16_224.*')]
    ours = timm.models.get_pretrained_cfg('evit_deit3_small_patch16_224.fb_in22k_ft_in1k')
    theirs = timm.models.get_pretrained_cfg('deit3_small_patch16_224.fb_in22k_ft_in1k')
    assert ours.hf_hub_id == theirs.hf_hub_id == 'timm/deit3_small_patch16_224.fb_in22k_ft_in1k'
    assert (ours.mean, ours.std, ours.input_size, ours.crop_pct) == (theirs.mean, theirs.std, theirs.input_size,
                                                                    theirs.crop_pct)
    # pretrained=True goes through timm's own loading; a local file stands in for the Hub here
    torch.manual_seed(1)
    plain = timm.create_model('deit3_small_patch16_224')
    weights = tmp_path / 'model.safetensors'
    save_file(plain.state_dict(), str(weights))
    evit = timm.create_model('evit_deit3_small_patch16_224.fb_in22k_ft_in1k', pretrained=True, keep_rate=0.7,
                             pretrained_cfg_overlay=dict(file=str(weights)))
    for name, tensor in plain.state_dict().items():
        assert torch.equal(evit.state_dict()[name], tensor), name
    assert evit.keep_rate == (0.7, 0.7, 0.7)
    assert evit.pretrained_cfg['hf_hub_id'] == theirs.hf_hub_id   # what validate.py reads its transform from


def test_fine_tuning_through_a_generated_name_has_the_warmup():
    model = timm.create_model('evit_deit3_small_patch16_224', keep_rate=0.5, keep_rate_warmup_start=1,
                              keep_rate_warmup_steps=2, **SMALL_VIT_IMG32).train()
    x = torch.randn(1, 3, 32, 32)
    seen = []
    for _ in range(4):
        tokens = model.forward_intermediates(x, output_fmt='NLC', intermediates_only=True)
        seen.append(tokens[-1].shape[1])
    # keep 1.0, 1.0, the cosine's midpoint 0.75 (16 -> 12 + 1 -> 10 + 1 -> 9 + 1), then 0.5 (-> 3 + 1)
    assert seen == [16, 16, 10, 4] and int(model.keep_rate_step) == 4


def test_tools_measure_a_generated_name_against_timms_model_of_that_name():
    assert plain_model_name('evit_deit3_small_patch16_224.fb_in22k_ft_in1k') == \
        ('deit3_small_patch16_224.fb_in22k_ft_in1k', {})
    assert plain_model_name('evit_vit_small_patch14_reg4_dinov2') == ('vit_small_patch14_reg4_dinov2', {})
    with pytest.raises(ValueError, match="evit_<timm name>.*got 'evit_resnet50'"):
        plain_model_name('evit_resnet50')
