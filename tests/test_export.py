"""Deployment: ONNX files run in onnxruntime as the PyTorch model does, torch.export programs load
and run, the keep rate is fixed in the graph, the batch axis is not, and a failed export leaves no file."""
import json
import sys

import pytest
import timm
import torch

from helpers import SMALL_VIT, TINY_IMG32, TINY_IMG32_CLI, randomise_weights, run_cli
from timm_evit.tools.export import exported_writer
from timm_evit.tools.files import write_all_whole
from timm_evit.tools.models import create_evit_model

SMALL_VIT_10_CLASSES = dict(SMALL_VIT, num_classes=10)

# name -> model arguments: small, with fusion, at keep rate 0.5 (without fusion: the CLI test below)
MODELS = {
    'evit_deit_tiny': ('evit_deit_tiny', dict(TINY_IMG32, keep_rate=0.5)),
    'evit_lvvit_s': ('evit_lvvit_s', dict(SMALL_VIT_10_CLASSES, img_size=64, reorg_layers=(1, 2), keep_rate=0.5)),
    # DINOv2 with 4 registers (prefix tokens never reorganised), LayerScale: timm_evit.apply
    'dinov2 registers applied': ('vit_small_patch14_reg4_dinov2',
                                 dict(SMALL_VIT_10_CLASSES, img_size=56, keep_rate=0.5)),
    # no class token, a 'map' head: the received attention beside the fused kernel, and the pool's own query
    # (weights drawn peakier: the pool's output is small otherwise)
    'siglip mean': ('evit_vit_base_patch16_siglip_224',
                    dict(SMALL_VIT_10_CLASSES, img_size=64, keep_rate=0.5, score='mean')),
    'siglip pool': ('evit_vit_base_patch16_siglip_224',
                    dict(SMALL_VIT_10_CLASSES, img_size=64, keep_rate=0.5, score='pool')),
    # size-aware fusion: the size bias as SDPA's mask, the pool's mask, the size-weighted average
    'siglip pool size-aware': ('evit_vit_base_patch16_siglip_224',
                               dict(SMALL_VIT_10_CLASSES, img_size=64, keep_rate=0.5, score='pool', fusion='size')),
    'registers gap mean size-aware': ('evit_vit_medium_patch16_reg4_gap_256',
                                      dict(SMALL_VIT_10_CLASSES, img_size=64, keep_rate=0.5, fusion='size')),
}
PEAKY_STD = {'siglip mean': 0.3, 'siglip pool': 0.3, 'siglip pool size-aware': 0.3}


def images(model, batch_size):
    return torch.randn(batch_size, model.in_chans, *model.patch_embed.img_size)


def assert_logits_close(actual, expected):
    assert expected.abs().max() > 0.5   # not vacuous
    torch.testing.assert_close(torch.as_tensor(actual), expected, rtol=0, atol=1e-4)


def onnxruntime_logits(path, x):
    ort = pytest.importorskip('onnxruntime')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(['logits'], {'images': x.numpy()})[0]


@pytest.mark.parametrize('case', sorted(MODELS))
def test_onnx_logits_match_pytorch_at_two_batch_sizes(case, tmp_path):
    pytest.importorskip('onnxscript')
    name, kwargs = MODELS[case]
    model = randomise_weights(create_evit_model(name, **kwargs), peaky_std=PEAKY_STD.get(case, 0.1)).eval()
    write_all_whole({str(tmp_path / 'model.onnx'): exported_writer(model)})
    for batch_size in (1, 3):   # traced with 2: the batch axis is dynamic
        x = images(model, batch_size)
        with torch.no_grad():
            expected = model(x)
            # the keep rate matters for these inputs, so matching it shows that the graph holds it
            assert (model(x, keep_rate=1.0) - expected).abs().max() > 1e-3
        assert_logits_close(onnxruntime_logits(tmp_path / 'model.onnx', x), expected)
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']   # no temporary left


def test_cli_exports_an_applied_timm_vit_without_fusion(tmp_path, capsys):
    pytest.importorskip('onnxscript')
    kwargs = dict(SMALL_VIT_10_CLASSES, img_size=64)
    model = randomise_weights(timm.create_model('deit3_small_patch16_224', **kwargs)).eval()
    torch.save(model.state_dict(), tmp_path / 'deit3.pth')
    out = tmp_path / 'new' / 'deit3.onnx'
    code, stdout, err = run_cli(capsys, [
        'export', '--model', 'deit3_small_patch16_224', '--checkpoint', str(tmp_path / 'deit3.pth'), '--keep-rate', '0.5',
        '--img-size', '64', '--no-fuse', '--out', str(out), '--model-kwargs', 'embed_dim=48', 'depth=4', 'num_heads=2', 'num_classes=10'])
    assert code == 0, err
    assert f'wrote {out}' in stdout and 'keep_rate 0.5 in blocks (1, 2, 3), no fusion' in stdout
    evit = create_evit_model('deit3_small_patch16_224', keep_rate=0.5, fuse_token=False,
                             checkpoint=str(tmp_path / 'deit3.pth'), **kwargs).eval()
    for batch_size in (1, 4):
        x = images(evit, batch_size)
        with torch.no_grad():
            assert_logits_close(onnxruntime_logits(out, x), evit(x))
    onnx = pytest.importorskip('onnx')
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata['timm_evit.keep_rate'] == '(0.5, 0.5, 0.5)' and metadata['timm_evit.fuse_token'] == 'False'
    assert metadata['timm_evit.score'] == "'class'" and metadata['timm_evit.fusion'] == "'size'"   # apply's default


def test_cli_exports_size_aware_fusion_and_says_so(tmp_path, capsys):
    pytest.importorskip('onnxscript')
    onnx = pytest.importorskip('onnx')
    out = tmp_path / 'tiny.onnx'
    code, stdout, err = run_cli(capsys, ['export', '--model', 'evit_deit_tiny', '--keep-rate', '0.5', '--out', str(out),
                                         '--model-kwargs', *TINY_IMG32_CLI, 'fusion=size'])
    assert code == 0, err
    assert 'keep_rate 0.5 in blocks (1, 2), size-aware fusion' in stdout
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata['timm_evit.fusion'] == "'size'"


def test_export_format_round_trip(tmp_path, capsys):
    model = randomise_weights(create_evit_model('evit_deit_tiny', **TINY_IMG32)).eval()
    torch.save(model.state_dict(), tmp_path / 'tiny.pth')
    out = tmp_path / 'tiny.pt2'
    code, _, err = run_cli(capsys, ['export', '--format', 'export', '--model', 'evit_deit_tiny', '--checkpoint',
                                    str(tmp_path / 'tiny.pth'), '--out', str(out), '--no-fuse', '--keep-rate', '0.6',
                                    '--model-kwargs', *TINY_IMG32_CLI])
    assert code == 0, err
    program = torch.export.load(str(out)).module()
    model.fuse_token = False
    model.set_keep_rate(0.6)
    for batch_size in (1, 5):
        x = images(model, batch_size)
        with torch.no_grad():
            assert_logits_close(program(x), model(x))


def test_a_failed_export_leaves_no_file(tmp_path, capsys, monkeypatch):
    def exporter_fails(*args, **kwargs):
        raise RuntimeError('the exporter failed\nover two lines')

    monkeypatch.setattr(torch.export, 'export', exporter_fails)
    argv = ['export', '--format', 'export', '--model', 'evit_deit_tiny', '--out', str(tmp_path / 'sub' / 'm.pt2'),
            '--model-kwargs', *TINY_IMG32_CLI]
    code, _, err = run_cli(capsys, argv)
    assert code == 1 and err.strip() == ('timm-evit export: exporting evit_deit_tiny to export failed: '
                                         'the exporter failed over two lines')
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(tmp_path, capsys, monkeypatch):
    def save_fails_halfway(program, f, **kwargs):
        f.write(b'half a program')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch.export, 'save', save_fails_halfway)
    argv = ['export', '--format', 'export', '--model', 'evit_deit_tiny', '--out', str(tmp_path / 'sub' / 'm.pt2'),
            '--model-kwargs', *TINY_IMG32_CLI]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and err.startswith('timm-evit export: cannot write') and 'No space left' in err
    assert list(tmp_path.iterdir()) == []   # neither the temporary file nor the folder made for it


def test_missing_onnx_packages_say_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)   # import fails
    monkeypatch.setitem(sys.modules, 'onnxscript', None)
    code, _, err = run_cli(capsys, ['export', '--out', str(tmp_path / 'm.onnx')])
    assert code == 2 and err.strip() == "timm-evit export: --format onnx needs onnxscript: pip install 'timm-evit[deploy]'"
    code, _, err = run_cli(capsys, ['bench', '--runtime', 'onnxruntime'])
    assert code == 2 and 'needs onnxscript' in err and 'timm-evit[deploy]' in err
    assert list(tmp_path.iterdir()) == []


def test_bench_in_onnxruntime(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    code, out, err = run_cli(capsys, [
        'bench', '--runtime', 'onnxruntime', '--model', 'evit_deit_tiny', '--batch-size', '2', '--repeats', '1',
        '--warmup', '0', '--keep-rates', '0.5', '--attn', 'fused', '--json', str(tmp_path / 'b.json'),
        '--model-kwargs', *TINY_IMG32_CLI])
    assert code == 0, err
    assert 'fp32, onnxruntime ' in out and '(ONNX export, beside the plain model in torch fp32, CPU, ' in out
    assert 'speed-up vs torch fp32' in out
    assert '| deit_tiny_patch16_224 | fused | - | - | 16 |' in out
    assert '| evit_deit_tiny | fused | 0.5 | yes | 16, 9, 6 |' in out
    rows = json.loads((tmp_path / 'b.json').read_text())['rows']
    assert [(r['runtime'], r['keep_rate']) for r in rows] == [('onnxruntime', None), ('onnxruntime', 0.5)]
    assert all(r['images_per_s'] > 0 and r['latency_ms'] > 0 for r in rows)


def test_onnx_refuses_a_model_over_one_file_s_limit_before_exporting(tmp_path, capsys, monkeypatch):
    import timm_evit.tools.export as export
    pytest.importorskip('onnxscript')
    monkeypatch.setattr(export, '_ONNX_MAX_BYTES', 1000)   # as a model with more than 2 GiB of weights
    code, _, err = run_cli(capsys, ['export', '--out', str(tmp_path / 'm.onnx'), '--model-kwargs', *TINY_IMG32_CLI])
    assert code == 2 and err.startswith('timm-evit export: --format onnx writes one file') and 'use --format export' in err
    assert list(tmp_path.iterdir()) == []


def test_benchmark_sessions_do_not_spin_between_runs():
    # bench and sweep interleave sessions with torch: a session spinning after its run would take the
    # cores from the next call and corrupt every timing of the run (issue 22)
    pytest.importorskip('onnxruntime')
    from timm_evit.tools.export import onnxruntime_session
    model = randomise_weights(create_evit_model('evit_deit_tiny', **TINY_IMG32)).eval()
    options = onnxruntime_session(model).get_session_options()
    assert options.get_session_config_entry('session.intra_op.allow_spinning') == '0'


# score x fusion, at 400 patches: enough tokens that a chunking of 'mean' taken from the batch would
# split the queries differently at batch 32 than at the traced batch (issue 29)
LARGE = dict(SMALL_VIT_10_CLASSES, img_size=160, patch_size=8, keep_rate=0.5)
ANY_BATCH = {
    'class size': ('evit_deit_tiny_patch16_224', dict(LARGE, fusion='size')),
    'mean paper': ('evit_vit_medium_patch16_reg4_gap_256', dict(LARGE, fusion='paper')),
    'mean size': ('evit_vit_medium_patch16_reg4_gap_256', dict(LARGE, fusion='size')),
    'mean drop': ('evit_vit_medium_patch16_reg4_gap_256', dict(LARGE, fuse_token=False)),
    'pool size': ('evit_vit_base_patch16_siglip_224', dict(LARGE, fusion='size')),
}


@pytest.mark.parametrize('case', sorted(ANY_BATCH))
def test_onnx_and_torch_export_equal_pytorch_at_batch_1_3_and_32(case, tmp_path):
    # no Python number taken from a shape may decide the graph's structure in a way that changes with
    # the batch: both exports, traced at batch 2, at batch 1, 3 and 32
    pytest.importorskip('onnxscript')
    from timm_evit.tools.export import export_program
    name, kwargs = ANY_BATCH[case]
    model = randomise_weights(create_evit_model(name, **kwargs), peaky_std=0.3).eval()
    write_all_whole({str(tmp_path / 'model.onnx'): exported_writer(model)})
    program = export_program(model).module()
    for batch_size in (1, 3, 32):
        x = torch.randn(batch_size, 3, 160, 160, generator=torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(program(x), expected, rtol=0, atol=1e-4)
        assert_logits_close(onnxruntime_logits(tmp_path / 'model.onnx', x), expected)
