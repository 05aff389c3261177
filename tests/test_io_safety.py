"""What the tools read and write, made safe: non-finite outputs refused, images that are not 8-bit
read as what they show, one measurement per keep rate, no output written over an input, an
interrupt leaving no temporary file, and no advice to load an untrusted pickle unsafely."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from helpers import DEIT_ROW, TINY_IMG32, TINY_IMG32_CLI, assert_one_line_error, load_hub, run_cli
from timm_evit.checkpoints import read_checkpoint
from timm_evit.tools import sweep as sweep_module
from timm_evit.tools.data import eval_data_config
from timm_evit.tools.cli import build_parser
from timm_evit.tools.visualize import load_image

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ['sweep', '--model', 'evit_deit_tiny', '--keep-rates', '1,0.5', '--repeats', '1', '--batch-size', '2',
         '--no-plot']
EXPORT = ['export', '--model', 'evit_deit_tiny', '--format', 'export', '--model-kwargs', *TINY_IMG32_CLI]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))


@pytest.fixture(scope='module')
def data_and_hidden(tmp_path_factory):
    """An image folder, a checkpoint of TINY_IMG32, one of TINY_IMG32 with a NaN weight, and one of
    evit_deit_tiny at 32 px (what visualize --img-size 32 builds) with a NaN weight. The NaN is in
    the first block's attention, which reorganises nothing: torch's fused CPU attention turns the
    NaN row into finite output there, so the logits of timm's default path look fine."""
    root = tmp_path_factory.mktemp('io_safety')
    for c, name in enumerate(['cat', 'dog']):
        (root / 'data' / 'validation' / name).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (40, 40), (200 * c, 60 * i, 90)).save(root / 'data' / 'validation' / name / f'{i}.png')
    Image.new('RGB', (40, 40), 'blue').save(root / 'photo.png')
    model = timm.create_model('evit_deit_tiny', num_classes=2, **TINY_IMG32)
    torch.save(model.state_dict(), root / 'tiny.pth')
    vis = timm.create_model('evit_deit_tiny', img_size=32)
    for m, name in ((model, 'nan.pth'), (vis, 'nan_vis.pth')):
        with torch.no_grad():
            m.blocks[0].attn.qkv.weight[0, 0] = float('nan')
            hidden = torch.isfinite(m.eval()(torch.randn(2, 3, 32, 32))).all()
        torch.save(m.state_dict(), root / name)
    return root, hidden


@pytest.fixture(scope='module')
def data(data_and_hidden):
    return data_and_hidden[0]


# ---- 1. non-finite outputs ---------------------------------------------------------------------

def test_require_finite_names_what_and_where():
    from timm_evit.checkpoints import require_finite
    require_finite(torch.ones(3), 'logits', 'm')   # finite: nothing
    require_finite(torch.arange(3), 'logits', 'm')  # integers are always finite
    with pytest.raises(ValueError, match=r"^evit_x with checkpoint 'c.pth' gives non-finite logits \(1 NaN and 1 "
                                         r"infinite of 4 values\)"):
        require_finite(torch.tensor([0., float('nan'), float('inf'), 1.]), 'logits', "evit_x with checkpoint 'c.pth'")


@pytest.mark.parametrize('command', ['sweep', 'export', 'visualize', 'bench'])
def test_every_tool_refuses_non_finite_values_naming_the_weights(command, data_and_hidden, tmp_path, capsys,
                                                                  monkeypatch):
    data, hidden = data_and_hidden
    monkeypatch.chdir(tmp_path)
    nan = str(data / 'nan.pth')
    argv = {
        'sweep': SWEEP + ['--data-dir', str(data / 'data'), '--checkpoint', nan, '--num-classes', '2',
                          '--model-kwargs', *TINY_IMG32_CLI, '--out', str(tmp_path / 'out' / 'sw')],
        'export': EXPORT + ['num_classes=2', '--checkpoint', nan, '--out', str(tmp_path / 'out' / 'm.pt2')],
        'visualize': ['visualize', str(data / 'photo.png'), '--model', 'evit_deit_tiny', '--img-size', '32',
                      '--checkpoint', str(data / 'nan_vis.pth'), '--out', str(tmp_path / 'out')],
        # no checkpoint in bench: an infinite LayerScale makes the logits NaN as broken weights do
        'bench': ['bench', '--model', 'evit_deit_tiny', '--batch-size', '1', '--repeats', '1', '--warmup', '0',
                  '--keep-rates', '1,0.5', '--attn', 'math', '--no-latency', '--model-kwargs', *TINY_IMG32_CLI,
                  'init_values=1e999', '--json', str(tmp_path / 'out' / 'b.json')],
    }[command]
    code, _, err = run_cli(capsys, argv)
    err = '\n'.join(line for line in err.replace('\r', '\n').splitlines() if not line.startswith('sweep '))  # its bar
    weights = 'random weights' if command == 'bench' else 'nan'
    assert_one_line_error(code, err, command, 'evit_deit_tiny with', weights, 'non-finite')
    assert files_under(tmp_path) == []
    if command != 'bench':   # the checkpoint's NaN reaches the class attention, not the fused path's logits
        assert 'non-finite tokens in block 0' in err and hidden, err


def test_hub_convert_refuses_non_finite_logits_with_the_shared_check(tmp_path, capsys, monkeypatch):
    hub = load_hub()
    from timm_evit.checkpoints import require_finite
    sources, out = tmp_path / 'sources', tmp_path / 'out'
    sources.mkdir()
    out.mkdir()
    row = next(r for r in hub.read_manifest() if f'{r.architecture}.{r.tag}' == DEIT_ROW)
    sd = timm.create_model('deit_small_patch16_224').state_dict()
    sd['blocks.0.attn.qkv.weight'][0, 0] = float('nan')
    torch.save({'model': sd}, sources / row.source_file)
    calls = []
    monkeypatch.setattr(hub, 'require_finite', lambda *a: calls.append(a) or require_finite(*a))
    assert hub.main(['--sources', str(sources), '--out', str(out), '--only', DEIT_ROW]) == 2
    assert 'non-finite logits' in capsys.readouterr().err and len(calls) == 1
    assert os.listdir(out) == []


# ---- 2. images that are not 8-bit --------------------------------------------------------------

def save_16_bit_grey(path, value=32768):
    Image.fromarray(np.full((40, 40), value, dtype=np.uint16)).save(path)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    save_16_bit_grey(tmp_path / 'grey16.png')
    assert Image.open(tmp_path / 'grey16.png').mode == 'I;16'
    (tmp_path / 'grey16.pgm').write_bytes(b'P5 4 4 1000\n' + np.full(16, 500, '>u2').tobytes())  # opens as 'I'
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / 'grey16.tiff')
    for name in ('grey16.png', 'grey16.pgm', 'grey16.tiff'):
        pixels = np.asarray(load_image(str(tmp_path / name)))
        assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3
        assert np.all(np.abs(pixels.astype(int) - 128) <= 1), (name, pixels.mean())   # not 255: clipped


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'CMYK', 'YCbCr', 'LAB', 'HSV'])
def test_8_bit_modes_read_as_pils_own_conversion(mode, tmp_path):
    from timm_evit.tools._io import rgb_image   # the one conversion of sweep and visualize
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert(mode)
    converted = rgb_image(image)
    assert converted.mode == 'RGB' and np.array_equal(np.asarray(converted), np.asarray(image.convert('RGB')))


@pytest.mark.parametrize('dtype, mode', [(np.int32, 'I'), (np.float32, 'F')])
def test_images_without_a_fixed_white_are_refused_naming_the_file(dtype, mode, tmp_path, capsys):
    path = tmp_path / 'deep.tiff'   # (timm's image folders take PNG and JPEG only, neither of which holds these)
    Image.fromarray(np.full((40, 40), 3, dtype=dtype)).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(ValueError, match=f"cannot read image '{path}': .*PIL mode '{mode}'"):
        load_image(str(path))
    code, _, err = run_cli(capsys, ['visualize', str(path), '--model', 'evit_deit_tiny', '--img-size', '32', '--out',
                                  str(tmp_path / 'pics')])
    assert_one_line_error(code, err, 'visualize', 'deep.tiff', f"PIL mode '{mode}'")


def test_sweep_evaluates_a_16_bit_image_as_what_it_shows(tmp_path, monkeypatch):
    (tmp_path / 'validation' / 'cat').mkdir(parents=True)
    save_16_bit_grey(tmp_path / 'validation' / 'cat' / 'grey16.png')   # mid grey

    class Seen(Exception):
        pass

    def first_batch(model, loader, keep_rate, **kwargs):
        config = eval_data_config(model)
        images, _ = next(iter(loader))
        raise Seen(images[0] * torch.tensor(config['std']).view(3, 1, 1) + torch.tensor(config['mean']).view(3, 1, 1))

    monkeypatch.setattr(sweep_module, 'evaluate', first_batch)
    with pytest.raises(Seen) as seen:
        sweep_module.run_sweep('evit_deit_tiny', data_dir=str(tmp_path), keep_rates=[1.0], batch_size=1, show_progress=False,
                               model_kwargs=dict(TINY_IMG32))
    pixels = seen.value.args[0]
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 255), rtol=0, atol=1e-3)   # not white


# ---- 5. duplicate keep rates -------------------------------------------------------------------

@pytest.mark.parametrize('command', ['bench', 'sweep'])
def test_a_keep_rate_given_twice_is_refused(command, data, capsys):
    argv = [command, '--model', 'evit_deit_tiny', '--keep-rates', '1,0.5,0.50']
    if command == 'sweep':
        argv += ['--data-dir', str(data / 'data')]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert '--keep-rates lists 0.5 twice' in err and 'Traceback' not in err
    help_text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    assert 'a repeated rate is refused' in ' '.join(help_text.split())


def test_the_python_api_refuses_a_keep_rate_given_twice(data):
    from timm_evit.tools.bench import run_bench
    with pytest.raises(ValueError, match='--keep-rates lists 0.7 twice'):
        run_bench('evit_deit_tiny', keep_rates=[0.7, 1.0, 0.7], model_kwargs=dict(TINY_IMG32), show_progress=False)
    with pytest.raises(ValueError, match='--keep-rates lists 0.7 twice'):
        sweep_module.run_sweep('evit_deit_tiny', data_dir=str(data / 'data'), keep_rates=[0.7, 0.7], show_progress=False)


# ---- 6. an output that is an input -------------------------------------------------------------

def link(kind, target, path):
    """``path`` naming the file ``target``: itself, another spelling, a symbolic or a hard link."""
    if kind == 'same path':
        return str(target)
    if kind == 'another spelling':
        return str(target.parent / '.' / '..' / target.parent.name / target.name)
    if kind == 'symbolic link':
        os.symlink(target, path)
    else:
        os.link(target, path)
    return str(path)


LINKS = ['same path', 'another spelling', 'symbolic link', 'hard link']


@pytest.mark.parametrize('kind', LINKS)
def test_export_never_writes_over_its_checkpoint(kind, data, tmp_path, capsys):
    checkpoint = tmp_path / 'ck.pth'
    checkpoint.write_bytes((data / 'tiny.pth').read_bytes())
    before = checkpoint.read_bytes()
    out = link(kind, checkpoint, tmp_path / 'out.pth')
    code, _, err = run_cli(capsys, EXPORT + ['num_classes=2', '--checkpoint', str(checkpoint), '--out', out])
    assert_one_line_error(code, err, 'export', '--out', '--checkpoint', 'ck.pth')
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize('kind', LINKS)
def test_visualize_never_writes_over_an_input_image(kind, data, tmp_path, capsys):
    photo = tmp_path / 'd' / 'photo.png'
    photo.parent.mkdir()
    photo.write_bytes((data / 'photo.png').read_bytes())
    picture = tmp_path / 'd' / 'photo_evit.png'   # where the picture of photo.png goes
    image = tmp_path / 'other.png' if kind.endswith('link') else picture
    Image.new('RGB', (40, 40), 'green').save(image)
    second = str(image) if kind.endswith('link') else link(kind, image, None)
    if kind.endswith('link'):
        link(kind, image, picture)
    before = image.read_bytes()
    code, _, err = run_cli(capsys, ['visualize', str(photo), second, '--model', 'evit_deit_tiny', '--img-size', '32',
                                  '--out', str(tmp_path / 'd')])
    assert_one_line_error(code, err, 'visualize', '--out', 'IMAGE', 'photo_evit.png')
    assert image.read_bytes() == before


@pytest.mark.parametrize('kind', ['image', 'checkpoint'])
def test_sweep_never_writes_over_its_images_or_checkpoint(kind, data, tmp_path, capsys):
    folder = tmp_path / 'data'
    (folder / 'validation').mkdir(parents=True)
    os.symlink(data / 'data' / 'validation' / 'cat', folder / 'validation' / 'cat')
    checkpoint = tmp_path / 'sw.json'
    checkpoint.write_bytes((data / 'tiny.pth').read_bytes())
    out = folder / 'validation' / 'cat' / '0' if kind == 'image' else tmp_path / 'sw'
    image = data / 'data' / 'validation' / 'cat' / '0.png'
    before = image.read_bytes(), checkpoint.read_bytes()
    code, _, err = run_cli(capsys, SWEEP[:-1] + ['--data-dir', str(folder), '--checkpoint', str(checkpoint),
                                               '--num-classes', '2', '--model-kwargs', *TINY_IMG32_CLI, '--out', str(out)])
    assert_one_line_error(code, err, 'sweep', '--out', '--data-dir' if kind == 'image' else '--checkpoint')
    assert (image.read_bytes(), checkpoint.read_bytes()) == before


BENCH = ['bench', '--model', 'evit_deit_tiny', '--keep-rates', '0.5', '--repeats', '1', '--warmup', '0',
         '--batch-size', '2', '--attn', 'fused', '--no-latency']


@pytest.mark.parametrize('option', ['--json', '--plot'])
@pytest.mark.parametrize('kind', ['image', 'checkpoint'])
def test_bench_never_writes_over_its_images_or_checkpoint(option, kind, data, tmp_path, capsys):
    checkpoint = tmp_path / 'ck.pth'
    checkpoint.write_bytes((data / 'tiny.pth').read_bytes())
    image = data / 'data' / 'validation' / 'cat' / '0.png'
    out = link('symbolic link', image, tmp_path / 'out.png') if kind == 'image' else str(checkpoint)
    before = image.read_bytes(), checkpoint.read_bytes()
    code, _, err = run_cli(capsys, BENCH + ['--data-dir', str(data / 'data'), '--checkpoint', str(checkpoint), option,
                                          out, '--model-kwargs', 'num_classes=2', *TINY_IMG32_CLI])
    assert_one_line_error(code, err, 'bench', option, '--data-dir' if kind == 'image' else '--checkpoint')
    assert (image.read_bytes(), checkpoint.read_bytes()) == before


# ---- 6b. an output that is not a regular file --------------------------------------------------

def not_a_regular_file(kind, path):
    """``path`` made a FIFO, or a symbolic link to the character device /dev/null."""
    if kind == 'fifo':
        os.mkfifo(path)
    else:
        os.symlink(os.devnull, path)
    return path


def outputs_of(command, tmp_path, special):
    """(argv of ``command`` writing ``special`` among its outputs, the option named in its refusal)."""
    photo = tmp_path / 'photo.png'
    Image.new('RGB', (40, 40), 'blue').save(photo)
    if command == 'export':
        return EXPORT + ['--out', str(special)], '--out'
    if command == 'bench':
        return BENCH + ['--json', str(special), '--model-kwargs', *TINY_IMG32_CLI], '--json'
    if command == 'sweep':
        prefix = str(special)[:-len('.csv')]
        data = tmp_path / 'data' / 'validation' / 'cat'
        data.mkdir(parents=True)
        Image.new('RGB', (40, 40), 'red').save(data / '0.png')
        return SWEEP + ['--data-dir', str(tmp_path / 'data'), '--out', prefix, '--model-kwargs', *TINY_IMG32_CLI], '--out'
    return ['visualize', str(photo), '--model', 'evit_deit_tiny', '--img-size', '32', '--out',
            str(special.parent)], '--out'


SPECIAL_NAMES = {'export': 'm.pt2', 'bench': 'rows.json', 'sweep': 'sw.csv', 'visualize': 'photo_evit.png'}


@pytest.mark.parametrize('kind', ['fifo', 'link to /dev/null'])
@pytest.mark.parametrize('command', ['export', 'bench', 'sweep', 'visualize'])
def test_an_output_that_is_not_a_regular_file_is_refused(command, kind, tmp_path, capsys):
    (tmp_path / 'out').mkdir()
    special = not_a_regular_file(kind, tmp_path / 'out' / SPECIAL_NAMES[command])
    argv, option = outputs_of(command, tmp_path, special)
    code, _, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, command, option, 'not a regular file')
    assert not os.path.isfile(special) and os.path.lexists(special)   # left as it was
    if kind == 'fifo':
        assert stat.S_ISFIFO(os.lstat(special).st_mode)
    else:
        assert os.readlink(special) == os.devnull


@pytest.mark.parametrize('kind', ['fifo', 'link to /dev/null'])
def test_the_shared_writer_refuses_a_path_that_is_not_a_regular_file(kind, tmp_path):
    from timm_evit.tools.files import OutputError, write_all_whole
    special = not_a_regular_file(kind, tmp_path / 'special')
    with pytest.raises(OutputError, match='not a regular file'):
        write_all_whole({str(tmp_path / 'a.txt'): lambda f: f.write(b'a'), str(special): lambda f: f.write(b'b')})
    assert files_under(tmp_path) == ['special']   # neither written


# ---- 7. interrupts -----------------------------------------------------------------------------

# Runs `timm-evit export` with its writer replaced by one that writes part of the file, says so,
# and waits: the test sends the signal while the temporary file is half written.
BLOCKING_EXPORT = textwrap.dedent("""
    import sys, time
    import timm_evit.tools.export as export

    def exported_writer(model, format='onnx', source='the model'):
        def write(f):
            f.write(b'partial bytes')
            f.flush()
            print('writing', flush=True)
            time.sleep(120)
        return write

    export.exported_writer = exported_writer
    from timm_evit.tools.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize('sig, code, word', [(signal.SIGTERM, 143, 'terminated'), (signal.SIGINT, 130, 'interrupted')])
def test_a_signal_while_writing_leaves_no_file_and_one_line(sig, code, word, tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    process = subprocess.Popen([sys.executable, '-c', BLOCKING_EXPORT, *EXPORT, '--out', str(out / 'm.pt2')],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert process.stdout.readline() == 'writing\n', process.stderr.read()[-3000:]
        assert [p.name.startswith('.tmp-') for p in out.iterdir()] == [True]   # the half-written file is there
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == code and err.strip() == f'timm-evit export: {word}', err[-3000:]
    assert files_under(tmp_path) == []   # no temporary file, and the folder made for it removed


def run_interrupted(capsys, argv):
    try:
        code, _, err = run_cli(capsys, argv)
        return code, err
    except KeyboardInterrupt:   # (pytest would take it for its own Ctrl-C and stop)
        pytest.fail('KeyboardInterrupt escaped main(): a traceback for the user')


def test_ctrl_c_while_writing_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import timm_evit.tools.export as export

    def interrupted(f):
        f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(export, 'exported_writer', lambda *a, **k: interrupted)
    code, err = run_interrupted(capsys, EXPORT + ['--out', str(tmp_path / 'm.pt2')])
    assert code == 130 and err.strip() == 'timm-evit export: interrupted', err[-3000:]
    assert files_under(tmp_path) == []


def test_an_interrupt_right_after_the_temporary_file_is_created_leaves_nothing(tmp_path, capsys, monkeypatch):
    real_open = os.open

    def open_then_interrupt(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.basename(path).startswith('.tmp-') and str(path).endswith('.pt2'):   # the export's, not a probe
            raise KeyboardInterrupt   # as Ctrl-C arriving before the writing (and its cleanup) begins
        return fd

    monkeypatch.setattr(os, 'open', open_then_interrupt)
    code, err = run_interrupted(capsys, EXPORT + ['--out', str(tmp_path / 'm.pt2')])
    assert code == 130 and err.strip() == 'timm-evit export: interrupted'
    assert files_under(tmp_path) == []


# Runs the `timm-evit` command's entry point (pyproject.toml, [project.scripts]) with torch's import
# made slow: says so when it starts, then waits, as torch and timm take seconds to import.
SLOW_IMPORT = textwrap.dedent("""
    import importlib, importlib.abc, sys, time

    class SlowTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == 'torch':
                print('importing', flush=True)
                time.sleep(120)
            return None

    sys.meta_path.insert(0, SlowTorch())
    module, _, function = sys.argv.pop(1).partition(':')
    sys.exit(getattr(importlib.import_module(module), function)())
""")


def entry_point():
    import re
    return re.search(r'^timm-evit = "(.+)"$', (ROOT / 'pyproject.toml').read_text(), re.MULTILINE).group(1)


@pytest.mark.parametrize('sig, code, word', [(signal.SIGTERM, 143, 'terminated'), (signal.SIGINT, 130, 'interrupted')])
def test_a_signal_while_the_command_imports_is_one_line(sig, code, word, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
               TIMM_EVIT_AUTOLOAD='0')
    process = subprocess.Popen([sys.executable, '-c', SLOW_IMPORT, entry_point(), 'bench', '--no-latency'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert process.stdout.readline() == 'importing\n', process.stderr.read()[-3000:]
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == code and err.strip() == f'timm-evit bench: {word}', err[-3000:]
    assert files_under(tmp_path) == []


# ---- 14. no advice to load an untrusted pickle unsafely -----------------------------------------

def unsafe_advice(message):
    text = ' '.join(message.replace('`', '').split()).lower()
    return [a for a in ('weights_only=false', 'weights_only set to false', 'add_safe_globals', 'safe_globals(',
                        'trust') if a in text]


def blocked_global_pickle(path):
    torch.save({'model': {}, 'hook': os.system}, path)   # os.system pickles as posix.system: a blocked module


def disallowed_global_pickle(path):
    torch.save({'model': {}, 'hook': subprocess.Popen}, path)


def harmless_global_pickle(path):
    from fractions import Fraction
    torch.save({'model': {}, 'epoch': Fraction(1, 3)}, path)   # harmless, yet not a weights-only type


def torchscript_archive(path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # torch.jit.script is deprecated
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


def garbage(path):
    Path(path).write_bytes(b'not a checkpoint at all, and not a pickle either')


@pytest.mark.parametrize('make', [blocked_global_pickle, disallowed_global_pickle, harmless_global_pickle,
                                  torchscript_archive, garbage])
def test_a_refused_file_is_named_without_advice_to_load_it_unsafely(make, tmp_path, capsys):
    path = tmp_path / 'suspect.pth'
    make(path)
    with pytest.raises(ValueError) as refused:
        read_checkpoint(str(path))
    message = str(refused.value)
    assert message.startswith(f"checkpoint '{path}' cannot be read safely (weights_only=True): ")
    assert len(message.splitlines()) == 1 and unsafe_advice(message) == [], message
    assert not message.endswith(': '), message   # a reason is given
    code, _, err = run_cli(capsys, EXPORT + ['--checkpoint', str(path), '--out', str(tmp_path / 'm.pt2')])
    assert_one_line_error(code, err, 'export', 'suspect.pth')
    assert unsafe_advice(err) == [], err



# Its reader gone (`| head`): no traceback, the exit code of SIGPIPE
@pytest.mark.parametrize('argv', [['-c', 'import sys, _timm_evit_cli; sys.exit(_timm_evit_cli.main())',
                                   *EXPORT, '--out', 'm.pt2'],
                                  [str(ROOT / 'weights' / 'hub.py')]], ids=['timm-evit export', 'weights/hub.py'])
def test_a_reader_that_went_away_is_no_traceback(argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    read, write = os.pipe()
    os.close(read)   # the reader is gone before anything is written
    try:
        process = subprocess.run([sys.executable, *argv], stdout=write, stderr=subprocess.PIPE, text=True, env=env,
                                 cwd=tmp_path, timeout=300)
    finally:
        os.close(write)
    assert process.returncode == 128 + signal.SIGPIPE and process.stderr == '', process.stderr[-3000:]


def test_the_entry_point_names_every_command_as_the_parser_does():
    # _timm_evit_cli.py cannot import the parser (it runs before torch imports): its list must match
    import _timm_evit_cli
    commands = next(a for a in build_parser()._actions if a.dest == 'command').choices
    assert set(_timm_evit_cli.COMMANDS) == set(commands)
