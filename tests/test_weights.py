"""weights/: official checkpoints -> Hub folders -> loaded back three ways, offline; failures leave nothing."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_evit.release
from helpers import (
    DEIT_ROW, lay_out_hf_cache, load_hub, official_evit_checkpoint, randomised_lvvit, save_official_lvvit, takes_files,
)
from timm_evit.checkpoints import read_checkpoint
from timm_evit.evit_deit import EVIT_DEIT_SMALL_TAGS
from timm_evit.release import HUB_NAMESPACE

hub = load_hub()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp('weights')
    sources, out = root / 'sources', root / 'out'
    sources.mkdir()
    out.mkdir()
    rows = {f'{r.architecture}.{r.tag}': r for r in hub.read_manifest()}
    official = official_evit_checkpoint(sources / rows[DEIT_ROW].source_file)
    save_official_lvvit(sources / rows['evit_lvvit_s.tl_in1k'].source_file, randomised_lvvit(seed=4))
    umask = os.umask(0o027)   # an unusual umask: every file and folder written must follow it
    try:
        assert hub.main(['--sources', str(sources), '--out', str(out), '--only', DEIT_ROW, 'evit_lvvit_s.tl_in1k']) == 0
    finally:
        os.umask(umask)
    return root, official, rows


def test_manifest_matches_the_registered_tags():
    rows = hub.read_manifest()
    deit = {r.tag: r for r in rows if r.architecture == 'evit_deit_small'}
    assert set(deit) == set(EVIT_DEIT_SMALL_TAGS)
    for tag, row in deit.items():
        assert row.model_args == EVIT_DEIT_SMALL_TAGS[tag]
        cfg = timm.create_model(f'evit_deit_small.{tag}').pretrained_cfg
        assert cfg['hf_hub_id'] == row.repo_id == f'{HUB_NAMESPACE}/evit_deit_small.{tag}'
    for row in rows:
        assert f'{row.architecture}.{row.tag}' in timm.list_pretrained('evit_*')
        assert row.top1 and row.figures_from and row.weights_license


def test_dry_run_prints_the_plan_for_every_row(capsys):
    assert hub.main([]) == 0
    out = capsys.readouterr().out
    for row in hub.read_manifest():
        assert f'- {row.architecture}.{row.tag}: {row.source_file}' in out and f'would upload to {row.repo_id}' in out


def test_hub_folder_in_timms_format(converted):
    root, official, _ = converted
    folder = root / 'out' / DEIT_ROW
    assert sorted(os.listdir(root / 'out')) == ['evit_deit_small.keep60_drop_in1k', 'evit_lvvit_s.tl_in1k']
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'evit_deit_small' and config['num_classes'] == 1000
    assert config['num_features'] == 384
    assert config['model_args']['keep_rate'] == 0.6 and config['model_args']['fuse_token'] is False
    assert config['pretrained_cfg']['mean'] == list(timm.data.IMAGENET_DEFAULT_MEAN)
    weights = load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(weights[k], v) for k, v in official.items())
    card = (folder / 'README.md').read_text()
    assert 'library_name: timm' in card and 'top-1 79.1 %' in card and "keep_rate=0.6" in card


def test_hub_config_describes_the_rows_own_weights(converted):
    root, _, rows = converted
    for name, tag in ((DEIT_ROW, 'keep60_drop_in1k'), ('evit_lvvit_s.tl_in1k', 'tl_in1k')):
        config = json.loads((root / 'out' / name / 'config.json').read_text())
        assert config['pretrained_cfg']['tag'] == tag and config['architecture'] == name.split('.')[0]
    assert 'notes' not in json.loads((root / 'out' / 'evit_lvvit_s.tl_in1k' / 'config.json').read_text())['pretrained_cfg']
    deit = json.loads((root / 'out' / DEIT_ROW / 'config.json').read_text())['pretrained_cfg']
    assert 'EViT-trained DeiT-S' in deit['notes'][0] and 'keep_rate 0.6' in deit['notes'][0]


def test_hub_folders_and_files_follow_the_umask(converted):
    root, _, _ = converted
    for name in (DEIT_ROW, 'evit_lvvit_s.tl_in1k'):
        folder = root / 'out' / name
        assert folder.stat().st_mode & 0o777 == 0o777 & ~0o027
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
            n: 0o666 & ~0o027 for n in ('README.md', 'config.json', 'model.safetensors')}


def test_every_row_is_checked_before_any_is_converted(tmp_path, monkeypatch, capsys):
    sources, out = tmp_path / 'sources', tmp_path / 'out'
    sources.mkdir()
    (out / 'evit_lvvit_s.tl_in1k').mkdir(parents=True)   # the second row's folder exists already
    for row in hub.read_manifest():
        (sources / row.source_file).write_bytes(b'never read')
    monkeypatch.setattr(hub, 'convert', lambda *a: pytest.fail('converted before every row was checked'))
    monkeypatch.delenv('HF_TOKEN', raising=False)
    args = ['--sources', str(sources), '--out', str(out), '--only', DEIT_ROW, 'evit_lvvit_s.tl_in1k']

    def refused(extra, words):
        assert hub.main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        return len(err) == 1 and err[0].startswith('weights/hub.py: ') and words in err[0]

    assert refused([], 'evit_lvvit_s.tl_in1k exists already')
    assert os.listdir(out) == ['evit_lvvit_s.tl_in1k']
    (out / 'evit_lvvit_s.tl_in1k').rmdir()   # no folder in the way now, but no token for --push
    assert refused(['--push'], '--push needs a Hugging Face token in the environment variable HF_TOKEN')
    assert os.listdir(out) == []


@pytest.mark.parametrize('where', ['under a file', 'read-only folder'])
def test_an_unwritable_out_is_refused_before_converting(tmp_path, monkeypatch, capsys, where):
    sources = tmp_path / 'sources'
    sources.mkdir()
    row = next(r for r in hub.read_manifest() if r.name == DEIT_ROW)
    (sources / row.source_file).write_bytes(b'never read')
    (tmp_path / 'a_file').write_text('')
    out = tmp_path / 'a_file' / 'hub' if where == 'under a file' else tmp_path / 'read_only'
    if where == 'read-only folder':
        out.mkdir(mode=0o555)
        if takes_files(out):
            pytest.skip('a read-only folder is writable here (running as root): the "under a file" case still runs')
    monkeypatch.setattr(hub, 'convert', lambda *a: pytest.fail('converted although --out cannot be written'))
    assert hub.main(['--sources', str(sources), '--out', str(out), '--only', DEIT_ROW]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('weights/hub.py: --out') and str(out) in err[0], err


def test_loaded_three_ways_offline_with_the_converted_logits(converted, offline_hub, monkeypatch):
    root, _, rows = converted
    folder = root / 'out' / DEIT_ROW
    x = torch.randn(2, 3, 224, 224)
    reference = hub.convert(rows[DEIT_ROW], str(root / 'sources' / rows[DEIT_ROW].source_file))
    with torch.no_grad():
        expected = reference(x)

    # a Hugging Face cache holding the published repository, as hf_hub_download leaves it
    lay_out_hf_cache(offline_hub, f'{HUB_NAMESPACE}/{DEIT_ROW}', {name: (folder / name).read_bytes()
                                                                  for name in os.listdir(folder)})
    monkeypatch.setattr(timm_evit.release, 'EVIT_RELEASE_PUBLISHED', True)   # as once published: the cache above
    for name in [DEIT_ROW, f'hf-hub:{HUB_NAMESPACE}/{DEIT_ROW}']:
        model = timm.create_model(name, pretrained=True).eval()
        assert model.keep_rate == (0.6, 0.6, 0.6) and model.fuse_token is False, (name, model.keep_rate)
        with torch.no_grad():
            assert torch.equal(model(x), expected), name
    local = timm.create_model('evit_deit_small', keep_rate=0.6, fuse_token=False, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'))).eval()
    with torch.no_grad():
        assert torch.equal(local(x), expected)

    lvvit = timm.create_model('evit_lvvit_s', pretrained=True, pretrained_cfg_overlay=dict(
        file=str(root / 'out' / 'evit_lvvit_s.tl_in1k' / 'model.safetensors'))).eval()
    source = randomised_lvvit(seed=4)
    assert all(torch.equal(lvvit.state_dict()[k], v) for k, v in source.state_dict().items())


# A fresh interpreter: the namespace is read when timm_evit is imported (the registered tags point there).
def test_namespace_is_overridable(tmp_path):
    code = "import timm; print(timm.create_model('evit_deit_small.keep70_fuse_in1k').pretrained_cfg['hf_hub_id'])"
    result = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, TIMM_EVIT_HUB_NAMESPACE='my-org'),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.stdout.strip() == 'my-org/evit_deit_small.keep70_fuse_in1k', result.stderr


@pytest.mark.parametrize('damage, words', [
    ('truncated', 'cannot be read safely'),
    ('missing', "missing keys ['blocks.2.attn.qkv.bias']"),
    ('unexpected', "unexpected keys ['blocks.0.attn.gamma']"),
    ('unsafe', 'cannot be read safely (weights_only=True)'),
    ('wrong_shape', 'size mismatch for blocks.0.mlp.fc1.weight'),
])
def test_bad_sources_fail_clearly_and_write_nothing(tmp_path, capsys, damage, words):
    sources, out = tmp_path / 'sources', tmp_path / 'out'
    sources.mkdir()
    out.mkdir()
    path = sources / next(r for r in hub.read_manifest() if f'{r.architecture}.{r.tag}' == DEIT_ROW).source_file
    official_evit_checkpoint(path, drop='blocks.2.attn.qkv.bias' if damage == 'missing' else None,
                             extra='blocks.0.attn.gamma' if damage == 'unexpected' else None)
    if damage == 'truncated':
        path.write_bytes(path.read_bytes()[:100_000])
    if damage == 'unsafe':
        torch.save({'model': {}, 'hook': subprocess.Popen}, path)
    if damage == 'wrong_shape':
        checkpoint = torch.load(path, weights_only=False)
        checkpoint['model']['blocks.0.mlp.fc1.weight'] = torch.zeros(1536, 100)
        torch.save(checkpoint, path)
    assert hub.main(['--sources', str(sources), '--out', str(out), '--only', DEIT_ROW]) == 2
    err = capsys.readouterr().err
    assert words in err and f'{DEIT_ROW} from {path}' in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == []


def test_corrupted_or_truncated_safetensors_fail_clearly(converted, tmp_path):
    root, _, _ = converted
    good = (root / 'out' / DEIT_ROW / 'model.safetensors').read_bytes()
    for name, data in [('truncated.safetensors', good[:len(good) // 2]), ('corrupted.safetensors', b'\xff' * 64 + good[64:])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match='not a readable safetensors file'):
            read_checkpoint(str(tmp_path / name))
        with pytest.raises(Exception, match='(?i)safetensor|deserializ|header'):
            timm.create_model('evit_deit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / name)))
