"""The command-line tools with ``keep_mass`` (each image its own count): sweep and bench rows at keep
masses (GMACs per image, each alone, as a mean and a spread; real images, never noise), visualize's
per-image counts (padding left out), and the refusals where a fixed graph or random noise cannot
serve a keep mass (export, onnxruntime, bench without --data-dir)."""
import json
import re
import statistics

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from helpers import TINY_IMG32, TINY_IMG32_CLI, assert_one_line_error, randomise_weights, run_cli
from timm_evit.tools import bench as bench_module
from timm_evit.tools import sweep as sweep_module
from timm_evit.tools import visualize as visualize_module
from timm_evit.tools.bench import count_gmacs, gmacs_per_image
from timm_evit.tools.export import FIXED_COUNTS_NEEDED, exported_writer
from timm_evit.tools.models import create_evit_model
from timm_evit.tools.sweep import eval_data_config, first_images
from timm_evit.tools.visualize import KEPT, reorganisation

CLASSES = ('cat', 'dog', 'fox')
MODEL_KWARGS = dict(TINY_IMG32, num_classes=3)


def content_driven(model):
    """Random weights with patch content louder than position and sharper attention, so that images
    of different content keep different counts (random weights alone attend almost evenly)."""
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(8)
        model.pos_embed.mul_(0.1)
        for name, p in model.named_parameters():
            if name.endswith('qkv.weight'):
                p.mul_(2.0)
    return model


def varied_pixels(kind, rng):
    """40 x 40 RGB: a blank field, a small object on it, clutter everywhere, clutter on half."""
    pixels = np.full((40, 40, 3), 128, dtype=np.uint8)
    if kind == 1:
        pixels[10:20, 10:20] = rng.integers(0, 255, (10, 10, 3))
    elif kind == 2:
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    elif kind == 3:
        pixels[:, :20] = rng.integers(0, 255, (40, 20, 3))
    return pixels


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """An ImageFolder of 12 images of four kinds of content, and a checkpoint whose counts differ by image."""
    root = tmp_path_factory.mktemp('keep_mass_tools')
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / 'validation' / name).mkdir(parents=True)
        for i in range(4):
            pixels = varied_pixels(i, rng)
            pixels[..., c] = np.maximum(pixels[..., c], 60)   # a little class signal
            Image.fromarray(pixels).save(root / 'validation' / name / f'{i}.png')
    torch.manual_seed(0)
    model = content_driven(randomise_weights(timm.create_model('evit_deit_tiny', **MODEL_KWARGS))).eval()
    torch.save(model.state_dict(), root / 'model.pth')
    return root, root / 'model.pth', model


def stage_counts(model, x, keep_mass):
    """Each image's count after every reorganising block, from forward_intermediates: its tokens of size > 0."""
    with torch.no_grad():
        out = model.forward_intermediates(x, output_dict=True, intermediates_only=True, keep_mass=keep_mass)
    return torch.stack([(out['token_sizes'][i] > 0).sum(dim=1) for i in model.reorg_layers], dim=1)


def test_the_fixture_gives_images_their_own_counts(data):
    root, _, model = data
    counts = stage_counts(model, first_images(model, str(root), 'validation', 4), 0.6)
    assert len({tuple(c.tolist()) for c in counts}) > 1   # else nothing below tells per-image from shared


# ---- sweep -------------------------------------------------------------------------------------

def test_sweep_rows_at_keep_masses_count_gmacs_per_image(data, tmp_path, capsys):
    root, checkpoint, model = data
    result = run_cli(capsys, [
        'sweep', '--model', 'evit_deit_tiny', '--data-dir', root, '--checkpoint', checkpoint, '--num-classes', '3',
        '--keep-rates', '1,0.5', '--keep-masses', '0.9,0.6', '--batch-size', '4', '--repeats', '1', '--crop-pct', '1.0',
        '--macs-images', '0', '--max-drop', '100', '--out', tmp_path / 'sw', '--model-kwargs', *TINY_IMG32_CLI])
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sw.csv', 'sw.json', 'sw.png']
    assert (tmp_path / 'sw.png').read_bytes()[:4] == b'\x89PNG'
    rows = json.loads((tmp_path / 'sw.json').read_text())['rows']
    assert [(r['keep_rate'], r['keep_mass']) for r in rows] == [(1.0, None), (0.5, None), (None, 0.9), (None, 0.6)]
    assert list(rows[0])[:2] == ['keep_rate', 'keep_mass']
    header = (tmp_path / 'sw.csv').read_text().splitlines()[0].split(',')
    assert header[:2] == ['keep_rate', 'keep_mass'] and header[header.index('gmacs') + 1] == 'gmacs_std'
    keep1 = rows[0]
    assert rows[0]['gmacs_std'] == rows[1]['gmacs_std'] == 0
    for row in rows[2:]:
        assert row['gmacs_std'] >= 0 and row['gmacs'] < keep1['gmacs'] and row['num_images'] == 12
    assert rows[3]['gmacs_std'] > 0   # the images keep different counts
    assert '| keep_rate | keep_mass | top-1 |' in result.out and ' ± ' in result.out
    assert 'use: --model-kwargs keep_' in result.out

    # by hand: every image alone through the eval transform, at each keep mass
    from timm.data import create_transform
    reloaded = create_evit_model('evit_deit_tiny', checkpoint=str(checkpoint), **MODEL_KWARGS).eval()
    transform = create_transform(**eval_data_config(reloaded, 1.0))
    files = sorted((root / 'validation').glob('*/*.png'))
    for row in rows[2:]:
        gmacs, hits = [], []
        for f in files:
            x = transform(Image.open(f).convert('RGB'))[None]
            gmacs.append(count_gmacs(reloaded, x, keep_mass=row['keep_mass']))
            with torch.no_grad():
                hits.append(int(reloaded(x, keep_mass=row['keep_mass']).argmax()) == CLASSES.index(f.parent.name))
        assert row['gmacs'] == pytest.approx(statistics.mean(gmacs), rel=1e-9)
        assert row['gmacs_std'] == pytest.approx(statistics.pstdev(gmacs), rel=1e-6)
        assert row['top1'] == pytest.approx(100 * sum(hits) / len(hits))


def test_sweep_counts_the_gmacs_of_the_first_macs_images_and_times_real_images(data, monkeypatch):
    root, checkpoint, _ = data
    counted, timed = [], []

    def counting(model, x, fused_attn=None, **kwargs):
        counted.extend([(kwargs['keep_mass'], 1)] * x.shape[0])
        return gmacs_per_image(model, x, fused_attn, **kwargs)

    def timing(forwards, repeats, warmup):
        for fn in forwards.values():
            timed.append(fn)
        return {key: 0.1 for key in forwards}

    monkeypatch.setattr(sweep_module, 'gmacs_per_image', counting)
    monkeypatch.setattr(sweep_module, 'time_interleaved', timing)
    rows = sweep_module.run_sweep('evit_deit_tiny', str(root), keep_rates=(1.0,), keep_masses=(0.9, 0.6),
                                  batch_size=4, checkpoint=str(checkpoint), model_kwargs=MODEL_KWARGS,
                                  show_progress=False, repeats=1, macs_images=5)
    assert sorted(counted) == [(0.6, 1)] * 5 + [(0.9, 1)] * 5    # five images, each alone
    assert [(r.keep_rate, r.keep_mass) for r in rows] == [(1.0, None), (None, 0.9), (None, 0.6)]
    assert len(timed) == 4   # the plain model, keep rate 1.0 and both keep masses


# ---- bench -------------------------------------------------------------------------------------

def test_bench_rows_at_keep_masses_on_the_first_images(data, tmp_path, capsys):
    root, checkpoint, model = data
    out = tmp_path / 'bench.json'
    result = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--checkpoint', checkpoint, '--data-dir', root, '--keep-masses', '0.6',
        '--batch-size', '4',
        '--repeats', '1', '--warmup', '0', '--attn', 'math', '--json', out, '--plot', tmp_path / 'bench.png',
        '--model-kwargs', *TINY_IMG32_CLI, 'num_classes=3'])
    assert result.code == 0, result.err
    assert 'batch 4 (the first images of' in result.out and '| keep_rate | keep_mass |' in result.out
    plain, keep1, mass = json.loads(out.read_text())['rows']     # --keep-masses alone: keep rate 1.0 beside
    assert (plain['keep_rate'], plain['keep_mass']) == (None, None)
    assert (keep1['keep_rate'], keep1['keep_mass'], keep1['gmacs_std']) == (1.0, None, 0)
    assert (mass['keep_rate'], mass['keep_mass']) == (None, 0.6)
    # by hand, on the first four images: mean counts, GMACs of each image alone (the math path)
    x = first_images(model, str(root), 'validation', 4)
    counts = stage_counts(model, x, 0.6).double()
    assert mass['tokens'] == pytest.approx([16.] + counts.mean(dim=0).tolist())
    gmacs = [count_gmacs(model, image[None], False, keep_mass=0.6) for image in x]
    assert mass['gmacs'] == pytest.approx(statistics.mean(gmacs), rel=1e-9)
    assert mass['gmacs_std'] == pytest.approx(statistics.pstdev(gmacs), rel=1e-6) and mass['gmacs_std'] > 0
    assert mass['gmacs'] < plain['gmacs'] and mass['mac_ratio'] > 1
    assert (tmp_path / 'bench.png').read_bytes()[:4] == b'\x89PNG'


def test_bench_measures_keep_rate_rows_on_the_data_too(data, monkeypatch):
    root, _, model = data
    seen = []
    real = bench_module.require_finite_forward
    monkeypatch.setattr(bench_module, 'require_finite_forward',
                        lambda m, x, *a, **k: (seen.append(x), real(m, x, *a, **k)))
    bench_module.run_bench('evit_deit_tiny', keep_rates=(1.0, 0.5), batch_size=4, repeats=1, warmup=0,
                           attn=('math',), latency=False, show_progress=False, model_kwargs=MODEL_KWARGS,
                           data_dir=str(root))
    first = first_images(model, str(root), 'validation', 4)
    assert all(torch.equal(x, first[:1]) for x in seen)


def test_bench_latency_on_the_data_is_each_image_alone(data, monkeypatch):
    root, _, model = data
    seen = []
    real = bench_module.create_plain_counterpart

    def recording(*args, **kwargs):
        plain = real(*args, **kwargs)
        plain.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
        return plain
    monkeypatch.setattr(bench_module, 'create_plain_counterpart', recording)
    bench_module.run_bench('evit_deit_tiny', keep_rates=(0.5,), batch_size=4, repeats=1, warmup=0, attn=('math',),
                           show_progress=False, model_kwargs=MODEL_KWARGS, data_dir=str(root))
    first = first_images(model, str(root), 'validation', 4)
    alone = [x for x in seen if x.shape[0] == 1][-4:]   # the timed calls come last (after the GMACs count)
    assert all(torch.equal(x[0], image) for x, image in zip(alone, first))


# ---- visualize -----------------------------------------------------------------------------------

def test_visualize_keep_mass_shows_each_images_own_count(data, tmp_path, capsys, monkeypatch):
    root, checkpoint, model = data
    drawn = []
    real = visualize_module.masks_figure

    def recording(image, masks, stage_names, title='', token_counts=None):
        fig = real(image, masks, stage_names, title=title, token_counts=token_counts)
        drawn.append((image, [ax.get_title() for ax in fig.axes][1:], title))
        return fig

    monkeypatch.setattr(visualize_module, 'masks_figure', recording)
    paths = [root / 'validation' / 'cat' / f'{i}.png' for i in (1, 2)]   # an object alone, clutter everywhere
    result = run_cli(capsys, ['visualize', *paths, '--model', 'evit_deit_tiny', '--checkpoint', checkpoint,
                              '--keep-mass', '0.6', '--out', tmp_path, '--model-kwargs', *TINY_IMG32_CLI,
                              'num_classes=3'])
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['1_evit.png', '2_evit.png']
    config = eval_data_config(model)
    mean, std = torch.tensor(config['mean']).view(3, 1, 1), torch.tensor(config['std']).view(3, 1, 1)
    shown = []
    for pixels, titles, suptitle in drawn:
        assert 'keep_mass 0.6' in suptitle
        expected = stage_counts(model, ((pixels - mean) / std)[None], 0.6)[0].tolist()
        assert [int(re.search(r': (\d+) tokens\n', t).group(1)) for t in titles] == expected
        shown.append(tuple(expected))
    assert shown[0] != shown[1]   # each image its own count


def test_reorganisation_counts_leave_the_padding_out(data):
    root, _, model = data
    x = first_images(model, str(root), 'validation', 4)
    masks, counts = reorganisation(model, x, keep_mass=0.6)
    assert torch.equal(counts, stage_counts(model, x, 0.6))
    with torch.no_grad():
        out = model.forward_intermediates(x, output_dict=True, intermediates_only=True, keep_mass=0.6)
    assert any(bool((out['token_patch_ids'][i] == -2).any()) for i in model.reorg_layers)   # a batch with padding
    for stage, layer in enumerate(model.reorg_layers):
        ids = out['token_patch_ids'][layer]
        assert torch.equal((masks[:, stage] == KEPT).flatten(1).sum(dim=1), (ids >= 0).sum(dim=1))
    for b in range(x.shape[0]):   # each image as it is alone
        alone_masks, alone_counts = reorganisation(model, x[b:b + 1], keep_mass=0.6)
        assert torch.equal(alone_masks[0], masks[b]) and torch.equal(alone_counts[0], counts[b])


# ---- keep_mass among --model-kwargs, and the refusals ----------------------------------------------

def test_keep_mass_among_model_kwargs_reaches_visualize_and_bench_and_sweep_refuse_it(data, tmp_path, capsys,
                                                                                      monkeypatch):
    root, checkpoint, _ = data
    titles = []
    real = visualize_module.masks_figure
    monkeypatch.setattr(visualize_module, 'masks_figure',
                        lambda *a, **k: (titles.append(k['title']), real(*a, **k))[1])
    result = run_cli(capsys, ['visualize', root / 'validation' / 'cat' / '1.png', '--model', 'evit_deit_tiny',
                              '--checkpoint', checkpoint, '--out', tmp_path / 'pictures', '--model-kwargs',
                              *TINY_IMG32_CLI, 'num_classes=3', 'keep_mass=0.6'])
    assert result.code == 0, result.err
    assert 'keep_mass 0.6' in titles[0]
    # bench and sweep measure their own rows' budgets: one in --model-kwargs would be silently replaced
    # (issue 29), so it is refused naming the option to use (REFUSALS below, one line each)
    result = run_cli(capsys, ['bench', '--model', 'evit_deit_tiny', '--keep-rates', '1,0.5', '--batch-size', '1',
                              '--repeats', '1', '--warmup', '0', '--attn', 'math', '--no-latency',
                              '--model-kwargs', *TINY_IMG32_CLI, 'keep_mass=0.6'])
    assert_one_line_error(result.code, result.err, 'bench', '--keep-masses 0.6')


BENCH = ['bench', '--model', 'evit_deit_tiny', '--batch-size', '2', '--repeats', '1', '--warmup', '0',
         '--attn', 'math', '--no-latency', '--json', '{tmp}/b.json', '--model-kwargs', *TINY_IMG32_CLI]
SWEEP = ['sweep', '--model', 'evit_deit_tiny', '--data-dir', '{root}', '--batch-size', '2', '--repeats', '1',
         '--out', '{tmp}/sw', '--model-kwargs', *TINY_IMG32_CLI]
EXPORT = ['export', '--model', 'evit_deit_tiny', '--out', '{tmp}/m.onnx', '--model-kwargs', *TINY_IMG32_CLI]
VISUALIZE = ['visualize', '{root}/validation/cat/0.png', '--model', 'evit_deit_tiny', '--out', '{tmp}/pics',
             '--model-kwargs', *TINY_IMG32_CLI]

REFUSALS = {
    'bench keep masses without data': (BENCH + ['--keep-masses', '0.6'], ['--keep-masses needs --data-dir', 'noise']),
    'bench keep masses in onnxruntime': (BENCH + ['--keep-masses', '0.6', '--data-dir', '{root}',
                                                  '--runtime', 'onnxruntime'], ['--keep-masses', 'onnxruntime']),
    'bench crop without data': (BENCH + ['--crop-pct', '0.9'], ['--crop-pct', 'needs --data-dir']),
    'bench keep mass given twice': (BENCH + ['--keep-masses', '0.6,0.60', '--data-dir', '{root}'],
                                    ['--keep-masses lists 0.6 twice']),
    'bench more images than the folder holds': (BENCH[:4] + ['20'] + BENCH[5:] + ['--data-dir', '{root}'],
                                                ['holds 12 image(s), fewer than --batch-size 20']),
    'sweep keep masses in onnxruntime': (SWEEP + ['--keep-masses', '0.6', '--runtime', 'onnxruntime'],
                                         ['--keep-masses', 'onnxruntime']),
    'sweep keep mass out of range': (SWEEP + ['--keep-masses', '0.5,1.5'], ['--keep-masses takes', '(0, 1]']),
    'sweep negative macs images': (SWEEP + ['--keep-masses', '0.5', '--macs-images', '-1'],
                                   ['--macs-images', 'integer >= 0']),
    # a budget in --model-kwargs would be replaced by each row's: refused, naming the option to use (issue 29)
    'bench keep mass in model kwargs': (BENCH + ['keep_mass=0.9'], ['--model-kwargs keep_mass=0.9', '--keep-masses 0.9']),
    'bench keep rate in model kwargs': (BENCH + ['keep_rate=0.6'], ['--model-kwargs keep_rate=0.6', '--keep-rates 0.6']),
    'sweep keep mass in model kwargs': (SWEEP + ['keep_mass=0.9'], ['--model-kwargs keep_mass=0.9', '--keep-masses 0.9']),
    'export keep mass model': (EXPORT + ['keep_mass=0.8'], [FIXED_COUNTS_NEEDED]),
    'export keep mass model as a program': (EXPORT + ['keep_mass=0.8', '--format', 'export'], [FIXED_COUNTS_NEEDED]),
    'export keep rate beside a keep mass': (EXPORT + ['keep_mass=0.8', '--keep-rate', '0.5'],
                                            ['--keep-rate 0.5 conflicts with --model-kwargs keep_mass=0.8']),
    'visualize keep rate and keep mass': (VISUALIZE + ['--keep-rate', '0.5', '--keep-mass', '0.8'],
                                          ['--keep-mass', 'not allowed with', '--keep-rate']),
    'visualize keep mass beside a keep rate': (VISUALIZE + ['keep_rate=0.5', '--keep-mass', '0.8'],
                                               ['--keep-mass 0.8 conflicts with --model-kwargs keep_rate=0.5']),
}


@pytest.mark.parametrize('case', sorted(REFUSALS))
def test_refusals_are_one_line(case, data, tmp_path, capsys):
    root, _, _ = data
    argv, words = REFUSALS[case]
    code, _, err = run_cli(capsys, [a.format(root=root, tmp=tmp_path) for a in argv])
    assert_one_line_error(code, err, argv[0], *words)
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_the_python_export_refuses_a_keep_mass_model():
    model = timm.create_model('evit_deit_tiny', keep_mass=0.8, **TINY_IMG32).eval()
    for format in ('onnx', 'export'):
        with pytest.raises(ValueError, match=re.escape(FIXED_COUNTS_NEEDED)):
            exported_writer(model, format)


def test_torch_s_own_exports_of_a_keep_mass_model_say_why_in_one_line():
    # torch.export and torch.jit.trace stop where the budgets are read, with one line naming keep_mass
    # (a 480-line guard error deep in the tracer before, issue 29); torch.onnx.export wraps the same line
    model = timm.create_model('evit_deit_tiny', keep_mass=0.8, **TINY_IMG32).eval()
    x = torch.randn(2, 3, 32, 32)
    dynamic = ({0: torch.export.Dim('batch')},)
    for export in (lambda: torch.export.export(model, (x,)),
                   lambda: torch.export.export(model, (x,), dynamic_shapes=dynamic),
                   lambda: torch.jit.trace(model, (x,))):
        with pytest.raises(ValueError) as refused:
            export()
        assert str(refused.value) == FIXED_COUNTS_NEEDED and 'keep_mass' in FIXED_COUNTS_NEEDED
    with torch.no_grad():
        assert model(x).shape == (2, 1000)   # eager still runs
