"""What EViT keeps (masks, drawings) and choosing a keep rate (sweep), with their failure modes."""
import csv
import json
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models.vision_transformer import VisionTransformer

from helpers import TINY_IMG32_CLI, count_calls, run_cli, tiny_evit, write_class_images
from timm_evit.tools.plain import create_plain_counterpart
from timm_evit.tools.report import sweep_spread_note, write_sweep
from timm_evit.tools.sweep import SweepRow, pick_keep_rate, run_sweep
from timm_evit.tools._io import pyplot
from timm_evit.tools.files import figure_writer, write_all_whole
from timm_evit.tools.visualize import DROPPED, FUSED, KEPT, masks_figure, reorganisation_masks

DESIGN_TOKENS = {(0.7, True): [139, 99, 71], (0.7, False): [138, 97, 68], (0.5, True): [99, 51, 27]}


@pytest.mark.parametrize('keep_rate, fuse', sorted(DESIGN_TOKENS))
def test_masks_agree_with_the_token_indices(keep_rate, fuse):
    model = tiny_evit(depth=12, reorg_layers=(3, 6, 9), keep_rate=keep_rate, fuse_token=fuse).eval()
    images = torch.randn(2, 3, 224, 224)
    masks = reorganisation_masks(model, images)
    assert masks.shape == (2, 3, 14, 14)
    out = model.forward_intermediates(images, indices=[3, 6, 9], output_dict=True, intermediates_only=True)
    for s, ids in enumerate(out['token_patch_ids']):
        for b in range(2):
            own = set(ids[b][ids[b] >= 0].tolist())
            flat = masks[b, s].flatten()
            assert set(torch.nonzero(flat == KEPT).flatten().tolist()) == own      # kept = has its own token
            num_fused_tokens = int((ids[b] < 0).sum())
            assert len(own) + num_fused_tokens == DESIGN_TOKENS[keep_rate, fuse][s]   # docs/design.md, "EViT, exactly"
            assert not (flat == (DROPPED if fuse else FUSED)).any()
            if s:  # a patch that lost its own token never gets it back
                assert not ((masks[b, s - 1] != KEPT) & (masks[b, s] == KEPT)).any()


def test_masks_on_another_image_size():
    model = tiny_evit(dynamic_img_size=True, keep_rate=0.5).eval()
    masks = reorganisation_masks(model, torch.randn(1, 3, 160, 256))
    assert masks.shape == (1, 2, 10, 16)
    assert int((masks[0, 0] == KEPT).sum()) == 80


def draw_masks(image, masks, stage_names, path):
    """The PNG of ``masks_figure``, written whole as the visualize command writes its pictures."""
    fig = masks_figure(image, masks, stage_names)
    try:
        write_all_whole({path: figure_writer(fig)})
    finally:
        pyplot().close(fig)


def test_draw_is_whole_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / 'masks.png'
    masks = torch.tensor([[[KEPT, FUSED], [DROPPED, KEPT]]], dtype=torch.int8)
    draw_masks(torch.rand(3, 32, 32), masks, ['block 3'], str(path))
    assert path.read_bytes()[:4] == b'\x89PNG'
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', lambda *a, **k: (_ for _ in ()).throw(OSError('disk full')))
    with pytest.raises(OSError):
        draw_masks(torch.rand(3, 32, 32), masks, ['block 3'], str(tmp_path / 'other.png'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['masks.png']   # no partial file, no temporary


def test_visualize_command(tmp_path, capsys):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(tmp_path / 'img.jpg')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    result = run_cli(capsys, ['visualize', str(tmp_path / 'img.jpg'), '--model', 'evit_deit_tiny', '--keep-rate', '0.5',
                              '--out', str(tmp_path)])
    assert result.code == 0, result.err
    assert (tmp_path / 'img_evit.png').read_bytes()[:4] == b'\x89PNG'
    for bad, words in [('broken.jpg', "cannot read image"), ('missing.jpg', 'no such file')]:
        result = run_cli(capsys, ['visualize', str(tmp_path / 'img.jpg'), str(tmp_path / bad), '--model',
                                  'evit_deit_tiny', '--out', str(tmp_path / 'fresh')])
        assert result.code == 2 and words in result.err and bad in result.err
        assert not (tmp_path / 'fresh').exists()    # nothing drawn, not even the folder, when one image is bad


def test_visualize_at_another_size_into_a_new_folder_one_picture_per_image(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for folder in ('a', 'b'):   # two images of the same name: each gets its own picture
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / folder / 'cat.png')
    out = tmp_path / 'pictures'   # does not exist yet, given with a trailing slash as in the README
    result = run_cli(capsys, ['visualize', str(tmp_path / 'a' / 'cat.png'), str(tmp_path / 'b' / 'cat.png'), '--model',
                              'evit_deit_tiny', '--img-size', '64', '--keep-rate', '0.5', '--out', f'{out}/'])
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ['cat_1_evit.png', 'cat_evit.png']
    assert result.out.split() == [str(out / 'cat_evit.png'), str(out / 'cat_1_evit.png')]
    assert (out / 'cat_evit.png').read_bytes() != (out / 'cat_1_evit.png').read_bytes()


def test_picture_names_never_collide():
    from timm_evit.tools.visualize import picture_names
    paths = ['a/cat.png', 'b/cat.jpg', 'c/cat_1.png', 'd/Cat.png', 'dog.png']
    assert picture_names(paths) == ['cat_evit.png', 'cat_1_evit.png', 'cat_1_1_evit.png', 'Cat_2_evit.png',
                                    'dog_evit.png']


def test_visualize_writes_every_picture_or_none(tmp_path, monkeypatch, capsys):
    import matplotlib.figure
    for name in ('one', 'two'):
        Image.new('RGB', (48, 40), name == 'one' and 'red' or 'blue').save(tmp_path / f'{name}.png')
    savefig = matplotlib.figure.Figure.savefig
    calls = []

    def disk_full_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, 'No space left on device')
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', disk_full_on_the_second)
    out = tmp_path / 'out'
    code, _, _ = run_cli(capsys, ['visualize', str(tmp_path / 'one.png'), str(tmp_path / 'two.png'), '--model',
                                  'evit_deit_tiny', '--img-size', '32', '--out', str(out)])
    assert code == 2 and len(calls) == 2
    assert not out.exists()   # the first picture was not left behind alone, nor the folder made for them


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = write_class_images(tmp_path_factory.mktemp('data'), 4, lambda i: (64 + 16 * i, 80, 3), 40)
    torch.manual_seed(3)
    model = timm.create_model('evit_deit_tiny', num_classes=3)
    checkpoint = root / 'model.pth'
    torch.save(model.state_dict(), checkpoint)
    return root, checkpoint, model.eval()


def test_sweep_reports_the_top1_of_evaluating_by_hand(image_folder, tmp_path, capsys):
    root, checkpoint, model = image_folder
    result = run_cli(capsys, ['sweep', '--model', 'evit_deit_tiny', '--data-dir', str(root), '--checkpoint',
                              str(checkpoint), '--num-classes', '3', '--keep-rates', '1,0.7,0.25', '--batch-size', '5',
                              '--out', str(tmp_path / 'sw'), '--max-drop', '100', '--crop-pct', '1.0'])
    assert result.code == 0, result.err
    rows = {r['keep_rate']: r for r in json.loads((tmp_path / 'sw.json').read_text())['rows']}
    with open(tmp_path / 'sw.csv') as f:
        assert [float(r['top1']) for r in csv.DictReader(f)] == [rows[k]['top1'] for k in (1.0, 0.7, 0.25)]
    assert (tmp_path / 'sw.png').read_bytes()[:4] == b'\x89PNG'

    # by hand: the model's eval transform (whole image: crop 1.0), one image at a time, sorted class folders as labels
    transform = create_transform(**resolve_data_config({'crop_pct': 1.0}, model=model))
    files = sorted((root / 'validation').glob('*/*.png'))
    labels = {name: i for i, name in enumerate(sorted(p.name for p in (root / 'validation').iterdir()))}
    for rate in (1.0, 0.7, 0.25):
        with torch.no_grad():
            hits = [int(model(transform(Image.open(f).convert('RGB'))[None], keep_rate=rate).argmax()) == labels[f.parent.name]
                    for f in files]
        assert rows[rate]['top1'] == pytest.approx(100 * sum(hits) / len(hits))
        assert rows[rate]['num_images'] == 12
    assert rows[0.25]['gmacs'] < rows[0.7]['gmacs'] < rows[1.0]['gmacs']
    for row in rows.values():  # throughput is measured beside timm's own DeiT
        assert row['plain_model'] == 'deit_tiny_patch16_224'
    assert 'speed-up vs deit_tiny_patch16_224' in result.out
    assert 'use: --model-kwargs keep_rate=' in result.out


def test_plain_counterpart_is_timms_model_with_the_same_architecture_and_weights():
    kwargs = dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3, reorg_layers=(1, 3),
                  keep_rate=0.5, keep_rate_warmup_steps=10)
    torch.manual_seed(0)
    evit = timm.create_model('evit_deit_tiny', num_classes=7, **kwargs).eval()
    plain = create_plain_counterpart('evit_deit_tiny', evit, **kwargs)
    assert type(plain) is VisionTransformer and not plain.training
    assert plain.patch_embed.img_size == (64, 64) and len(plain.blocks) == 6 and plain.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), evit(x, keep_rate=1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='--model takes one of .* or such a timm name itself'):
        create_plain_counterpart('no_such_model', evit)


def test_pick_keep_rate():
    def row(rate, top1, ips):
        return SweepRow(rate, top1, 100., 1., ips, ips / 10, 10, 'deit_tiny_patch16_224', 10.)
    rows = [row(1.0, 80.0, 10), row(0.7, 79.6, 15), row(0.5, 79.0, 20)]
    assert pick_keep_rate(rows, 0.5).keep_rate == 0.7
    assert pick_keep_rate(rows, 1.0).keep_rate == 0.5
    assert pick_keep_rate(rows, 0.0).keep_rate == 1.0
    with pytest.raises(ValueError, match='needs keep rate 1.0'):
        pick_keep_rate(rows[1:], 0.5)


def test_sweep_errors(tmp_path, image_folder, capsys):
    root, checkpoint, _ = image_folder
    (tmp_path / 'empty' / 'validation').mkdir(parents=True)
    bad = tmp_path / 'bad' / 'validation' / 'a'
    bad.mkdir(parents=True)
    Image.new('RGB', (32, 32)).save(bad / 'ok.png')
    (bad / 'broken.png').write_bytes(b'\x89PNG garbage')
    cases = [
        (['--data-dir', str(tmp_path / 'nowhere')], 'is not a folder'),
        (['--data-dir', str(tmp_path / 'empty')], 'holds no images'),
        (['--data-dir', str(tmp_path / 'bad')], 'unreadable image(s)'),
        (['--data-dir', str(root), '--checkpoint', str(tmp_path / 'none.pth')], 'is not a file'),
        (['--data-dir', str(root), '--keep-rates', '0.7,0.5', '--max-drop', '1'], 'needs keep rate 1.0'),
        (['--data-dir', str(root), '--crop-pct', '1.5'], '--crop-pct must be in (0, 1]'),
        (['--data-dir', str(root), '--repeats', '-1'], 'expected an integer >= 0'),
        # --max-drop picks the fastest rate: it needs speed, measured only with enough repeats
        (['--data-dir', str(root), '--repeats', '4', '--max-drop', '1'], '--max-drop picks the fastest keep rate'),
    ]
    for args, words in cases:
        result = run_cli(capsys, ['sweep', '--model', 'evit_deit_tiny', '--num-classes', '3', '--checkpoint',
                                  str(checkpoint), '--out', str(tmp_path / 'sw'), *args])
        assert result.code == 2 and words in result.err, (args, result.err[-500:])
    assert not list(tmp_path.glob('sw*'))


def test_sweep_speed_up_is_the_plain_models_time_over_each_rates(image_folder, monkeypatch):
    import timm_evit.tools.sweep as sweep
    root, checkpoint, _ = image_folder
    # seconds per timed batch of 4 images, 5 interleaved repeats; two repeats of keep 0.25 were slowed
    seconds = {'plain': [0.2] * 5, 1.0: [0.2] * 5, 0.7: [0.1] * 5, 0.25: [0.05, 0.1, 0.1, 0.05, 0.05]}
    monkeypatch.setattr(sweep, 'time_interleaved_samples',
                        lambda forwards, repeats, warmup: {k: seconds[k] for k in forwards})
    rows = sweep.run_sweep('evit_deit_tiny', data_dir=str(root), keep_rates=(1.0, 0.7, 0.25), batch_size=4,
                           checkpoint=str(checkpoint), num_classes=3, show_progress=False, repeats=5)
    assert [r.speedup_vs_plain for r in rows] == pytest.approx([1.0, 2.0, 4.0])   # medians
    assert [r.images_per_s for r in rows] == pytest.approx([20.0, 40.0, 80.0])
    assert [r.plain_images_per_s for r in rows] == pytest.approx([20.0] * 3)
    # per-repeat speed-ups of keep 0.25: 4, 2, 2, 4, 4: their middle half ranges over half their median
    assert [r.spread for r in rows] == pytest.approx([0.0, 0.0, 0.5]) and rows[0].plain_spread == 0.0
    note = sweep_spread_note(rows, 5)
    assert 'keep_rate 0.25: their middle half over 50 %' in note and 'rerun' in note


@pytest.mark.parametrize('repeats', [0, 1, 4])
def test_sweep_prints_no_speed_from_too_few_repeats(repeats, image_folder, tmp_path, capsys, monkeypatch):
    import timm_evit.tools.sweep as sweep
    root, checkpoint, _ = image_folder
    timed = []
    monkeypatch.setattr(sweep, 'time_interleaved_samples', lambda *a, **k: timed.append(1))
    result = run_cli(capsys, ['sweep', '--model', 'evit_deit_tiny', '--num-classes', '3', '--checkpoint',
                              str(checkpoint), '--data-dir', str(root), '--keep-rates', '1,0.5', '--repeats',
                              str(repeats), '--out', str(tmp_path / 'sw')])
    assert result.code == 0, result.err[-2000:]
    assert timed == [] and 'img/s' not in result.out and 'speed-up' not in result.out
    assert f'# speed not measured: {repeats} repeat(s) are too few' in result.out
    rows = json.loads((tmp_path / 'sw.json').read_text())['rows']
    assert all(r['images_per_s'] is None and r['speedup_vs_plain'] is None and r['spread'] is None for r in rows)


def test_write_sweep_is_whole_or_nothing(tmp_path, monkeypatch):
    rows = [SweepRow(1.0, 50., 90., 1.25, 10., 1.0, 12, 'deit_tiny_patch16_224', 10.)]
    with pytest.raises(ValueError, match='does not exist'):
        write_sweep(rows, str(tmp_path / 'missing' / 'sw'))
    paths = write_sweep(rows, str(tmp_path / 'sw'), plot=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sw.csv', 'sw.json'] and len(paths) == 2
    # the chart fails after the table could be written: none of the three may remain
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', lambda *a, **k: (_ for _ in ()).throw(OSError('disk full')))
    with pytest.raises(OSError, match='disk full'):
        write_sweep(rows, str(tmp_path / 'new'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['sw.csv', 'sw.json']   # no new file, no temporary


def test_image_folder_refuses_truncated_images_and_missing_splits(tmp_path):
    from timm_evit.tools.data import load_image_folder
    for split in ('train', 'validation'):
        (tmp_path / split / 'cat').mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / split / 'cat' / 'whole.jpg')
    assert len(load_image_folder(str(tmp_path), 'validation')) == 1
    assert len(load_image_folder(str(tmp_path), 'val')) == 1     # timm's synonyms of the validation split
    with pytest.raises(ValueError, match=r"has no split 'test': it has train, validation"):
        load_image_folder(str(tmp_path), 'test')
    # a folder of class folders alone is the validation split, and nothing else
    assert len(load_image_folder(str(tmp_path / 'train'), 'validation')) == 1
    with pytest.raises(ValueError, match="no split 'test'"):
        load_image_folder(str(tmp_path / 'train'), 'test')
    # PIL reads only the header when opening: a JPEG cut in half opens fine, and timm would
    # silently serve another image in its place
    whole = (tmp_path / 'validation' / 'cat' / 'whole.jpg').read_bytes()
    (tmp_path / 'validation' / 'cat' / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r'unreadable image\(s\).*cut\.jpg'):
        load_image_folder(str(tmp_path), 'validation')


def test_sweep_with_num_classes_in_model_kwargs(tmp_path, image_folder, capsys):
    root, _, _ = image_folder
    tiny = ['--model-kwargs', 'num_classes=10', *TINY_IMG32_CLI]
    out = tmp_path / 'new' / 'sw'    # its folder does not exist yet
    result = run_cli(capsys, ['sweep', '--model', 'evit_deit_tiny', '--data-dir', str(root), '--keep-rates', '1,0.5',
                              '--batch-size', '2', '--repeats', '1', '--num-classes', '10', '--out', str(out), *tiny])
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.parent.iterdir()) == ['sw.csv', 'sw.json', 'sw.png']
    rows = json.loads((tmp_path / 'new' / 'sw.json').read_text())['rows']
    assert [r['num_images'] for r in rows] == [12, 12]
    with pytest.raises(ValueError, match='^--num-classes 3 conflicts with --model-kwargs num_classes=10$'):
        run_sweep('evit_deit_tiny', data_dir=str(root), num_classes=3, model_kwargs={'num_classes': 10})
    with pytest.raises(ValueError, match='^--no-fuse conflicts with --model-kwargs fuse_token=True$'):
        run_sweep('evit_deit_tiny', data_dir=str(root), fuse_token=False, model_kwargs={'fuse_token': True})


def test_commands_say_which_extra_is_missing(tmp_path, image_folder, capsys, monkeypatch):
    root, checkpoint, _ = image_folder
    Image.new('RGB', (40, 40)).save(tmp_path / 'a.png')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)      # import matplotlib now raises ImportError
    for args in (['visualize', str(tmp_path / 'a.png'), '--model', 'evit_deit_tiny', '--out', str(tmp_path)],
                 ['sweep', '--model', 'evit_deit_tiny', '--data-dir', str(root), '--out', str(tmp_path / 'sw')]):
        result = run_cli(capsys, args)
        assert result.code == 2 and "needs matplotlib: pip install 'timm-evit[plot]'" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.png']


@pytest.mark.parametrize('score', ['mean', 'pool'])
def test_sweep_and_visualize_serve_a_model_without_a_class_token(tmp_path, image_folder, capsys, score):
    # SigLIP's architecture, small: no prefix token at all, an attention-pool head
    root, _, _ = image_folder
    arch = ['img_size=32', 'patch_size=8', 'embed_dim=48', 'depth=4', 'num_heads=2', f'score={score}']
    result = run_cli(capsys, ['sweep', '--model', 'evit_vit_base_patch16_siglip_224', '--data-dir', str(root),
                              '--keep-rates', '1,0.5', '--batch-size', '4', '--repeats', '1', '--num-classes', '3',
                              '--out', str(tmp_path / 'sw'), '--model-kwargs', *arch])
    assert result.code == 0, result.err
    rows = json.loads((tmp_path / 'sw.json').read_text())['rows']
    assert [r['num_images'] for r in rows] == [12, 12] and rows[1]['gmacs'] < rows[0]['gmacs']
    assert rows[0]['plain_model'] == 'vit_base_patch16_siglip_224'
    image = next((root / 'validation' / 'cat').glob('*.png'))
    result = run_cli(capsys, ['visualize', str(image), '--model', 'evit_vit_base_patch16_siglip_224', '--keep-rate', '0.5',
                              '--out', str(tmp_path / 'pictures'), '--model-kwargs', *arch])
    assert result.code == 0, result.err
    assert (tmp_path / 'pictures' / f'{image.stem}_evit.png').read_bytes()[:4] == b'\x89PNG'


def test_sweep_parses_the_model_name_once_and_checks_its_settings_once(image_folder, tmp_path, capsys, monkeypatch):
    import timm_evit.tools.plain as plain
    import timm_evit.tools.sweep as sweep
    root, checkpoint, _ = image_folder
    calls = {}
    count_calls(monkeypatch, calls, parse=(plain, 'parse_model_name'), runtime=(sweep, 'check_runtime'))
    result = run_cli(capsys, ['sweep', '--model', 'evit_deit_tiny', '--num-classes', '3', '--checkpoint',
                              str(checkpoint), '--data-dir', str(root), '--keep-rates', '1,0.5', '--repeats', '0',
                              '--no-plot', '--out', str(tmp_path / 'sw')])
    assert result.code == 0, result.err[-2000:]
    assert calls == {'parse': 1, 'runtime': 1}
    with pytest.raises(TypeError, match='settings or their values'):
        run_sweep('evit_deit_tiny', sweep.SweepSettings(data_dir=str(root)), batch_size=2)
