"""Which timm architectures ``timm_evit.apply`` supports: the list behind ``evit_<timm name>``.

``python -m timm_evit.tools.supported`` prints every candidate architecture with its verdict;
``--write`` rewrites ``timm_evit/timm_architectures.txt`` for the installed timm. Each candidate
is built on the meta device (no memory, no weights) and asked of ``apply``'s checks.
"""
import argparse
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch

from ..convert import EVIT_CLASSES, refusal

__all__ = ['CANDIDATE_MODULES', 'candidate_architectures', 'architecture_refusal', 'survey']

# timm modules whose models are built from the classes apply converts: their own modules, and
# vision_transformer_hybrid (VisionTransformer with a convolutional stem)
CANDIDATE_MODULES = tuple(sorted({cls.__module__.rpartition('.')[2] for cls in EVIT_CLASSES}
                                 | {'vision_transformer_hybrid'}))
LIST_FILE = Path(__file__).resolve().parent.parent / 'timm_architectures.txt'


def candidate_architectures() -> List[str]:
    """timm's architectures (no tags) in ``CANDIDATE_MODULES``."""
    names = set()
    for module in CANDIDATE_MODULES:
        names.update(timm.list_models(module=module))
    return sorted(name for name in names if not name.startswith('evit_'))


def architecture_refusal(arch: str) -> Optional[str]:
    """Why ``apply`` cannot convert timm's ``arch``, or None (built on the meta device)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')   # deprecation notices of old names
            with torch.device('meta'):
                model = timm.create_model(arch)
    except Exception as e:  # noqa: BLE001  (a candidate timm cannot build is not supported)
        return f'timm cannot build it on the meta device: {type(e).__name__}: {e}'
    return refusal(model)


def survey() -> Tuple[List[str], Dict[str, str]]:
    """(supported architectures, {refused architecture: why})."""
    supported, refused = [], {}
    for arch in candidate_architectures():
        why = architecture_refusal(arch)
        if why is None:
            supported.append(arch)
        else:
            refused[arch] = why
    return supported, refused


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_evit.tools.supported', description=__doc__.splitlines()[0])
    parser.add_argument('--write', action='store_true', help=f'rewrite {LIST_FILE.name} for the installed timm')
    args = parser.parse_args(argv)
    supported, refused = survey()
    for arch in supported:
        print(f'supported  {arch}')
    for arch, why in refused.items():
        print(f'refused    {arch}: {why}')
    print(f'{len(supported)} supported, {len(refused)} refused, timm {timm.__version__}', file=sys.stderr)
    if args.write:
        header = (f'# timm {timm.__version__}: the architectures timm_evit.apply supports, registered as evit_<name>.\n'
                  '# Written by `python -m timm_evit.tools.supported --write`; do not edit by hand.\n')
        LIST_FILE.write_text(header + ''.join(f'{arch}\n' for arch in supported), encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
