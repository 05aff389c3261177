"""pretrained=True goes through timm's and huggingface_hub's real code, offline, from a cache the test lays out."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import timm_evit  # noqa: F401

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def lay_out_hf_cache(cache, repo_id, state_dict):
    """The Hugging Face cache layout that hf_hub_download resolves offline: refs/main -> snapshot."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(COMMIT)
    snapshot = repo / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / 'model.safetensors'))


@pytest.fixture(scope='module')
def deit_small_weights():
    torch.manual_seed(1)
    return timm.create_model('deit_small_patch16_224').state_dict()


def run_offline(code, cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'hf_home'))
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_pretrained_true_loads_timms_deit_weights_from_the_hub_cache(tmp_path, deit_small_weights):
    cache = tmp_path / 'hub'
    lay_out_hf_cache(cache, 'timm/deit_small_patch16_224.fb_in1k', deit_small_weights)
    out = tmp_path / 'loaded.safetensors'
    result = run_offline(f"""
        import timm, json
        from safetensors.torch import save_file
        model = timm.create_model('evit_deit_small', pretrained=True)
        save_file(model.state_dict(), {str(out)!r})
        big = timm.create_model('evit_deit_small.fb_in1k', pretrained=True, img_size=288)
        print(json.dumps([list(big.pos_embed.shape), big.pretrained_cfg['hf_hub_id']]))
    """, cache, tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = load_file(str(out))
    assert loaded.keys() == deit_small_weights.keys()
    for key, value in deit_small_weights.items():
        assert torch.equal(loaded[key], value), key
    # other img_size: position embeddings resampled to the 18 x 18 grid on load
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[1, 325, 384], 'timm/deit_small_patch16_224.fb_in1k']


def test_missing_weights_fail_offline_with_huggingface_hubs_error(tmp_path):
    result = run_offline("import timm; timm.create_model('evit_deit_tiny', pretrained=True)", tmp_path / 'empty', tmp_path)
    assert result.returncode != 0
    assert 'offline' in result.stderr.lower() or 'LocalEntryNotFound' in result.stderr


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


def test_unpublished_release_tags_fail_at_once_and_say_how_to_load_the_official_file(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
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


def test_the_published_switch_makes_the_tags_load_from_the_hub(tmp_path, deit_small_weights):
    cache = tmp_path / 'hub'
    lay_out_hf_cache(cache, 'timm-evit/evit_deit_small.keep60_drop_in1k', deit_small_weights)
    code = """
        import timm, timm_evit.release
        try:
            timm.create_model('evit_deit_small.keep60_drop_in1k', pretrained=True)
        except RuntimeError as e:
            print('refused:', 'not published' in str(e))
        timm_evit.release.EVIT_RELEASE_PUBLISHED = True     # the one switch
        model = timm.create_model('evit_deit_small.keep60_drop_in1k', pretrained=True)
        print('loaded:', model.keep_rate, model.fuse_token, float(model.cls_token.sum()))
    """
    result = run_offline(code, cache, tmp_path)
    assert result.returncode == 0, result.stderr
    expected = float(deit_small_weights['cls_token'].sum())
    assert result.stdout.split('\n')[:2] == ['refused: True', f'loaded: (0.6, 0.6, 0.6) False {expected}']
