"""``evit_<timm name>``: every timm architecture that ``timm_evit.apply`` supports, by name.

``timm.create_model('evit_vit_base_patch16_clip_224.openai', pretrained=True, keep_rate=0.7)``
builds timm's own ``vit_base_patch16_clip_224`` with the pretrained tag's weights (timm's Hub
repository: the pretrained tags are timm's, not EViT-trained weights) and converts it with
``apply``. The EViT arguments (``options.EVIT_ARGS``: ``keep_rate``, ``reorg_layers``,
``fuse_token``, ``score``, ``fusion``, the keep-rate warm-up) go to ``apply``; every other argument to timm's model. So timm's ``train.py --model
evit_deit3_small_patch16_224.fb_in22k_ft_in1k --pretrained --model-kwargs keep_rate=0.7
keep_rate_warmup_steps=...`` fine-tunes any of them with EViT.

The architectures are listed in ``timm_architectures.txt``, written by ``python -m
timm_evit.tools.supported --write`` (which builds every candidate on the meta device and asks
``apply``); a test checks the list against the installed timm. Names an older timm lacks are
skipped.
"""
from collections import deque
from importlib import resources
from typing import Callable, Dict, Tuple

from timm.models import DefaultCfg, get_arch_pretrained_cfgs, is_model, model_entrypoint, register_model
from torch import nn

from .convert import EVIT_PREFIX, apply
from .evit_deit import build_evit_model
from .options import pop_evit_args

__all__ = ['EVIT_PREFIX', 'TIMM_ARCHITECTURES', 'GENERATED_WITH_TIMM', 'read_architectures']


def read_architectures() -> Tuple[str, Tuple[str, ...]]:
    """(timm version the list was generated with, the architectures) from ``timm_architectures.txt``."""
    text = resources.files(__package__).joinpath('timm_architectures.txt').read_text(encoding='utf-8')
    version, names = '', []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith('# timm '):
            version = line.split()[2]
        elif line and not line.startswith('#'):
            names.append(line)
    return version, tuple(names)


GENERATED_WITH_TIMM, TIMM_ARCHITECTURES = read_architectures()


# The arguments timm's builder takes for the weights' source (named parameters of build_model_with_cfg)
_SOURCE_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'pretrained_model_args')


def _entrypoint(arch: str, name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        evit_args = pop_evit_args(kwargs)
        # timm passes this name's pretrained cfg (a copy of the architecture's), so timm's own
        # entrypoint loads timm's weights for the tag
        if not kwargs.get('features_only', False):
            return apply(model_entrypoint(arch)(pretrained=pretrained, **kwargs), **evit_args)
        # features_only: timm's entrypoint would wrap its plain model (and prune its blocks)
        # before apply could convert it. So timm's builder wraps the converted model instead, in
        # timm's feature wrapper for its ViTs and Evas (out_indices, feature_cls as for timm's
        # name); reorg_layers count the full depth, as for the paper's names.
        source = {key: kwargs[key] for key in _SOURCE_ARGS if key in kwargs}

        def evit_model(**model_kwargs) -> nn.Module:
            return apply(model_entrypoint(arch)(pretrained=pretrained, **source, **model_kwargs), **evit_args)
        return build_evit_model(evit_model, name, False, None, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm's ``{arch}`` converted with ``timm_evit.apply`` (its pretrained tags are timm's)."
    return entrypoint


def _inherited_default_cfg(arch: str) -> DefaultCfg:
    """The architecture's pretrained tags and cfgs, the default tag first (timm's order)."""
    cfgs = get_arch_pretrained_cfgs(arch)   # {'arch.tag': cfg}, copies
    tags = [name.partition('.')[2] for name in cfgs]
    return DefaultCfg(tags=deque(tags), cfgs=dict(zip(tags, cfgs.values())),
                      is_pretrained=any(cfg.has_weights for cfg in cfgs.values()))


# register_model reads this module's default_cfgs for each name it registers
default_cfgs: Dict[str, DefaultCfg] = {}
for _arch in TIMM_ARCHITECTURES:
    if not is_model(_arch):
        continue   # an older timm than the list was generated with
    _name = EVIT_PREFIX + _arch
    default_cfgs[_name] = _inherited_default_cfg(_arch)
    globals()[_name] = register_model(_entrypoint(_arch, _name))
