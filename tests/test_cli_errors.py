"""A user's mistake in any command ends with one line on stderr naming it, exit code 2, no traceback."""
import subprocess

import pytest
import timm
import torch
from PIL import Image

from helpers import TINY_IMG32, TINY_IMG32_CLI, assert_one_line_error, run_cli, takes_files


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli_errors')
    (root / 'data' / 'validation' / 'cat').mkdir(parents=True)
    Image.new('RGB', (40, 40), 'red').save(root / 'data' / 'validation' / 'cat' / '0.png')
    Image.new('RGB', (40, 40), 'blue').save(root / 'cat.png')
    (root / 'a_file').write_text('a regular file: nothing can be created under it, not even by root')
    (root / 'read_only').mkdir(mode=0o555)
    if takes_files(root / 'read_only'):
        (root / 'read_only').chmod(0o755)   # modes are ignored here: the read-only cases are skipped
    torch.save({'model': {}, 'hook': subprocess.Popen}, root / 'unsafe.pth')   # would run code if unpickled
    torch.save(timm.create_model('evit_deit_tiny', num_classes=5, **TINY_IMG32).state_dict(), root / 'five_classes.pth')
    yield root
    (root / 'read_only').chmod(0o755)


BENCH = ['bench', '--model', 'evit_deit_tiny', '--batch-size', '1', '--repeats', '1', '--warmup', '0',
         '--keep-rates', '1,0.5', '--attn', 'math', '--no-latency']
SWEEP = ['sweep', '--model', 'evit_deit_tiny', '--data-dir', '{root}/data', '--keep-rates', '1,0.5', '--repeats', '1',
         '--batch-size', '1']
VISUALIZE = ['visualize', '{root}/cat.png', '--model', 'evit_deit_tiny', '--img-size', '32', '--out', '{root}/pics']
# --format export: these cases need no ONNX package
EXPORT = ['export', '--model', 'evit_deit_tiny', '--format', 'export', '--out', '{root}/m.pt2']

CASES = {
    'bench bad model-kwargs value': (BENCH + ['--model-kwargs', *TINY_IMG32_CLI, 'depth=abc'], ["depth='abc'"]),
    'bench unknown model-kwargs name': (BENCH + ['--model-kwargs', *TINY_IMG32_CLI, 'nonsense=1'], ['nonsense']),
    'bench unknown device': (BENCH + ['--device', 'banana'], ['--device', 'banana']),
    'bench unknown model': (BENCH[:2] + ['no_such_model'] + BENCH[3:], ['--model', 'no_such_model']),
    'bench model apply refuses': (BENCH[:2] + ['resnet18'] + BENCH[3:], ['ResNet is not a supported timm class']),
    'bench json under a file': (BENCH + ['--json', '{root}/a_file/b.json'], ['--json', 'a_file']),
    'bench plot under a file': (BENCH + ['--plot', '{root}/a_file/b.png'], ['--plot', 'a_file']),
    'bench json in a read-only folder': (BENCH + ['--json', '{root}/read_only/b.json'], ['--json', 'read_only']),
    'sweep bad model-kwargs value': (SWEEP + ['--model-kwargs', 'depth=abc'], ["depth='abc'"]),
    'sweep unknown model-kwargs name': (SWEEP + ['--model-kwargs', 'nonsense=1'], ['nonsense']),
    'sweep missing checkpoint': (SWEEP + ['--checkpoint', '{root}/none.pth'], ['--checkpoint', 'none.pth']),
    'sweep unsafe checkpoint': (SWEEP + ['--checkpoint', '{root}/unsafe.pth'], ['unsafe.pth', 'weights_only']),
    'sweep checkpoint of another shape': (
        SWEEP + ['--checkpoint', '{root}/five_classes.pth', '--model-kwargs', *TINY_IMG32_CLI],
        ['five_classes.pth', 'size mismatch for head.weight']),
    'sweep out under a file': (SWEEP + ['--out', '{root}/a_file/sw'], ['--out', 'a_file']),
    'sweep out in a read-only folder': (SWEEP + ['--out', '{root}/read_only/sw'], ['--out', 'read_only']),
    'visualize missing checkpoint': (VISUALIZE + ['--checkpoint', '{root}/none.pth'], ['none.pth']),
    'visualize unsafe checkpoint': (VISUALIZE + ['--checkpoint', '{root}/unsafe.pth'], ['unsafe.pth', 'weights_only']),
    'visualize checkpoint of another shape': (VISUALIZE + ['--checkpoint', '{root}/five_classes.pth'],
                                              ['five_classes.pth', 'size mismatch']),
    'visualize out under a file': (VISUALIZE[:-1] + ['{root}/a_file/pics'], ['--out', 'a_file']),
    'visualize out in a read-only folder': (VISUALIZE[:-1] + ['{root}/read_only/pics'], ['--out', 'read_only']),
    'bench unknown runtime': (BENCH + ['--runtime', 'tensorrt'], ['--runtime', 'tensorrt']),
    'bench onnxruntime with compile': (BENCH + ['--runtime', 'onnxruntime', '--compile'], ['--compile', '--runtime torch']),
    'bench onnxruntime on cuda': (BENCH + ['--runtime', 'onnxruntime', '--device', 'cuda'], ['--device must be cpu']),
    'bench onnxruntime in bf16': (BENCH + ['--runtime', 'onnxruntime', '--dtype', 'bf16'], ['--dtype must be fp32']),
    'export unknown format': (EXPORT[:4] + ['tflite'] + EXPORT[5:], ['--format', 'tflite']),
    'export unknown model': (EXPORT[:2] + ['no_such_model'] + EXPORT[3:], ['--model', 'no_such_model']),
    'export model apply refuses': (EXPORT[:2] + ['resnet18'] + EXPORT[3:], ['ResNet is not a supported timm class']),
    'export out under a file': (EXPORT[:-1] + ['{root}/a_file/m.pt2'], ['--out', 'a_file']),
    'export out in a read-only folder': (EXPORT[:-1] + ['{root}/read_only/m.pt2'], ['--out', 'read_only']),
    'export out is a folder': (EXPORT[:-1] + ['{root}/data'], ['--out', 'is a folder']),
    'export bad keep rate': (EXPORT + ['--keep-rate', '1.5'], ['--keep-rate', '1.5']),
    'export keep rate given twice': (EXPORT + ['--keep-rate', '0.5', '--model-kwargs', 'keep_rate=0.6'],
                                     ['--keep-rate 0.5', 'keep_rate=0.6']),
    'export unsafe checkpoint': (EXPORT + ['--checkpoint', '{root}/unsafe.pth'], ['unsafe.pth', 'weights_only']),
    # a path that names nothing, or a folder where an image goes (issue 30: silently nothing, or "no such file")
    'bench empty json and plot paths': (BENCH + ['--json', '', '--plot', ''], ['--json', "needs a path, got ''"]),
    'sweep empty out': (SWEEP + ['--out', ''], ['--out', "needs a path, got ''"]),
    'export empty out': (EXPORT[:-1] + [''], ['--out', "needs a path, got ''"]),
    'visualize empty image path': (['visualize', '', '--model', 'evit_deit_tiny'], ['IMAGE', "needs a path, got ''"]),
    'visualize a folder': (['visualize', '{root}/data/validation/cat', '--model', 'evit_deit_tiny', '--out',
                            '{root}/pics'], ['cat', 'is a folder', 'image files']),
    'export checkpoint of another shape': (EXPORT + ['--checkpoint', '{root}/five_classes.pth',
                                                     '--model-kwargs', *TINY_IMG32_CLI],
                                           ['five_classes.pth', 'size mismatch for head.weight']),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_user_errors_are_one_line(case, files, capsys, monkeypatch):
    if 'read-only' in case and (files / 'read_only').stat().st_mode & 0o200:
        pytest.skip('a read-only folder is writable here (running as root): the "under a file" cases still run')
    argv, words = CASES[case]
    monkeypatch.chdir(files)   # where a command's default outputs would go
    before = sorted(files.rglob('*'))
    code, _, err = run_cli(capsys, [a.format(root=files) for a in argv])
    assert_one_line_error(code, err, argv[0], *words)
    assert sorted(files.rglob('*')) == before     # nothing written, no folder made


def test_pretrained_weights_not_in_the_cache_offline(files, offline_hub, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)   # where a command's default outputs would go
    for argv in (BENCH, SWEEP, VISUALIZE, EXPORT):
        code, _, err = run_cli(capsys, [a.format(root=files) for a in argv] + ['--pretrained'])
        assert_one_line_error(code, err, argv[0], '--pretrained', 'evit_deit_tiny')


ONNX_RUNS = {
    'bench': (BENCH + ['--runtime', 'onnxruntime'], '--runtime onnxruntime'),
    'bench int8': (BENCH + ['--runtime', 'onnxruntime', '--quantize', 'int8'], '--runtime onnxruntime'),
    'sweep': (SWEEP + ['--runtime', 'onnxruntime', '--no-plot'], '--runtime onnxruntime'),
    'sweep int8': (SWEEP + ['--runtime', 'onnxruntime', '--quantize', 'int8', '--no-plot'], '--runtime onnxruntime'),
    'export': (EXPORT[:4] + ['onnx', '--out', '{root}/m.onnx'], '--format onnx'),
    'export int8': (EXPORT[:4] + ['onnx', '--out', '{root}/m.onnx', '--quantize', 'int8'], '--format onnx'),
}


@pytest.mark.parametrize('missing', ['onnx', 'onnxscript', 'onnxruntime', 'onnxruntime.quantization'])
@pytest.mark.parametrize('run', sorted(ONNX_RUNS))
def test_a_missing_deploy_package_is_one_line_naming_the_option_that_needs_it(run, missing, files, capsys, monkeypatch):
    argv, option = ONNX_RUNS[run]
    needs_it = ('int8' in run or missing != 'onnxruntime.quantization') and (
        not run.startswith('export') or missing != 'onnxruntime' or 'int8' in run)
    if not needs_it:
        pytest.skip(f'{run} does not use {missing}')
    modules = __import__('sys').modules
    for name in [missing] + [m for m in modules if m.startswith(missing + '.')]:   # its submodules go with it
        monkeypatch.setitem(modules, name, None)   # import fails, as where it is not installed
    monkeypatch.chdir(files)
    before = sorted(files.rglob('*'))
    code, _, err = run_cli(capsys, [a.format(root=files) for a in argv])
    if missing == 'onnxruntime.quantization' or (missing == 'onnxruntime' and 'int8' in run and run.startswith('export')):
        option = '--quantize int8'
    assert_one_line_error(code, err, argv[0], f'{option} needs {missing}', "pip install 'timm-evit[deploy]'")
    assert sorted(files.rglob('*')) == before
