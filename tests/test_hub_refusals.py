"""weights/hub.py refuses what it cannot publish exactly, and every manifest mistake, in one line.

Publishing is the last line of defence (the manifest has no sha256 for the official files): a
source tensor of another dtype or shape than the model's is refused, never cast or resampled.
A manifest mistake is one line naming the file and the row, exit 2, in the dry run as in the real run.
"""
import csv
import os

import pytest
import torch

from helpers import (
    DEIT_ROW, LVVIT_ROW, load_hub, official_evit_checkpoint, randomised_lvvit, save_official_lvvit, tiny_evit,
)

hub = load_hub()


def manifest_row(name):
    return next(r for r in hub.read_manifest() if r.name == name)


def one_line_refusal(capsys, argv):
    """hub.main(argv)'s exit code 2 and its one stderr line, without the 'weights/hub.py: ' prefix."""
    assert hub.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('weights/hub.py: '), err
    return err[0][len('weights/hub.py: '):]


# --- item 4: only an exact fit is published -------------------------------------------------------

@pytest.fixture(scope='module')
def official_files(tmp_path_factory):
    """An official EViT-DeiT and an official Token Labeling checkpoint, as their training scripts save them."""
    root = tmp_path_factory.mktemp('official')
    official_evit_checkpoint(root / 'deit.pth')
    save_official_lvvit(root / 'lvvit.pth.tar', randomised_lvvit(seed=4))
    return {DEIT_ROW: (torch.load(root / 'deit.pth', weights_only=False), 'model'),
            LVVIT_ROW: (torch.load(root / 'lvvit.pth.tar', weights_only=False), 'state_dict')}


def _all_integer(sd):
    return {k: (100 * v).to(torch.int32) if v.is_floating_point() else v for k, v in sd.items()}


def _replace(key, make):
    def change(sd):
        sd = dict(sd)
        sd[key] = make(sd[key])
        return sd
    return change


GRID_7x7 = _replace('pos_embed', lambda v: v[:, :50].clone())  # cls token + 7 x 7 patches
GRID_7x7_LVVIT = _replace('module.pos_embed', lambda v: v[:, :50].clone())


@pytest.mark.parametrize('row, change, words', [
    (DEIT_ROW, _all_integer,
     ["dtype mismatch for cls_token: the file has int32 [1, 1, 384], the model expects float32 [1, 1, 384]",
      'and 151 more']),
    (DEIT_ROW, GRID_7x7,
     ["size mismatch for pos_embed: the file has float32 [1, 50, 384] (a 7x7 grid), "
      "the model expects float32 [1, 197, 384] (a 14x14 grid)"]),
    (DEIT_ROW, _replace('blocks.3.mlp.fc2.weight', lambda v: v.half()),
     ["dtype mismatch for blocks.3.mlp.fc2.weight: the file has float16 [384, 1536], the model expects float32"]),
    (DEIT_ROW, _replace('head.bias', lambda v: v.double()),
     ["dtype mismatch for head.bias: the file has float64 [1000], the model expects float32 [1000]"]),
    (DEIT_ROW, _replace('patch_embed.proj.weight', lambda v: v.reshape(384, -1)),
     ["size mismatch for patch_embed.proj.weight: the file has float32 [384, 768], "
      "the model expects float32 [384, 3, 16, 16]"]),
    (LVVIT_ROW, _all_integer, ['the file has int32', 'the model expects float32']),
    (LVVIT_ROW, GRID_7x7_LVVIT,
     ["size mismatch for pos_embed: the file has float32 [1, 50, 384] (a 7x7 grid), "
      "the model expects float32 [1, 197, 384] (a 14x14 grid)"]),
    # renamed by the LV-ViT converter: named as in the file, and as in the model
    (LVVIT_ROW, _replace('module.patch_embed.conv1.weight', lambda v: v.bfloat16()),
     ["dtype mismatch for patch_embed.conv1.weight (the model's patch_embed.proj.conv1.weight): the file has bfloat16 "
      "[64, 3, 7, 7], the model expects float32 [64, 3, 7, 7]"]),
    (LVVIT_ROW, _replace('module.patch_embed.bn1.num_batches_tracked', lambda v: v.float()),
     ["dtype mismatch for patch_embed.bn1.num_batches_tracked (the model's patch_embed.proj.bn1.num_batches_tracked): "
      "the file has float32 [], the model expects int64 []"]),
], ids=['deit-integer', 'deit-grid7x7', 'deit-float16', 'deit-float64', 'deit-flat-patch-embed',
        'lvvit-integer', 'lvvit-grid7x7', 'lvvit-renamed-bfloat16', 'lvvit-counter-as-float'])
def test_publishing_refuses_anything_but_an_exact_fit(tmp_path, capsys, official_files, row, change, words):
    sources, out = tmp_path / 'sources', tmp_path / 'out'
    sources.mkdir()
    path = sources / manifest_row(row).source_file
    checkpoint, nesting = official_files[row]
    torch.save({**checkpoint, nesting: change(checkpoint[nesting])}, path)
    err = one_line_refusal(capsys, ['--sources', str(sources), '--out', str(out), '--only', row])
    assert err.startswith(f'{row} from {path}: '), err
    assert 'only an exact fit is published' in err, err
    for w in words:
        assert w in err, err
    assert not out.exists()   # nothing written, and no empty --out left behind


@pytest.mark.parametrize('row, change', [(DEIT_ROW, GRID_7x7), (LVVIT_ROW, GRID_7x7_LVVIT)], ids=['deit', 'lvvit'])
def test_the_check_is_in_convert_which_every_row_goes_through(tmp_path, official_files, row, change):
    checkpoint, nesting = official_files[row]
    torch.save({**checkpoint, nesting: change(checkpoint[nesting])}, tmp_path / 'source.pth')
    refusal = r"size mismatch for pos_embed: .* \(a 7x7 grid\).*only an exact fit is published"
    with pytest.raises(ValueError, match=refusal):
        hub.convert(manifest_row(row), str(tmp_path / 'source.pth'))


def test_a_tensor_the_converter_makes_anew_is_refused():
    # today's filters never get to resample (the file's tensors are compared first): whatever a filter
    # returns must still be the file's own tensors, renamed at most
    model = tiny_evit(img_size=32)
    checkpoint = {'model': {k: v.clone() for k, v in model.state_dict().items()}}
    resampling = lambda sd, m: {**sd, 'pos_embed': sd['pos_embed'] + 0}  # noqa: E731
    with pytest.raises(ValueError, match=r'^the converter changed pos_embed: the file has float32 \[1, 5, 48\] '
                                         r'\(a 2x2 grid\), the model expects float32 \[1, 5, 48\] \(a 2x2 grid\): '
                                         r'only an exact fit is published'):
        hub.exact_state_dict(checkpoint, model, resampling)
    assert hub.exact_state_dict(checkpoint, model, lambda sd, m: sd).keys() == model.state_dict().keys()


def test_dry_run_says_rows_without_sha256_are_not_verified(capsys):
    assert hub.main([]) == 0
    out = capsys.readouterr().out
    rows = hub.read_manifest()
    unverified = [r for r in rows if not r.sha256]
    assert unverified   # every row today
    lines = [line for line in out.splitlines() if 'not verified against the released file' in line]
    assert len(lines) == 1 and f'{len(unverified)} of {len(rows)}' in lines[0], out


# --- item 13: one line and exit 2 for every manifest mistake, in the dry run as in the real run ---

def _manifest_lines():
    with open(hub.MANIFEST, newline='') as f:
        return list(csv.reader(f))


def write_manifest(path, header=None, change=None, rows=None):
    """The real manifest, with ``change(row_dict)`` applied to the DeiT row (or other rows / header)."""
    lines = _manifest_lines()
    header = header or lines[0]
    body = rows if rows is not None else [dict(zip(lines[0], r)) for r in lines[1:]]
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in body:
            if isinstance(r, dict):
                if change and f"{r['architecture']}.{r['tag']}" == DEIT_ROW:
                    r = change(dict(r))
                r = [r.get(c, '') for c in header]
            w.writerow(r)
    return path


def _deit_line():
    """The manifest line (1-based, header line 1) of DEIT_ROW."""
    return 1 + next(i for i, r in enumerate(_manifest_lines()) if r and f'{r[0]}.{r[1]}' == DEIT_ROW)


def _set(**values):
    return lambda r: {**r, **values}


BAD_VALUES = [
    (_set(fuse_token='true'), "fuse_token must be True or False (or empty), got 'true'"),
    (_set(published_as='{nmespace}/evit_deit_small.keep60_drop_in1k'),
     "published_as may hold only the placeholder {namespace}, got {nmespace}"),
    (_set(published_as='{namespace/x'), 'published_as'),
    (_set(published_as='{namespace}/a b'), 'published_as'),
    (_set(architecture='evit_deit_smal'), "architecture 'evit_deit_smal' is not a timm model"),
    (_set(architecture='vit_small_patch16_224', tag='augreg_in21k_ft_in1k'),
     "architecture 'vit_small_patch16_224' is not one hub.py converts"),
    (_set(tag='nosuchtag'), "tag 'nosuchtag' is not a pretrained tag of evit_deit_small registered with timm"),
    (_set(keep_rate='5'), 'keep_rate must be in (0, 1], got 5.0'),
    (_set(keep_rate='0'), 'keep_rate must be in (0, 1], got 0.0'),
    (_set(keep_rate='nan'), 'keep_rate must be in (0, 1]'),
    (_set(keep_rate='sixty'), "keep_rate must be a number in (0, 1] (or empty), got 'sixty'"),
    (_set(top1='179.1'), "top1 must be a percentage in [0, 100] (or empty), got '179.1'"),
    (_set(top5='x'), "top5 must be a percentage in [0, 100] (or empty), got 'x'"),
    (_set(gmacs='-3'), "gmacs must be a positive number (or empty), got '-3'"),
    (_set(gmacs='inf'), "gmacs must be a positive number (or empty), got 'inf'"),
    (_set(sha256='abc'), "sha256 must be empty or 64 hexadecimal digits, got 'abc'"),
    (_set(weights_license=''), 'weights_license must be a license identifier'),
    (_set(source_file='../x.pth'), "source_file must be a file name, got '../x.pth'"),
    (_set(source_url=''), 'source_url must be an https:// address'),
    (_set(figures_from=''), 'figures_from must say where top1 / top5 / gmacs come from'),
    (_set(keep_rate=' 0.6'), "keep_rate has spaces around it: ' 0.6'"),
    # issue 30, item 4: the tag (keep60_drop_in1k) and the columns must say the same
    (_set(keep_rate='0.5'), 'the tag keep60_drop_in1k says keep_rate 0.6, but the keep_rate column says 0.5'),
    (_set(fuse_token='True'), 'the tag keep60_drop_in1k says fuse_token False, but the fuse_token column says True'),
    (_set(keep_rate='', fuse_token=''), 'the tag keep60_drop_in1k says keep_rate 0.6, but the keep_rate column is empty'),
    # ... and it is published where its tag says
    (_set(published_as='{namespace}/evit_deit_small.keep60_drop'),
     "published_as '{namespace}/evit_deit_small.keep60_drop' must be '{namespace}/evit_deit_small.keep60_drop_in1k'"),
    (_set(published_as='timm-evit/evit_deit_small.keep60_drop_in1k'),
     "published_as 'timm-evit/evit_deit_small.keep60_drop_in1k' must be "
     "'{namespace}/evit_deit_small.keep60_drop_in1k'"),
]


@pytest.mark.parametrize('change, words', BAD_VALUES, ids=[w[:40] for _, w in BAD_VALUES])
@pytest.mark.parametrize('run', ['dry run', 'real run'])
def test_a_bad_manifest_value_is_one_line_naming_its_row(tmp_path, capsys, monkeypatch, change, words, run):
    manifest = write_manifest(tmp_path / 'm.csv', change=change)
    monkeypatch.setattr(hub, 'convert', lambda *a: pytest.fail('converted a row the dry run would refuse'))
    argv = ['--manifest', str(manifest)]
    if run == 'real run':
        (tmp_path / 'sources').mkdir()
        argv += ['--sources', str(tmp_path / 'sources'), '--out', str(tmp_path / 'out')]
    err = one_line_refusal(capsys, argv)
    assert err.startswith(f'{manifest} line {_deit_line()}'), err
    assert words in err, err
    assert not (tmp_path / 'out').exists()


def test_the_manifest_as_shipped_is_valid_and_parsed_once():
    rows = hub.read_manifest()
    row = manifest_row(DEIT_ROW)
    assert row.keep_rate == 0.6 and row.fuse_token is False and row.model_args == dict(keep_rate=0.6, fuse_token=False)
    lvvit = manifest_row(LVVIT_ROW)
    assert lvvit.keep_rate is None and lvvit.fuse_token is None and lvvit.model_args == {}
    assert len(rows) == 12


def test_a_row_that_differs_only_in_case_of_sha256_is_compared_in_lower_case(tmp_path):
    manifest = write_manifest(tmp_path / 'm.csv', change=_set(sha256='AB' * 32))
    assert next(r for r in hub.read_manifest(str(manifest)) if r.name == DEIT_ROW).sha256 == 'ab' * 32


@pytest.mark.parametrize('make, words', [
    (lambda p: p, "manifest {path!r} cannot be read: [Errno 2] No such file or directory"),
    (lambda p: p.mkdir() or p, "manifest {path!r} cannot be read"),
    (lambda p: p.write_bytes(b'\xff\xfe\x00bad') or p, "manifest {path!r} cannot be read"),
    (lambda p: p.write_text('') or p, "{path}: no header line (the columns architecture, tag, "),
    (lambda p: write_manifest(p, header=[c for c in _manifest_lines()[0] if c != 'gmacs']),
     "{path}: the header lacks the columns ['gmacs']"),
    (lambda p: write_manifest(p, header=_manifest_lines()[0] + ['comment']), "{path}: unknown columns ['comment']"),
    (lambda p: write_manifest(p, rows=[]), '{path}: no rows'),
    (lambda p: write_manifest(p, rows=[['evit_deit_small', 'keep60_drop_in1k', 'x.pth']]),
     '{path} line 2: 3 values, but the header has 13 columns'),
    (lambda p: write_manifest(p, rows=[_manifest_lines()[1] + ['extra']]),
     '{path} line 2: 14 values, but the header has 13 columns'),
    (lambda p: write_manifest(p, rows=[_manifest_lines()[1], _manifest_lines()[2], _manifest_lines()[1]]),
     '{path} line 4 (evit_deit_small.keep90_fuse_in1k): the same row as line 2'),
], ids=['missing', 'a-folder', 'not-utf8', 'empty', 'missing-column', 'unknown-column', 'no-rows', 'short-row',
        'long-row', 'duplicate'])
def test_a_bad_manifest_is_one_line(tmp_path, capsys, make, words):
    path = make(tmp_path / 'm.csv')
    err = one_line_refusal(capsys, ['--manifest', str(path)])
    assert words.format(path=str(path)) in err, err


def test_a_failed_conversion_leaves_no_out_folder(tmp_path, capsys):
    sources = tmp_path / 'sources'
    sources.mkdir()
    (sources / manifest_row(DEIT_ROW).source_file).write_bytes(b'not a checkpoint')
    out = tmp_path / 'new' / 'deeper' / 'out'
    err = one_line_refusal(capsys, ['--sources', str(sources), '--out', str(out), '--only', DEIT_ROW])
    assert 'cannot be read safely' in err
    assert os.listdir(tmp_path) == ['sources']   # neither out nor the parents this run created
    existing = tmp_path / 'existing'
    existing.mkdir()
    one_line_refusal(capsys, ['--sources', str(sources), '--out', str(existing), '--only', DEIT_ROW])
    assert existing.is_dir() and os.listdir(existing) == []   # a folder that was there stays


# --- issue 30, item 4: rows that contradict themselves or each other ---------------------------------

def _line(shipped_tag, **values):
    """The shipped manifest line of evit_deit_small.<shipped_tag>, with ``values`` over it."""
    header, *lines = _manifest_lines()
    row = next(dict(zip(header, r)) for r in lines if r[:2] == ['evit_deit_small', shipped_tag])
    return [{**row, **values}.get(c, '') for c in header]


def test_a_row_whose_columns_contradict_its_tag_is_refused(tmp_path, capsys):
    path = write_manifest(tmp_path / 'm.csv', rows=[_line('keep90_fuse_in1k', keep_rate='0.5', fuse_token='False')])
    err = one_line_refusal(capsys, ['--manifest', str(path)])
    assert err == (f'{path} line 2 (evit_deit_small.keep90_fuse_in1k): the tag keep90_fuse_in1k says keep_rate 0.9, '
                   f'but the keep_rate column says 0.5; it says fuse_token True, but the fuse_token column says False'), err


def test_two_rows_published_as_one_repository_are_refused(tmp_path, capsys):
    first = _line('keep90_fuse_in1k')
    path = write_manifest(tmp_path / 'm.csv', rows=[first, _line('keep80_fuse_in1k', published_as=first[4])])
    err = one_line_refusal(capsys, ['--manifest', str(path)])
    assert err == (f"{path} line 3 (evit_deit_small.keep80_fuse_in1k): published_as "
                   f"'{{namespace}}/evit_deit_small.keep90_fuse_in1k' is line 2's too (evit_deit_small.keep90_fuse_in1k)")


def test_tags_that_name_no_keep_rate_take_any_columns(tmp_path, capsys):
    # fb_in1k (DeiT's weights used with EViT) and tl_in1k (Token Labeling's) say nothing of a keep rate
    header, *lines = _manifest_lines()
    lvvit = next(r for r in lines if r[0] == 'evit_lvvit_s')
    fb = _line('keep70_fuse_in1k', tag='fb_in1k', published_as='{namespace}/evit_deit_small.fb_in1k', keep_rate='0.5')
    path = write_manifest(tmp_path / 'm.csv', rows=[lvvit, fb])
    assert hub.main(['--manifest', str(path)]) == 0, capsys.readouterr().err
    assert [r.model_args for r in hub.read_manifest(str(path))] == [{}, dict(keep_rate=0.5, fuse_token=True)]


def test_the_tag_grammar_reads_what_the_release_tags_set():
    from timm_evit import EVIT_DEIT_SMALL_TAGS
    for tag, args in EVIT_DEIT_SMALL_TAGS.items():
        assert hub.args_named_by_tag(tag) == args, tag
    for tag in ('fb_in1k', 'tl_in1k', 'keeper_in1k', 'in1k_keep70'):
        assert hub.args_named_by_tag(tag) == {}, tag
    assert hub.args_named_by_tag('keep75_in1k') == dict(keep_rate=0.75)
