"""EViT and int8 on the CPU: ``export --quantize int8`` (onnxruntime's dynamic quantization after its
recommended pre-processing) and ``bench --runtime onnxruntime --quantize int8``. The quantized file
computes the PyTorch model's logits to within a bound set by the logits' own spread, keeps EViT's
settings in its metadata, and every option it cannot serve is refused in one line."""
import json
import sys

import pytest
import torch

from helpers import (
    SMALL_VIT, TINY_IMG32, TINY_IMG32_CLI, assert_one_line_error, randomise_weights, run_cli, write_class_images,
)
from timm_evit.tools.models import create_evit_model

pytest.importorskip('onnxscript')
pytest.importorskip('onnxruntime.quantization')


def onnxruntime_logits(path, x):
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.as_tensor(session.run(['logits'], {'images': x.numpy()})[0])


@pytest.mark.parametrize('name,kwargs', [
    ('evit_deit_tiny', dict(SMALL_VIT, img_size=64, patch_size=8, num_classes=10)),
    ('evit_deit_tiny', dict(SMALL_VIT, img_size=64, patch_size=8, num_classes=10, fusion='size')),
    ('evit_vit_medium_patch16_reg4_gap_256', dict(SMALL_VIT, img_size=64, patch_size=8, num_classes=10)),
], ids=['deit', 'deit-size-aware', 'registers-gap-size-aware'])
def test_quantized_export_computes_the_model_within_the_logits_spread(tmp_path, capsys, name, kwargs):
    model = randomise_weights(create_evit_model(name, keep_rate=0.5, **kwargs)).eval()
    torch.save(model.state_dict(), tmp_path / 'w.pth')
    cli_kwargs = [f'{k}={v}' for k, v in kwargs.items()]
    out = tmp_path / 'm.onnx'
    code, stdout, err = run_cli(capsys, ['export', '--model', name, '--checkpoint', str(tmp_path / 'w.pth'),
                                         '--keep-rate', '0.5', '--quantize', 'int8', '--out', str(out),
                                         '--model-kwargs', *cli_kwargs])
    assert code == 0, err
    assert 'int8 (dynamic quantization' in stdout
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    actual = onnxruntime_logits(out, x)
    spread = float(expected.std())
    assert spread > 0.1                                         # logits that differ, so the bound means something
    error = (actual - expected).abs()
    # int8 weights and per-batch activations: errors of a few percent of the spread, never one of its size
    assert float(error.mean()) < 0.1 * spread and float(error.max()) < 0.5 * spread, (float(error.max()), spread)
    assert not torch.equal(actual, expected)                    # it is quantized
    import onnx
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata['timm_evit.keep_rate'] == '(0.5, 0.5, 0.5)' and metadata['timm_evit.quantize'].startswith('int8')
    quantized_nodes = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert 'DynamicQuantizeLinear' in quantized_nodes or 'MatMulInteger' in quantized_nodes


def test_default_name_says_int8(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, ['export', '--model', 'evit_deit_tiny', '--quantize', 'int8',
                                         '--model-kwargs', *TINY_IMG32_CLI])
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ['evit_deit_tiny_int8.onnx']


def test_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, ['export', '--format', 'export', '--quantize', 'int8', '--out',
                                    str(tmp_path / 'm.pt2'), '--model-kwargs', *TINY_IMG32_CLI])
    assert_one_line_error(code, err, 'export', '--quantize int8', '--format onnx')
    code, _, err = run_cli(capsys, ['bench', '--quantize', 'int8', '--model-kwargs', *TINY_IMG32_CLI])
    assert_one_line_error(code, err, 'bench', '--quantize int8', '--runtime onnxruntime')
    code, _, err = run_cli(capsys, ['bench', '--runtime', 'onnxruntime', '--quantize', 'int8', '--device', 'cuda'])
    assert_one_line_error(code, err, 'bench', '--device must be cpu')
    monkeypatch.setitem(sys.modules, 'onnxruntime.quantization', None)   # onnxruntime without its quantizer
    code, _, err = run_cli(capsys, ['export', '--quantize', 'int8', '--out', str(tmp_path / 'm.onnx'),
                                    '--model-kwargs', *TINY_IMG32_CLI])
    assert_one_line_error(code, err, 'export', '--quantize int8 needs onnxruntime.quantization', 'timm-evit[deploy]')
    code, _, err = run_cli(capsys, ['bench', '--runtime', 'onnxruntime', '--quantize', 'int8'])
    assert_one_line_error(code, err, 'bench', 'needs onnxruntime.quantization')
    assert list(tmp_path.iterdir()) == []


def test_bench_times_the_quantized_exports_beside_torch_fp32(tmp_path, capsys):
    code, out, err = run_cli(capsys, [
        'bench', '--runtime', 'onnxruntime', '--quantize', 'int8', '--model', 'evit_deit_tiny', '--batch-size', '2',
        '--repeats', '1', '--warmup', '0', '--keep-rates', '0.5', '--attn', 'fused', '--json', str(tmp_path / 'b.json'),
        '--model-kwargs', *TINY_IMG32_CLI])
    assert code == 0, err
    assert 'quantized to int8 (dynamic), beside the plain model in torch fp32' in out
    assert 'speed-up vs torch fp32' in out
    rows = json.loads((tmp_path / 'b.json').read_text())['rows']
    assert [(r['quantize'], r['keep_rate']) for r in rows] == [('int8', None), ('int8', 0.5)]
    assert all(r['speedup_vs_torch'] > 0 and r['latency_speedup_vs_torch'] > 0 for r in rows)


@pytest.fixture(scope='module')
def small_folder(tmp_path_factory):
    root = write_class_images(tmp_path_factory.mktemp('data'), 6, lambda i: (32, 32, 3), 30)
    model = randomise_weights(create_evit_model('evit_deit_tiny', num_classes=3, **TINY_IMG32), seed=1)
    torch.save(model.state_dict(), root / 'model.pth')
    return root


@pytest.mark.parametrize('quantize', [None, 'int8'], ids=['fp32', 'int8'])
def test_sweep_in_onnxruntime_agrees_with_the_pytorch_sweep(small_folder, tmp_path, capsys, quantize):
    common = ['sweep', '--model', 'evit_deit_tiny', '--data-dir', str(small_folder), '--checkpoint',
              str(small_folder / 'model.pth'), '--num-classes', '3', '--keep-rates', '1,0.5', '--batch-size', '5',
              '--repeats', '1', '--no-plot', '--crop-pct', '1.0', '--model-kwargs', *TINY_IMG32_CLI]
    code, _, err = run_cli(capsys, common + ['--out', str(tmp_path / 'torch')])
    assert code == 0, err
    runtime = ['--runtime', 'onnxruntime'] + (['--quantize', quantize] if quantize else [])
    code, out, err = run_cli(capsys, common + ['--out', str(tmp_path / 'ort')] + runtime)
    assert code == 0, err
    assert 'top-1 in PyTorch' in out and 'top-1 class changed' in out
    in_torch = json.loads((tmp_path / 'torch.json').read_text())['rows']
    in_ort = json.loads((tmp_path / 'ort.json').read_text())['rows']
    for t, o in zip(in_torch, in_ort):
        assert o['runtime'] == 'onnxruntime' and o['quantize'] == quantize and o['num_images'] == 18
        assert o['torch_top1'] == pytest.approx(t['top1'])            # the same images, the same PyTorch model
        # each changed prediction moves top-1 by at most one image
        assert abs(o['top1'] - t['top1']) <= 100 / 18 * o['changed_predictions'] + 1e-6
        if quantize is None:
            assert o['changed_predictions'] <= 1                      # fp32: the same model, up to a near-tie
