"""Convert the official checkpoints of weights/manifest.csv into Hugging Face Hub folders, and publish them.

    python weights/hub.py                                   # dry run: the plan for every manifest row
    python weights/hub.py --sources DL --out hub/           # convert what is in DL/, print what would be uploaded
    python weights/hub.py --sources DL --out hub/ --push    # ... and upload (token: HF_TOKEN)

Every manifest row is checked first, the same way in the dry run and the real run (``parse_row``,
``read_manifest``): its values, its tag against its keep_rate / fuse_token columns, its published_as
against its architecture.tag and the other rows'.
For each row: read the official file (never running code from it), convert it to our state dict -
only if every tensor is exactly the model's dtype and shape: nothing is cast or resampled -, load it
strictly into the timm model, run a forward pass, and write a folder in timm's Hub format
(model.safetensors, config.json with model_args, README.md model card) - to a temporary folder
first, renamed into place only when everything succeeded.
"""
import argparse
import csv
import hashlib
import math
import os
import re
import shutil
import string
import sys
import tempfile
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import timm
import torch
from timm.models import is_model_in_modules, save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from timm_evit.tools.files import (
    check_writable, create_folders, file_mode, folder_mode, quiet_broken_pipe, remove_folders,
)
from timm_evit.checkpoints import load_state_dict_checked, read_checkpoint, require_matching_keys, unwrap_state_dict
from timm_evit.checkpoints import require_finite
from timm_evit.release import HUB_NAMESPACE
from timm_evit.evit_lvvit import checkpoint_filter_fn as lvvit_checkpoint_filter_fn
from timm_evit.options import EVIT_ARGS, check_keep_rate

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'manifest.csv')

# The official layouts converted, by the timm_evit module registering the architecture: EViT's
# DeiT files are in timm's own ViT layout, Token Labeling's need their stem keys renamed.
CHECKPOINT_FILTERS: Dict[str, Callable] = {'evit_deit': vit_checkpoint_filter_fn,
                                           'evit_lvvit': lvvit_checkpoint_filter_fn}


@dataclass(frozen=True)
class Row:
    """One manifest row, checked (see ``parse_row``)."""
    architecture: str
    tag: str
    source_file: str
    source_url: str
    published_as: str
    sha256: str                  # empty, or 64 lower-case hexadecimal digits
    keep_rate: Optional[float]   # None: not EViT-trained (the architecture's default)
    fuse_token: Optional[bool]
    top1: str                    # the reported figures as the manifest writes them (checked numbers)
    top5: str
    gmacs: str
    figures_from: str
    weights_license: str

    @property
    def name(self) -> str:
        return f'{self.architecture}.{self.tag}'

    @property
    def repo_id(self) -> str:
        return self.published_as.format(namespace=HUB_NAMESPACE)

    @property
    def model_args(self) -> Dict[str, object]:
        """keep_rate / fuse_token the checkpoint was trained with (none: not EViT-trained)."""
        # the manifest's columns that are EViT arguments (timm_evit.options.EVIT_ARGS), where given
        return {name: getattr(self, name) for name in EVIT_ARGS if getattr(self, name, None) is not None}

    @property
    def checkpoint_filter(self) -> Callable:
        return next(f for module, f in CHECKPOINT_FILTERS.items() if is_model_in_modules(self.architecture, [module]))


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))   # the manifest's columns, in its order


def _number(value: str, column: str, allowed: str, fits: Callable[[float], bool]) -> str:
    """``value`` unchanged if empty or a finite number that ``fits``; else a ValueError saying ``allowed``."""
    if value:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and fits(number)):
            raise ValueError(f'{column} must be {allowed} (or empty), got {value!r}')
    return value


def _architecture(value: str) -> str:
    if '.' in value or not timm.is_model(value):
        raise ValueError(f'architecture {value!r} is not a timm model (with timm_evit imported)')
    if not is_model_in_modules(value, list(CHECKPOINT_FILTERS)):
        raise ValueError(f'architecture {value!r} is not one hub.py converts: only the official layouts of '
                         f'the models of timm_evit\'s {" and ".join(CHECKPOINT_FILTERS)}')
    return value


def _tag(architecture: str, value: str) -> str:
    known = [n.split('.', 1)[1] for n in timm.list_pretrained(architecture) if n.split('.', 1)[0] == architecture]
    if value not in known:
        raise ValueError(f'tag {value!r} is not a pretrained tag of {architecture} registered with timm '
                         f'(its tags: {", ".join(known) or "none"})')
    return value


def _published_as(value: str) -> str:
    try:
        placeholders = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                        if name is not None]
    except ValueError as e:  # a lone brace
        raise ValueError(f'published_as {value!r} is not a repository id with {{namespace}}: {e}') from e
    unknown = [f'{{{name}}}' for name, spec, conversion in placeholders
               if (name, spec, conversion) != ('namespace', '', None)]
    if unknown:
        raise ValueError(f'published_as may hold only the placeholder {{namespace}}, '
                         f'got {", ".join(unknown)} in {value!r}')
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    repo_id = value.format(namespace=HUB_NAMESPACE)
    try:
        validate_repo_id(repo_id)
        if repo_id.count('/') != 1:
            raise HFValidationError('a repository id is namespace/name')
    except HFValidationError as e:
        raise ValueError(f'published_as {value!r} gives {repo_id!r}, not a Hub repository id: {e}') from e
    return value


def _keep_rate(value: str) -> Optional[float]:
    if not value:
        return None
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f'keep_rate must be a number in (0, 1] (or empty), got {value!r}') from None
    return check_keep_rate(rate, 1)[0]   # the package's own check: what timm.create_model would accept


def _fuse_token(value: str) -> Optional[bool]:
    choices = {'': None, 'True': True, 'False': False}
    if value not in choices:
        raise ValueError(f'fuse_token must be True or False (or empty), got {value!r}')
    return choices[value]


# A tag that names the training's keep rate, in percent, and maybe its fusion: keep<NN>[_fuse|_drop]_...
# (the release tags, evit_deit.EVIT_DEIT_SMALL_TAGS: keep70_fuse_in1k). Other tags (fb_in1k,
# tl_in1k) name neither, and a row with one may give any keep_rate / fuse_token.
KEEP_TAG = re.compile(r'keep(?P<percent>[0-9]+)(?:_(?P<fusion>fuse|drop))?(?:_|$)')


def args_named_by_tag(tag: str) -> Dict[str, object]:
    """The keep_rate / fuse_token that ``tag`` names (none for a tag that names neither)."""
    match = KEEP_TAG.match(tag)
    if not match:
        return {}
    named: Dict[str, object] = {'keep_rate': int(match['percent']) / 100}
    if match['fusion']:
        named['fuse_token'] = match['fusion'] == 'fuse'
    return named


def _column_text(value: object) -> str:
    return 'is empty' if value is None else f'says {value}'


def tag_contradiction(tag: str, keep_rate: Optional[float], fuse_token: Optional[bool]) -> Optional[str]:
    """What the columns say against what ``tag`` names, or None: the tag is what users load
    (timm.create_model('<architecture>.<tag>') sets the tag's arguments), the columns what
    config.json and the model card say, so a row whose two disagree is not published."""
    columns = {'keep_rate': keep_rate, 'fuse_token': fuse_token}
    differs = [f'says {name} {named}, but the {name} column {_column_text(columns[name])}'
               for name, named in args_named_by_tag(tag).items()
               if columns[name] is None or not math.isclose(columns[name], named)]
    return ('the tag ' + tag + ' ' + '; it '.join(differs)) if differs else None


def published_as_mismatch(row: Row) -> Optional[str]:
    """Why ``row.published_as`` is not the repository of its architecture.tag, or None: the tag's
    Hub id (evit_deit._evit_release_cfg) is '<namespace>/<architecture>.<tag>', in the namespace of
    the day (TIMM_EVIT_HUB_NAMESPACE), so the placeholder, not a namespace written out."""
    expected = '{namespace}/' + row.name
    if row.published_as != expected:
        return f'published_as {row.published_as!r} must be {expected!r} (the Hub repository of the row\'s architecture.tag)'
    return None


def parse_row(values: Dict[str, str]) -> Row:
    """The manifest row ``values`` (column -> text), checked as the real run needs it: a timm
    architecture and tag hub.py converts, values in range; a ValueError saying what is wrong."""
    for column, value in values.items():
        if value != value.strip():
            raise ValueError(f'{column} has spaces around it: {value!r}')
    architecture = _architecture(values['architecture'])
    source_file = values['source_file']
    if not source_file or os.path.basename(source_file) != source_file or source_file in ('.', '..'):
        raise ValueError(f'source_file must be a file name, got {source_file!r} (files are found in --sources)')
    if not values['source_url'].startswith('https://'):
        raise ValueError(f'source_url must be an https:// address, got {values["source_url"]!r}')
    sha256 = values['sha256'].lower()
    if sha256 and not re.fullmatch('[0-9a-f]{64}', sha256):
        raise ValueError(f'sha256 must be empty or 64 hexadecimal digits, got {values["sha256"]!r}')
    figures = {c: values[c] for c in ('top1', 'top5', 'gmacs')}
    for column in ('top1', 'top5'):
        _number(figures[column], column, 'a percentage in [0, 100]', lambda x: 0 <= x <= 100)
    _number(figures['gmacs'], 'gmacs', 'a positive number', lambda x: x > 0)
    if any(figures.values()) and not values['figures_from']:
        raise ValueError('figures_from must say where top1 / top5 / gmacs come from')
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9.+-]*', values['weights_license']):
        raise ValueError(f'weights_license must be a license identifier (as apache-2.0), got '
                         f'{values["weights_license"]!r}')
    row = Row(architecture=architecture, tag=_tag(architecture, values['tag']), source_file=source_file,
              source_url=values['source_url'], published_as=_published_as(values['published_as']),
              sha256=sha256, keep_rate=_keep_rate(values['keep_rate']), fuse_token=_fuse_token(values['fuse_token']),
              figures_from=values['figures_from'], weights_license=values['weights_license'], **figures)
    contradiction = tag_contradiction(row.tag, row.keep_rate, row.fuse_token)
    if contradiction:
        raise ValueError(contradiction)
    return row


def read_manifest(path: str = MANIFEST) -> List[Row]:
    """Every row of the manifest ``path``, checked (``parse_row``); a ValueError naming the file
    and the line of the first mistake."""
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:   # a BOM, as spreadsheets write, is no column name
            reader = csv.reader(f)
            lines = [(reader.line_num, cells) for cells in reader if cells]   # blank lines skipped, as DictReader does
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'manifest {path!r} cannot be read: {e}') from e
    if not lines:
        raise ValueError(f'{path}: no header line (the columns {", ".join(COLUMNS)})')
    header = lines[0][1]
    missing, unknown = [c for c in COLUMNS if c not in header], [c for c in header if c not in COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        raise ValueError(f'{path}: ' + (f'the header lacks the columns {missing}' if missing else
                                        f'unknown columns {unknown}' if unknown else f'repeated columns in {header}')
                         + f' (the columns are {", ".join(COLUMNS)})')
    if len(lines) == 1:
        raise ValueError(f'{path}: no rows')
    rows, seen, published = [], {}, {}
    for n, cells in lines[1:]:
        where = f'{path} line {n}'
        if len(cells) != len(header):
            raise ValueError(f'{where}: {len(cells)} values, but the header has {len(header)} columns')
        values = dict(zip(header, cells))
        if values['architecture'] and values['tag']:
            where += f' ({values["architecture"]}.{values["tag"]})'
        try:
            row = parse_row(values)
        except (ValueError, TypeError) as e:
            raise ValueError(f'{where}: {e}') from e
        if row.name in seen:
            raise ValueError(f'{where}: the same row as line {seen[row.name]}')
        # a collision breaks the name rule below too; checked first so that the line says which rows collide
        if row.repo_id in published:
            line, other = published[row.repo_id]
            raise ValueError(f'{where}: published_as {row.published_as!r} is line {line}\'s too ({other})')
        mismatch = published_as_mismatch(row)
        if mismatch:
            raise ValueError(f'{where}: {mismatch}')
        seen[row.name] = n
        published[row.repo_id] = (n, row.name)
        rows.append(row)
    return rows


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _tensor_text(key: str, tensor: object, model: torch.nn.Module) -> str:
    """dtype and shape of a state dict entry; for a position embedding, the grid it is for."""
    if not isinstance(tensor, torch.Tensor):
        return f'a {type(tensor).__name__}, not a tensor'
    text = f'{str(tensor.dtype).replace("torch.", "")} {list(tensor.shape)}'
    if key == 'pos_embed' and tensor.dim() == 3:
        patches = tensor.shape[1] - (0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens)
        side = math.isqrt(max(patches, 0))
        if side * side == patches:
            text += f' (a {side}x{side} grid)'
    return text


def _misfit(key: str, tensor: object, file_key: Optional[str], file_tensor: object, want: torch.Tensor,
            model: torch.nn.Module) -> Optional[str]:
    """What keeps ``tensor`` (the file's ``file_key``, or None if a filter made it) from being
    exactly the model's ``key``; None if nothing does."""
    if file_key is None:
        problem = 'the converter changed'
    elif not isinstance(tensor, torch.Tensor):
        problem = 'type mismatch for'
    else:
        differs = [what for what, differ in (('dtype', tensor.dtype != want.dtype),
                                             ('size', tensor.shape != want.shape)) if differ]
        if not differs:
            return None
        problem = f'{" and ".join(differs)} mismatch for'
    name = key if file_key in (key, None) else f"{file_key} (the model's {key})"
    return (f'{problem} {name}: the file has {_tensor_text(key, file_tensor, model)}, '
            f'the model expects {_tensor_text(key, want, model)}')


def exact_state_dict(checkpoint: Dict[str, object], model: torch.nn.Module,
                     checkpoint_filter: Callable) -> Dict[str, torch.Tensor]:
    """``model``'s state dict from an official ``checkpoint`` through ``checkpoint_filter`` (which
    maps the official key names to ours), only if every tensor fits exactly: the model's dtype
    (float32, as the official files hold; float16 / bfloat16 / float64 / integer files are not the
    release and are refused, not cast) and the model's shape (the grid included), passed through
    the filter unchanged. The filters would resample a position or patch embedding of another grid,
    so the file's tensors are compared before filtering, and the filter's output after (keys it renamed)."""
    source = unwrap_state_dict(checkpoint)
    expected = model.state_dict()
    file_key = {id(v): k for k, v in source.items()}

    def refuse_misfits(tensors: Dict[str, object]) -> None:
        misfits = [_misfit(k, v, file_key.get(id(v)), source.get(file_key.get(id(v), k), v), expected[k], model)
                   for k, v in tensors.items() if k in expected]   # unexpected keys: require_matching_keys names them
        misfits = [m for m in misfits if m]
        if misfits:
            more = f' (and {len(misfits) - 1} more tensors)' if len(misfits) > 1 else ''
            raise ValueError(f'{misfits[0]}{more}: only an exact fit is published (nothing is cast or resampled)')

    refuse_misfits(source)   # before the filter can resample (or fail on) a tensor of another dtype or shape
    state_dict = checkpoint_filter(source, model)
    require_matching_keys(state_dict, model)
    refuse_misfits(state_dict)
    return state_dict


def convert(row: Row, source: str) -> torch.nn.Module:
    """The timm model of ``row`` holding the weights of the official file ``source``, checked."""
    if row.sha256 and sha256_of(source) != row.sha256:
        raise ValueError(f'{source}: sha256 differs from the manifest ({row.sha256}): not the released file')
    checkpoint = read_checkpoint(source)
    # built for the row's own tag, so that its pretrained_cfg (tag, notes) is what config.json says
    model = timm.create_model(row.name, **row.model_args).eval()
    state_dict = exact_state_dict(checkpoint, model, row.checkpoint_filter)
    load_state_dict_checked(model, state_dict, 'the converted state dict')
    with torch.no_grad():
        logits = model(torch.randn(2, *model.pretrained_cfg['input_size']))
    require_finite(logits, 'logits', f'the model converted from {source}')
    return model


def model_card(row: Row) -> str:
    """README.md of the Hub repository, from the manifest row."""
    name = row.name
    args = ', '.join(f'{k}={v!r}' for k, v in row.model_args.items()) or 'the architecture defaults'
    figures = [f'- top-1 {row.top1} %' if row.top1 else '', f'- top-5 {row.top5} %' if row.top5 else '',
               f'- {row.gmacs} GMACs' if row.gmacs else '']
    figures = '\n'.join(f for f in figures if f) or '- none reported'
    return f'''---
tags:
- image-classification
- timm
- timm-evit
library_name: timm
license: {row.weights_license}
datasets:
- imagenet-1k
---
# {name}

EViT token reorganisation ("Not All Patches are What You Need", ICLR 2022) as a timm model, from
the timm-evit plugin (`pip install timm-evit`; it registers the `evit_*` models with timm).
Weights: `{row.source_file}` from {row.source_url}, converted to safetensors unchanged.
Created with {args}.

```python
import timm
model = timm.create_model('hf-hub:{row.repo_id}', pretrained=True)   # or '{name}'
```

## Reported on ImageNet-1k validation ({row.figures_from}; not re-measured here)
{figures}

## Citation
```bibtex
@inproceedings{{liang2022evit,
  title={{Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations}},
  author={{Liang, Youwei and Ge, Chongjian and Tong, Zhan and Song, Yibing and Wang, Jue and Xie, Pengtao}},
  booktitle={{International Conference on Learning Representations}},
  year={{2022}}
}}
```
'''


def hub_folder(row: Row, out_dir: str) -> str:
    """Where ``row``'s Hub folder goes; a ValueError if something is there already."""
    target = os.path.join(out_dir, row.name)
    if os.path.exists(target):
        raise ValueError(f'{target} exists already: remove it or choose another --out')
    return target


def write_hub_folder(row: Row, model: torch.nn.Module, out_dir: str) -> str:
    """``out_dir/<architecture>.<tag>/`` in timm's Hub format, written whole or not at all, every
    file with the mode a new file gets (0o666 less the umask), the folder a new folder's."""
    target = hub_folder(row, out_dir)
    try:
        tmp = tempfile.mkdtemp(prefix='.tmp-', dir=out_dir)
    except OSError as e:
        raise ValueError(f'cannot write {target}: {e}') from e
    try:
        save_for_hf(model, tmp, model_args=row.model_args, safe_serialization=True)
        with open(os.path.join(tmp, 'README.md'), 'w') as f:
            f.write(model_card(row))
        for name in os.listdir(tmp):  # safetensors, json and open() need not agree on modes
            os.chmod(os.path.join(tmp, name), file_mode())
        os.chmod(tmp, folder_mode())  # mkdtemp makes it private
        os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f'cannot write {target}: {e}') from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def push(folder: str, repo_id: str, token: str) -> None:
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message='Add weights converted by timm-evit')


def check_before_converting(rows: List[Row], sources: str, out: Optional[str], will_push: bool) -> Optional[str]:
    """Everything that can be checked before converting any row: --out writable, no row's folder
    there already, every source file present, a token for --push (returned)."""
    if not out:
        raise ValueError('--sources needs --out (the folder for the Hub folders)')
    check_writable(out, '--out', folder=True)
    for r in rows:
        hub_folder(r, out)
    missing = [r.source_file for r in rows if not os.path.isfile(os.path.join(sources, r.source_file))]
    if missing:
        raise ValueError(f'not in --sources {sources!r}: {missing} (use --only to convert fewer rows)')
    token = os.environ.get('HF_TOKEN')
    if will_push and not token:
        raise ValueError('--push needs a Hugging Face token in the environment variable HF_TOKEN')
    return token


def convert_and_publish(row: Row, sources: str, out: str, token: Optional[str]) -> None:
    """Convert ``row``'s official file into its Hub folder in ``out``; upload it with ``token``."""
    source = os.path.join(sources, row.source_file)
    try:
        model = convert(row, source)
    except ValueError as e:
        raise ValueError(f'{row.name} from {source}: {e}') from e
    folder = write_hub_folder(row, model, out)
    files = sorted(os.listdir(folder))
    if token:
        push(folder, row.repo_id, token)
        print(f'uploaded {folder} ({", ".join(files)}) to {row.repo_id}')
    else:
        print(f'wrote {folder} ({", ".join(files)}); --push would upload it to {row.repo_id}')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--manifest', default=MANIFEST)
    parser.add_argument('--sources', help='folder holding the official files, named as in the manifest')
    parser.add_argument('--out', help='folder for the Hub folders (needed with --sources)')
    parser.add_argument('--only', nargs='+', metavar='NAME', help='rows to handle, as architecture.tag')
    parser.add_argument('--push', action='store_true', help='upload each converted folder (token: HF_TOKEN)')
    args = parser.parse_args(argv)

    try:
        rows = read_manifest(args.manifest)
        if args.only:
            unknown = set(args.only) - {r.name for r in rows}
            if unknown:
                raise ValueError(f'--only names rows not in the manifest: {sorted(unknown)}')
            rows = [r for r in rows if r.name in args.only]
        if not args.sources:
            if args.push or args.out:
                raise ValueError('--out and --push need --sources (the downloaded official files)')
            print(f'Dry run: {len(rows)} manifest rows, all checked; nothing is read, written or uploaded.')
            for r in rows:
                print(f'- {r.name}: {r.source_file} ({r.source_url}, sha256 {r.sha256 or "not recorded"}) '
                      f'-> convert, load strictly, forward -> model.safetensors, config.json '
                      f'(model_args {r.model_args}), README.md -> would upload to {r.repo_id}')
            unverified = sum(not r.sha256 for r in rows)
            if unverified:
                print(f'Rows without a sha256 ({unverified} of {len(rows)}) are not verified against the released '
                      f'file: the conversion\'s checks (every tensor of exactly the model\'s dtype and shape, '
                      f'a strict load, finite logits) are all that stands between a wrong file and the Hub.')
            return 0
        token = check_before_converting(rows, args.sources, args.out, args.push)
        try:
            created = create_folders(os.path.abspath(args.out))
        except OSError as e:
            raise ValueError(f'--out {args.out!r} cannot be created: {e}') from e
        try:
            for r in rows:
                convert_and_publish(r, args.sources, args.out, token if args.push else None)
        finally:
            remove_folders(created)   # only those still empty: a run that wrote nothing leaves no --out
    except ValueError as e:
        print(f'weights/hub.py: {e}', file=sys.stderr)
        return 2
    except BrokenPipeError:   # its reader went away (| head)
        return quiet_broken_pipe()
    return 0


if __name__ == '__main__':
    sys.exit(main())
