"""The benchmark's token counts and GMACs (not its timings): a change that stops reducing tokens fails here."""
import json
import sys

import pytest
import torch

from helpers import count_calls, run_cli
from timm_evit.tools.bench import run_bench

# docs/design.md, "EViT, exactly": non-class tokens for DeiT at 224 px, at the input and after blocks 3, 6, 9.
DESIGN_TOKENS = {
    (0.9, True): [196, 178, 162, 147], (0.9, False): [196, 177, 160, 144],
    (0.7, True): [196, 139, 99, 71], (0.7, False): [196, 138, 97, 68],
    (0.5, True): [196, 99, 51, 27], (0.5, False): [196, 98, 49, 25],
}


@pytest.mark.parametrize('fuse', [True, False])
def test_tokens_and_gmacs_per_keep_rate(fuse):
    rows = run_bench('evit_deit_small', keep_rates=(1.0, 0.9, 0.7, 0.5), fuse_token=fuse, batch_size=1,
                     repeats=1, warmup=0, attn=('math',), show_progress=False)
    plain, evit = rows[0], {r.keep_rate: r for r in rows[1:]}
    assert plain.model == 'deit_small_patch16_224' and plain.gmacs == pytest.approx(4.6, abs=0.05)  # paper: 4.6
    assert evit[1.0].tokens == [196] * 4 and evit[1.0].gmacs == pytest.approx(plain.gmacs, rel=1e-6)
    for rate in (0.9, 0.7, 0.5):
        assert evit[rate].tokens == DESIGN_TOKENS[rate, fuse]
    if fuse:  # paper: 3.0 GMACs at keep 0.7, 2.3 at 0.5
        assert evit[0.7].gmacs == pytest.approx(3.0, abs=0.05)
        assert evit[0.5].gmacs == pytest.approx(2.3, abs=0.05)
    assert evit[0.9].gmacs > evit[0.7].gmacs > evit[0.5].gmacs


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    result = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--batch-size', '1',
        '--repeats', '1', '--warmup', '0', '--keep-rates', '1,0.5', '--attn', 'both', '--json', str(out)])
    assert result.code == 0, result.err
    assert '| evit_deit_tiny | fused | 0.5 | yes | 196, 99, 51, 27 |' in result.out
    rows = json.loads(out.read_text())['rows']
    assert [(r['attn'], r['keep_rate']) for r in rows] == [
        ('math', None), ('math', 1.0), ('math', 0.5), ('fused', None), ('fused', 1.0), ('fused', 0.5)]


def test_cli_rejects_bad_keep_rates(capsys):
    result = run_cli(capsys, ['bench', '--keep-rates', '0.7,1.5'])
    assert result.code == 2 and '--keep-rates takes comma-separated floats in (0, 1]' in result.err


def test_cli_plot_and_batch_one_latency(tmp_path, capsys):
    png = tmp_path / 'bench.png'
    result = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--batch-size', '2', '--repeats', '1',
        '--warmup', '0', '--keep-rates', '1,0.5', '--attn', 'fused', '--plot', str(png)])
    assert result.code == 0, result.err
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert list(tmp_path.iterdir()) == [png]                  # written whole: no temporary left behind
    assert 'batch-1 ms' in result.out


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    from timm_evit.tools.report import rows_figure
    from timm_evit.tools.files import figure_writer, write_all_whole
    monkeypatch.setitem(sys.modules, 'matplotlib', None)      # import matplotlib now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'timm-evit\[plot\]'"):
        write_all_whole({str(tmp_path / 'x.png'): figure_writer(rows_figure([]), dpi=120)})
    assert not list(tmp_path.iterdir())


def test_cli_rejects_a_device_it_does_not_have(capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    result = run_cli(capsys, ['bench', '--device', 'cuda'])
    assert result.code == 2 and "device 'cuda' was asked for but torch sees no CUDA device" in result.err


def test_cli_benchmarks_another_architecture_beside_the_same_plain_one(tmp_path, capsys):
    # the cluttered-digits model of BENCHMARKS.md: 64 px images, 8 px patches, 6 blocks of width 96
    out = tmp_path / 'bench.json'
    result = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--batch-size', '2',
        '--repeats', '1', '--warmup', '0', '--keep-rates', '1,0.7', '--attn', 'fused', '--no-latency',
        '--json', str(out), '--model-kwargs', 'img_size=64', 'patch_size=8', 'embed_dim=96', 'depth=6',
        'num_heads=3', 'reorg_layers=(1,3,5)'])
    assert result.code == 0, result.err
    # the plain model's architecture; EViT's own arguments (reorg_layers) are not the plain model's
    assert ("vs timm's deit_tiny_patch16_224 (same weights) with img_size=64 patch_size=8 embed_dim=96 depth=6 "
            "num_heads=3; fused (SDPA) attention; batch 2 of random images" in result.out.splitlines()[0])
    plain, keep1, keep07 = json.loads(out.read_text())['rows']
    # by hand: 64 patches; keep ceil(0.7 n) of n tokens, plus the fused one, after blocks 1, 3, 5
    assert plain['tokens'] == [64] and keep1['tokens'] == [64] * 4 and keep07['tokens'] == [64, 46, 34, 25]
    n, d = 65, 96  # tokens with the class token, width
    block = 12 * d * d * n + 2 * n * n * d  # qkv, proj, mlp (4x) matmuls and the two attention products
    expected = 6 * block + 64 * (8 * 8 * 3 * d) + d * 10 ** 3  # blocks, patch embedding, 1000-class head
    assert plain['gmacs'] == pytest.approx(expected / 1e9, rel=1e-3) and keep1['gmacs'] == plain['gmacs']


def test_cli_model_kwargs_with_num_classes_into_new_folders(tmp_path, capsys):
    # num_classes among --model-kwargs reaches both models (it used to be passed twice to the plain one)
    out = tmp_path / 'results'   # does not exist yet: created
    result = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--batch-size', '2',
        '--repeats', '1', '--warmup', '0', '--keep-rates', '1,0.5', '--attn', 'math', '--no-latency',
        '--json', str(out / 'bench.json'), '--plot', str(out / 'plots' / 'bench.png'),
        '--model-kwargs', 'num_classes=10', 'img_size=32', 'patch_size=8', 'embed_dim=48', 'depth=4',
        'num_heads=2', 'reorg_layers=(1,2)'])
    assert result.code == 0, result.err
    plain, keep1, keep05 = json.loads((out / 'bench.json').read_text())['rows']
    assert keep05['tokens'] == [16, 9, 6]            # 16 patches; ceil(0.5 n) kept plus the fused token
    n, d = 17, 48                                     # tokens with the class token, width
    expected = 4 * (12 * d * d * n + 2 * n * n * d) + 16 * (8 * 8 * 3 * d) + d * 10   # a 10-class head
    assert plain['gmacs'] == pytest.approx(expected / 1e9, rel=1e-3) and keep1['gmacs'] == plain['gmacs']
    assert (out / 'plots' / 'bench.png').read_bytes()[:4] == b'\x89PNG'


def test_cli_writes_json_and_plot_together_or_neither(tmp_path, monkeypatch, capsys):
    import matplotlib.figure
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig',
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, 'No space left on device')))
    code, _, err = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--batch-size', '1', '--repeats', '1', '--warmup', '0',
        '--keep-rates', '1,0.5', '--attn', 'math', '--no-latency', '--json', str(tmp_path / 'b.json'),
        '--plot', str(tmp_path / 'b.png'), '--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=48',
        'depth=4', 'num_heads=2', 'reorg_layers=(1,2)'])
    err = err.strip().splitlines()
    assert code == 2 and err[-1].startswith('timm-evit bench: cannot write') and 'No space left' in err[-1]
    assert list(tmp_path.iterdir()) == []            # the JSON is not left without its plot


def test_cli_benchmarks_any_timm_vit_through_apply_beside_itself(tmp_path, capsys):
    # a DeiT III (LayerScale) and a DINOv2 with 4 registers, small, converted with timm_evit.apply
    out = tmp_path / 'bench.json'
    for name, patch, prefix in (('deit3_small_patch16_224', 16, 1), ('vit_small_patch14_reg4_dinov2', 14, 5)):
        result = run_cli(capsys, [
            'bench', '--model', name, '--batch-size', '1', '--repeats', '1',
            '--warmup', '0', '--keep-rates', '1,0.5', '--attn', 'math', '--no-latency', '--json', str(out),
            '--model-kwargs', f'img_size={4 * patch}', 'depth=4', 'embed_dim=48', 'num_heads=2', 'num_classes=10'])
        assert result.code == 0, result.err
        assert result.out.startswith(f"# {name} + EViT at keep rates 1, 0.5 vs timm's {name} (same weights) with ")
        plain, keep1, keep05 = json.loads(out.read_text())['rows']
        assert plain['model'] == name and keep1['model'] == keep05['model'] == f'{name} + EViT'
        # 16 patches; default reorganising blocks 1, 2, 3 of 4: ceil(0.5 n) kept plus the fused token
        assert keep05['tokens'] == [16, 9, 6, 4]
        n, d = 16 + prefix, 48
        expected = 4 * (12 * d * d * n + 2 * n * n * d) + 16 * (patch * patch * 3 * d) + d * 10
        assert plain['gmacs'] == pytest.approx(expected / 1e9, rel=1e-2) and keep1['gmacs'] == plain['gmacs']
        assert keep05['gmacs'] < plain['gmacs']


def test_cli_says_size_aware_fusion_and_counts_its_macs(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    result = run_cli(capsys, [
        'bench', '--model', 'evit_deit_tiny', '--batch-size', '1', '--repeats', '1', '--warmup', '0',
        '--keep-rates', '1,0.5', '--attn', 'fused', '--no-latency', '--json', str(out),
        '--model-kwargs', 'fusion=size'])
    assert result.code == 0, result.err
    assert '| evit_deit_tiny | fused | 0.5 | size | 196, 99, 51, 27 |' in result.out   # same counts as the paper's
    rows = json.loads(out.read_text())['rows']
    assert [r['fusion'] for r in rows] == [None, 'size', 'size']
    # the size bias adds one addition per attention logit: the MACs stay the paper fusion's within 0.5 %
    paper = run_bench('evit_deit_tiny', keep_rates=(0.5,), batch_size=1, repeats=1, warmup=0, attn=('fused',),
                      latency=False)
    assert abs(rows[2]['gmacs'] - paper[1].gmacs) < 0.005 * paper[1].gmacs


TINY = ['--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=48', 'depth=4', 'num_heads=2']


@pytest.mark.parametrize('full', [False, True])
def test_a_bare_bench_says_what_it_measures_before_it_starts(full, tmp_path, capsys, monkeypatch):
    # a bare `timm-evit bench` (the README's first line) is the quick look; --full the whole table
    import timm_evit.tools.bench as bench
    real, printed_before = bench.time_interleaved_samples, []

    def timed(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)   # what the user had read when timing began
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, 'time_interleaved_samples', timed)
    out = tmp_path / 'rows.json'
    result = run_cli(capsys, ['bench', '--repeats', '1', '--warmup', '0', '--batch-size', '2', '--json', str(out)]
                     + ['--full'] * full + TINY)
    assert result.code == 0, result.err[-2000:]
    header = printed_before[0].splitlines()[0]
    rates = '1, 0.9, 0.8, 0.7, 0.6, 0.5' if full else '0.7, 0.5'
    paths = 'math and fused (SDPA) attention' if full else 'fused (SDPA) attention'
    for words in (f'# evit_deit_small at keep rates {rates} vs timm\'s deit_small_patch16_224 (same weights)', paths,
                  'batch 2 and batch 1 (latency)', 'median of 1 interleaved repeats after 0 warm-up', 'timm '):
        assert words in header, (words, header)
    assert ('--full for keep rates 1 to 0.5 on both attention paths' in header) != full
    rows = json.loads(out.read_text())['rows']
    expected_rates = [None, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5] if full else [None, 0.7, 0.5]
    expected_paths = ['math', 'fused'] if full else ['fused']
    assert [(r['attn'], r['keep_rate']) for r in rows] == [(a, k) for a in expected_paths for k in expected_rates]


def test_a_wide_spread_of_the_repeats_is_said_with_a_rerun(tmp_path, capsys, monkeypatch):
    import timm_evit.tools.bench as bench
    real = bench.time_interleaved_samples

    def busy_for_a_moment(forwards, repeats, warmup, *args, **kwargs):
        samples = real(forwards, repeats, warmup, *args, **kwargs)
        for i in (1, 2, 3):     # three repeats of keep 0.5 ran beside something else
            samples[0.5][i] *= 3 + i
        return samples

    monkeypatch.setattr(bench, 'time_interleaved_samples', busy_for_a_moment)
    out = tmp_path / 'rows.json'
    result = run_cli(capsys, ['bench', '--repeats', '5', '--warmup', '0', '--batch-size', '2', '--no-latency',
                              '--keep-rates', '0.5', '--json', str(out)] + TINY)
    assert result.code == 0, result.err[-2000:]
    plain, evit = json.loads(out.read_text())['rows']
    assert evit['spread'] > 0.5   # the middle of five speed-ups spread over more than half their median
    note = [line for line in result.out.splitlines() if 'spread widely' in line]
    assert len(note) == 1 and 'the speed-up at keep_rate 0.5, fused attention, batch 2' in note[0], result.out
    assert 'rerun' in note[0] and json.loads(out.read_text())['note'] == note[0][2:]
    assert '| spread |' in result.out


def test_spread_is_the_middle_half_of_per_repeat_speed_ups_over_their_median():
    from timm_evit.tools.measure import MIN_SPEED_REPEATS, relative_spread, speedups, spread_note
    plain, evit = [1.0, 1.2, 1.0, 1.0, 2.0], [0.5, 0.6, 0.5, 1.0, 1.0]
    assert speedups(plain, evit) == [2.0, 2.0, 2.0, 1.0, 2.0]   # repeat by repeat, not medians against medians
    assert relative_spread(speedups(plain, evit)) == 0.0         # one stray repeat: the middle half holds
    assert relative_spread([2.0, 1.0, 1.0, 2.0, 2.0]) == pytest.approx(0.5)   # several: it spreads
    assert spread_note({'a': 0.05, 'b': 0.02}, MIN_SPEED_REPEATS) is None   # a quiet machine: nothing to say
    assert 'b: their middle half over 30 %' in spread_note({'a': 0.16, 'b': 0.3}, MIN_SPEED_REPEATS)   # the widest
    assert 'too few' in spread_note({'a': 0.0}, MIN_SPEED_REPEATS - 1)        # even when they agree


def test_the_model_name_is_parsed_once_and_the_settings_checked_once(tmp_path, capsys, monkeypatch):
    # issue 29: the model name was parsed in 8 places, --crop-pct and --checkpoint checked twice
    import timm_evit.tools.bench as bench
    import timm_evit.tools.plain as plain
    calls = {}
    count_calls(monkeypatch, calls, parse=(plain, 'parse_model_name'), runtime=(bench, 'check_runtime'))
    result = run_cli(capsys, ['bench', '--repeats', '1', '--warmup', '0', '--batch-size', '1', '--no-latency',
                              '--keep-rates', '0.5'] + TINY)
    assert result.code == 0, result.err[-2000:]
    assert calls == {'parse': 1, 'runtime': 1}
    settings = bench.BenchSettings(keep_rates=(0.5,)).checked()
    assert settings.checked() is settings   # checked once, however often asked
    with pytest.raises(TypeError, match='settings or their values'):
        run_bench('evit_deit_tiny', settings, batch_size=2)
