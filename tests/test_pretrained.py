"""pretrained=True goes through timm's and huggingface_hub's real code, offline, from a cache the test lays out."""
import traceback

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_evit.release
from helpers import lay_out_hf_cache, safetensors_file


@pytest.fixture(scope='module')
def deit_small_weights():
    torch.manual_seed(1)
    return timm.create_model('deit_small_patch16_224').state_dict()


def test_pretrained_true_loads_timms_deit_weights_from_the_hub_cache(offline_hub, deit_small_weights):
    lay_out_hf_cache(offline_hub, 'timm/deit_small_patch16_224.fb_in1k',
                     {'model.safetensors': safetensors_file(deit_small_weights)})
    loaded = timm.create_model('evit_deit_small', pretrained=True).state_dict()
    assert loaded.keys() == deit_small_weights.keys()
    for key, value in deit_small_weights.items():
        assert torch.equal(loaded[key], value), key
    # other img_size: position embeddings resampled to the 18 x 18 grid on load
    big = timm.create_model('evit_deit_small.fb_in1k', pretrained=True, img_size=288)
    assert [list(big.pos_embed.shape), big.pretrained_cfg['hf_hub_id']] == [[1, 325, 384],
                                                                             'timm/deit_small_patch16_224.fb_in1k']


def test_missing_weights_fail_offline_with_huggingface_hubs_error(offline_hub):
    with pytest.raises(Exception) as failure:
        timm.create_model('evit_deit_tiny', pretrained=True)
    text = ''.join(traceback.format_exception(failure.value))   # as a traceback shows it
    assert 'offline' in text.lower() or 'LocalEntryNotFound' in text


def test_pretrained_cfg_overlay_file(tmp_path, deit_small_weights):
    path = tmp_path / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in deit_small_weights.items()}, str(path))
    model = timm.create_model('evit_deit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, deit_small_weights[key]), key
    # EViT adds no parameters: at keep_rate 1.0 the output is timm's DeiT with those weights
    deit = timm.create_model('deit_small_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, keep_rate=1.0), deit(x))


def test_unpublished_release_tags_fail_at_once_and_say_how_to_load_the_official_file(offline_hub):
    for name, kwargs in [('evit_deit_small.keep70_fuse_in1k', {}),
                         ('evit_deit_small', dict(pretrained_cfg='keep50_drop_in1k'))]:
        with pytest.raises(RuntimeError) as info:
            timm.create_model(name, pretrained=True, **kwargs)
        message = str(info.value)
        assert 'not published on the Hugging Face Hub yet' in message
        assert 'pretrained_cfg_overlay=dict(file=' in message
    assert "evit_deit_small_keep0.5_drop.pth" in message        # the official file's name
    # without pretrained=True the tag only sets the architecture and keep rate
    assert timm.create_model('evit_deit_small.keep70_drop_in1k').keep_rate == (0.7,) * 3


def test_the_official_evit_file_loads_through_the_tag_with_a_file_overlay(tmp_path, deit_small_weights):
    # the official release layout: the DeiT state dict under 'model', the training arguments beside it
    import argparse
    path = tmp_path / 'evit_deit_small_keep0.7_fuse.pth'
    torch.save({'model': deit_small_weights, 'epoch': 29, 'args': argparse.Namespace(base_keep_rate=0.7)}, path)
    model = timm.create_model('evit_deit_small.keep70_fuse_in1k', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.keep_rate == (0.7,) * 3 and model.fuse_token is True
    for key, value in model.state_dict().items():
        assert torch.equal(value, deit_small_weights[key]), key


def test_the_published_switch_makes_the_tags_load_from_the_hub(offline_hub, deit_small_weights, monkeypatch):
    lay_out_hf_cache(offline_hub, 'timm-evit/evit_deit_small.keep60_drop_in1k',
                     {'model.safetensors': safetensors_file(deit_small_weights)})
    with pytest.raises(RuntimeError, match='not published'):
        timm.create_model('evit_deit_small.keep60_drop_in1k', pretrained=True)
    monkeypatch.setattr(timm_evit.release, 'EVIT_RELEASE_PUBLISHED', True)     # the one switch
    model = timm.create_model('evit_deit_small.keep60_drop_in1k', pretrained=True)
    expected = float(deit_small_weights['cls_token'].sum())
    assert (model.keep_rate, model.fuse_token, float(model.cls_token.detach().sum())) == ((0.6, 0.6, 0.6), False,
                                                                                      expected)
