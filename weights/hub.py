"""Convert the official checkpoints of weights/manifest.csv into Hugging Face Hub folders, and publish them.

    python weights/hub.py                                   # dry run: the plan for every manifest row
    python weights/hub.py --sources DL --out hub/           # convert what is in DL/, print what would be uploaded
    python weights/hub.py --sources DL --out hub/ --push    # ... and upload (token: HF_TOKEN)

For each row: read the official file (never running code from it), convert it to our state dict,
load it strictly into the timm model, run a forward pass, and write a folder in timm's Hub format
(model.safetensors, config.json with model_args, README.md model card) - to a temporary folder
first, renamed into place only when everything succeeded.
"""
import argparse
import csv
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import timm
import torch
from timm.models import save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from timm_evit.tools._io import check_writable, file_mode, folder_mode
from timm_evit.checkpoints import load_state_dict_checked, read_checkpoint, require_matching_keys, unwrap_state_dict
from timm_evit.checkpoints import require_finite
from timm_evit.evit_deit import HUB_NAMESPACE
from timm_evit.evit_lvvit import checkpoint_filter_fn as lvvit_checkpoint_filter_fn

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'manifest.csv')


@dataclass
class Row:
    architecture: str
    tag: str
    source_file: str
    source_url: str
    published_as: str
    sha256: str
    keep_rate: str
    fuse_token: str
    top1: str
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
        args = {}
        if self.keep_rate:
            args['keep_rate'] = float(self.keep_rate)
        if self.fuse_token:
            args['fuse_token'] = {'True': True, 'False': False}[self.fuse_token]
        return args


def read_manifest(path: str = MANIFEST) -> List[Row]:
    with open(path, newline='') as f:
        rows = [Row(**r) for r in csv.DictReader(f)]
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f'{path}: duplicate rows')
    return rows


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def convert(row: Row, source: str) -> torch.nn.Module:
    """The timm model of ``row`` holding the weights of the official file ``source``, checked."""
    if row.sha256 and sha256_of(source) != row.sha256:
        raise ValueError(f'{source}: sha256 differs from the manifest ({row.sha256}): not the released file')
    checkpoint = read_checkpoint(source)
    # built for the row's own tag, so that its pretrained_cfg (tag, notes) is what config.json says
    model = timm.create_model(row.name, **row.model_args).eval()
    if row.architecture.startswith('evit_lvvit'):
        state_dict = lvvit_checkpoint_filter_fn(checkpoint, model)
    else:  # official EViT-DeiT: {'model': DeiT state dict, ...}, timm's own ViT layout
        state_dict = vit_checkpoint_filter_fn(unwrap_state_dict(checkpoint), model)
        require_matching_keys(state_dict, model)
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
            print(f'Dry run: {len(rows)} manifest rows; nothing is read, written or uploaded.')
            for r in rows:
                print(f'- {r.name}: {r.source_file} ({r.source_url}, sha256 {r.sha256 or "unknown"}) '
                      f'-> convert, load strictly, forward -> model.safetensors, config.json '
                      f'(model_args {r.model_args}), README.md -> would upload to {r.repo_id}')
            return 0
        token = check_before_converting(rows, args.sources, args.out, args.push)
        os.makedirs(args.out, exist_ok=True)
        for r in rows:
            source = os.path.join(args.sources, r.source_file)
            try:
                model = convert(r, source)
            except ValueError as e:
                raise ValueError(f'{r.name} from {source}: {e}') from e
            folder = write_hub_folder(r, model, args.out)
            files = sorted(os.listdir(folder))
            if args.push:
                push(folder, r.repo_id, token)
                print(f'uploaded {folder} ({", ".join(files)}) to {r.repo_id}')
            else:
                print(f'wrote {folder} ({", ".join(files)}); --push would upload it to {r.repo_id}')
    except ValueError as e:
        print(f'weights/hub.py: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
