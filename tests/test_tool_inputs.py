"""What the tools check before the long work: the input size against the patch size, the batch's
memory, the model name and its pretrained tag, EViT's arguments before any weights, the keep-rate
option, pretrained weights that cannot be had without a network: one line and exit code 2 each."""
import json
import socket
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image

from helpers import (
    TINY_DEIT, TINY_DEIT_CLI, assert_one_line_error, lay_out_hf_cache, run_cli, safetensors_file,
    without_hf_environment,
)
from timm_evit.tools import bench as bench_module
from timm_evit.tools.bench import run_bench
from timm_evit.tools.models import create_evit_model
from timm_evit.tools.plain import parse_model_name


# (ModelSpec.plain_name, ModelSpec.plain_kwargs): what the tools measure a name against
def plain_model_name(name):
    spec = parse_model_name(name)
    return spec.plain_name, spec.plain_kwargs


# TINY_DEIT: a DeiT-Ti at 4 blocks and width 48, patch 16 as the paper's


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp('tool_inputs')
    (root / 'data' / 'validation' / 'cat').mkdir(parents=True)
    Image.new('RGB', (40, 40), 'red').save(root / 'data' / 'validation' / 'cat' / '0.png')
    Image.new('RGB', (40, 40), 'blue').save(root / 'cat.png')
    return root


BENCH = ['bench', '--model', 'evit_deit_tiny', '--batch-size', '1', '--repeats', '1', '--warmup', '0',
         '--keep-rates', '1,0.5', '--attn', 'math', '--no-latency']
SWEEP = ['sweep', '--model', 'evit_deit_tiny', '--data-dir', '{root}/data', '--keep-rates', '1,0.5', '--repeats', '1',
         '--batch-size', '1', '--out', '{root}/sweep_out/s']
VISUALIZE = ['visualize', '{root}/cat.png', '--model', 'evit_deit_tiny', '--out', '{root}/pics']
EXPORT = ['export', '--model', 'evit_deit_tiny', '--format', 'export', '--out', '{root}/m.pt2']


def command(argv, root, model_kwargs=(), **options):
    argv = [a.format(root=root) for a in argv]
    for option, value in options.items():
        option = '--' + option.replace('_', '-')
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return argv + (['--model-kwargs', *model_kwargs] if model_kwargs else [])


# item 3: an input size that is not a whole number of patches (patch 16 here) would mislead every tool
NOT_WHOLE_PATCHES = {
    'export --img-size 40': (command(EXPORT, '{root}', TINY_DEIT_CLI, img_size='40'), ['--img-size 40', '32 or 48']),
    'visualize --img-size 56': (command(VISUALIZE, '{root}', img_size='56'), ['--img-size 56', '48 or 64']),
    'bench img_size=40': (command(BENCH, '{root}', TINY_DEIT_CLI + ['img_size=40']), ['--model-kwargs img_size=40']),
    'sweep img_size=40': (command(SWEEP, '{root}', TINY_DEIT_CLI + ['img_size=40']), ['--model-kwargs img_size=40']),
    'export img_size=(32, 40)': (command(EXPORT, '{root}', TINY_DEIT_CLI + ['img_size=(32,40)']),
                                 ['img_size=(32, 40)', '32 or 48']),
    'export patch_size=12 at 224': (command(EXPORT, '{root}', TINY_DEIT_CLI + ['patch_size=12']),
                                    ["default input size 224", 'patch size 12', '216 or 228']),
}
def test_timms_own_size_that_ignores_a_strip_is_served_except_where_patches_are_drawn(root, capsys):
    # SigLIP so400m/14 at its own 384 px: 27 x 27 patches, the last 6 pixels unseen by design (small here)
    small = ['--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2']
    argv = ['bench', '--model', 'evit_vit_so400m_patch14_siglip_384', '--batch-size', '1', '--repeats', '1',
            '--warmup', '0', '--keep-rates', '0.5', '--attn', 'math', '--no-latency', *small]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    assert '| 729 |' in out and '729, 366' in out          # 27 x 27 patches; ceil(0.5 * 729) = 365, and the fused one
    code, _, err = run_cli(capsys, ['visualize', f'{root}/cat.png', '--model', 'evit_vit_so400m_patch14_siglip_384',
                                    '--out', f'{root}/pics', *small])
    assert_one_line_error(code, err, 'visualize', "the model's default input size 384", 'patch size 14', '378 or 392')


# item 11: below one patch, every tool gave a traceback or the exporter's log
BELOW_ONE_PATCH = {
    'bench img_size=8': command(BENCH, '{root}', TINY_DEIT_CLI + ['img_size=8']),
    'sweep img_size=8': command(SWEEP, '{root}', TINY_DEIT_CLI + ['img_size=8']),
    'visualize --img-size 8': command(VISUALIZE, '{root}', img_size='8'),
    'export --img-size 8': command(EXPORT, '{root}', TINY_DEIT_CLI, img_size='8'),
}


@pytest.mark.parametrize('case', sorted(NOT_WHOLE_PATCHES))
def test_an_input_size_that_is_not_whole_patches_is_refused(case, root, capsys):
    argv, words = NOT_WHOLE_PATCHES[case]
    code, _, err = run_cli(capsys, [a.format(root=root) for a in argv])
    assert_one_line_error(code, err, argv[0], 'not a multiple of the patch size', 'ignores the last', *words)
    if argv[0] != 'visualize':   # visualize draws whole patches: it takes no model that pads
        assert 'dynamic_img_pad=True' in err


@pytest.mark.parametrize('case', sorted(BELOW_ONE_PATCH))
def test_an_input_smaller_than_one_patch_is_one_line(case, root, capsys):
    argv = BELOW_ONE_PATCH[case]
    code, _, err = run_cli(capsys, [a.format(root=root) for a in argv])
    assert_one_line_error(code, err, argv[0], 'smaller than the patch size 16', 'use 16')
    assert not (root / 'm.pt2').exists()


def test_a_model_that_pads_is_measured_at_its_padded_grid():
    # 40 px padded to 48: a 3 x 3 grid, the last patches half padding; timm's PatchEmbed says 2 x 2
    kwargs = dict(TINY_DEIT, img_size=40, dynamic_img_size=True, dynamic_img_pad=True)
    rows = run_bench('evit_deit_tiny', keep_rates=(1.0, 0.5), batch_size=1, repeats=1, warmup=0, attn=('math',),
                     latency=False, show_progress=False, model_kwargs=kwargs)
    assert rows[0].tokens == [9] and rows[1].tokens == [9, 9, 9] and rows[2].tokens == [9, 6, 4]
    model = create_evit_model('evit_deit_tiny', **kwargs).eval()
    x = torch.randn(1, 3, 40, 40)
    edge = x.clone()
    edge[..., 32:] = 0
    with torch.no_grad():
        assert not torch.allclose(model(x), model(edge))   # the last 8 pixels count


def test_a_drawing_of_whole_patches_refuses_a_padded_grid():
    # visualize's masks are whole patches over the image: a padded last patch would be drawn misaligned
    with pytest.raises(ValueError, match=r'--model-kwargs img_size=40 is not a multiple .* draws whole patches'
                                         r' over the image: use 32 or 48$'):
        create_evit_model('evit_deit_tiny', whole_patches=True, **TINY_DEIT, img_size=40, dynamic_img_size=True,
                          dynamic_img_pad=True)


# item 11: a batch that cannot fit is refused before it is allocated; running out of memory later is one line
def test_a_batch_larger_than_memory_is_refused_before_allocating(root, capsys):
    code, _, err = run_cli(capsys, command(BENCH, root, TINY_DEIT_CLI, batch_size='1000000000'))
    assert_one_line_error(code, err, 'bench', '--batch-size 1000000000', 'GiB', 'more than')


def test_running_out_of_memory_names_the_batch_size(root, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    monkeypatch.setattr(bench_module, 'time_interleaved_samples', out_of_memory)
    code, _, err = run_cli(capsys, command(BENCH, root, TINY_DEIT_CLI, batch_size='2'))
    last = err.strip().splitlines()[-1]   # after the progress bar of the run it stopped
    assert code == 2 and 'Traceback' not in err, err[-3000:]
    assert last.startswith('timm-evit bench: --batch-size 2 does not fit in the memory of cpu'), last


# item 11: a pretrained tag timm does not have, in every tool
@pytest.mark.parametrize('argv', [BENCH, SWEEP, VISUALIZE, EXPORT], ids=lambda argv: argv[0])
@pytest.mark.parametrize('name,tags', [('deit3_small_patch16_224.nosuchtag', 'fb_in1k, fb_in22k_ft_in1k'),
                                       ('evit_deit_small.nosuchtag', 'keep70_fuse_in1k')])
def test_an_unknown_pretrained_tag_is_one_line(argv, name, tags, root, capsys):
    code, _, err = run_cli(capsys, command(argv, root, model=name))
    assert_one_line_error(code, err, argv[0], f'--model {name}', "no pretrained tag 'nosuchtag'", tags)


# item 11: EViT's arguments are checked before any weights are read (or downloaded)
@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'evit_deit_tiny_patch16_224', 'evit_deit_tiny'])
def test_evit_arguments_are_checked_before_the_weights(name, root, capsys, offline_hub):
    code, _, err = run_cli(capsys, command(EXPORT, root, ['keep_rate=5'], model=name) + ['--pretrained'])
    assert_one_line_error(code, err, 'export', 'keep_rate', '(0, 1]')
    assert '--pretrained' not in err
    code, _, err = run_cli(capsys, command(BENCH, root, ['reorg_layers=(3,12)'], model=name) + ['--pretrained'])
    assert_one_line_error(code, err, 'bench', 'reorg_layers entry 12 is out of range')


# item 11: --keep-rate names itself
@pytest.mark.parametrize('argv', [VISUALIZE, EXPORT], ids=lambda argv: argv[0])
@pytest.mark.parametrize('value', ['0', '1.5', 'nan', '0.5,0.7', 'x'])
def test_keep_rate_errors_name_keep_rate(argv, value, root, capsys):
    code, _, err = run_cli(capsys, command(argv, root, keep_rate=value))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--keep-rate takes one float in (0, 1], got '{value}'" in err and '--keep-rates' not in err, err


# item 11: --pretrained where no network answers (HF_ENDPOINT at a closed port, HF_HUB_OFFLINE unset):
# huggingface_hub's retries took about a minute; the weights not cached fail at once, cached ones load.
# A fresh interpreter: huggingface_hub reads HF_ENDPOINT when imported, and the timeout bounds 'at once'.
RUN_WITHOUT_NETWORK = """
import contextlib, io, json, sys, torch
from timm_evit.tools.models import create_evit_model
from timm_evit.tools.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(json.loads(sys.argv[1]))
model = create_evit_model('evit_deit_tiny', pretrained=True)     # cached: loads without the Hub
print(json.dumps([code, err.getvalue(), float(model.cls_token.sum())]))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_pretrained_without_network_fails_at_once_or_loads_from_the_cache(root, tmp_path):
    torch.manual_seed(2)
    weights = timm.create_model('deit_tiny_patch16_224').state_dict()
    cache = tmp_path / 'hub'
    lay_out_hf_cache(cache, 'timm/deit_tiny_patch16_224.fb_in1k', {'model.safetensors': safetensors_file(weights)})
    env = without_hf_environment(HF_ENDPOINT=f'http://127.0.0.1:{closed_port()}', HF_HUB_CACHE=str(cache),
                                 HF_HOME=str(tmp_path / 'hf_home'))
    argv = command(EXPORT, root, model='evit_deit_small') + ['--pretrained']   # DeiT-S: not in the cache
    # huggingface_hub retries each of two files for 23 s: well within, the first attempt failed
    result = subprocess.run([sys.executable, '-c', RUN_WITHOUT_NETWORK, json.dumps(argv)],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    code, err, cls_sum = json.loads(result.stdout.strip().splitlines()[-1])
    assert_one_line_error(code, err, 'export', '--pretrained', 'evit_deit_small', 'not in the local cache',
                          'cannot be reached', 'hf download timm/deit_small_patch16_224.fb_in1k')
    assert cls_sum == pytest.approx(float(weights['cls_token'].sum()))


# item 12: every name timm.create_model takes for an EViT model, tagged or not
def test_every_registered_evit_name_and_tag_has_a_plain_counterpart():
    names = timm.list_pretrained('evit_*') + timm.list_models('evit_*')
    for name in names:
        plain, kwargs = plain_model_name(name)
        assert timm.is_model(plain.partition('.')[0]), name
        timm.models.get_pretrained_cfg(plain)   # a tag timm has (or none)
    assert len(names) > 400
    assert plain_model_name('evit_deit_small.keep70_fuse_in1k') == ('deit_small_patch16_224', {})  # weights: EViT's
    assert plain_model_name('evit_deit_tiny.fb_in1k') == ('deit_tiny_patch16_224.fb_in1k', {})
    assert plain_model_name('evit_lvvit_s.tl_in1k') == ('evit_lvvit_s.tl_in1k', {'keep_rate': 1.0})


@pytest.mark.parametrize('name,plain', [('evit_deit_small.keep70_drop_in1k', 'deit_small_patch16_224'),
                                        ('evit_deit_tiny.fb_in1k', 'deit_tiny_patch16_224.fb_in1k')])
def test_bench_takes_the_papers_tagged_names(name, plain):
    rows = run_bench(name, keep_rates=(1.0, 0.5), batch_size=1, repeats=1, warmup=0, attn=('math',), latency=False,
                     show_progress=False, model_kwargs=dict(TINY_DEIT, img_size=32))
    assert [r.model for r in rows] == [plain, name, name]
    assert rows[1].fuse_token is (name.endswith('fuse_in1k') or 'keep' not in name)  # the tag's own setting
    assert rows[1].gmacs == pytest.approx(rows[0].gmacs, rel=1e-6)   # keep 1.0: the same weights, the plain model


def test_visualize_takes_the_papers_tagged_names(root, capsys):
    code, _, err = run_cli(capsys, command(VISUALIZE, root, model='evit_deit_small.keep60_fuse_in1k', img_size='32'))
    assert code == 0, err
    assert (root / 'pics' / 'cat_evit.png').is_file()
