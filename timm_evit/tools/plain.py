"""A ``--model`` name parsed once (``ModelSpec``), and the plain timm model each EViT model is
measured against (same architecture, same weights)."""
from dataclasses import dataclass, field
from typing import Any, Dict, Union

import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, split_model_name_tag
from torch import nn

from ..evit_timm import EVIT_PREFIX, TIMM_ARCHITECTURES
from ..options import pop_evit_args

__all__ = ['PLAIN_COUNTERPARTS', 'ModelSpec', 'parse_model_name', 'model_spec', 'check_pretrained_tag',
           'create_plain_counterpart']

# The plain model each EViT architecture reorganises (same weights, same shapes), with its
# creation arguments: timm's own DeiT, or, where timm has none (LV-ViT), the model at keep 1.0.
PLAIN_COUNTERPARTS = {
    'evit_deit_tiny': ('deit_tiny_patch16_224', {}),
    'evit_deit_small': ('deit_small_patch16_224', {}),
    'evit_deit_base': ('deit_base_patch16_224', {}),
    'evit_lvvit_s': ('evit_lvvit_s', {'keep_rate': 1.0}),
    'evit_lvvit_m': ('evit_lvvit_m', {'keep_rate': 1.0}),
}


@dataclass(frozen=True)
class ModelSpec:
    """A ``--model`` name, parsed once (``parse_model_name``): what the tools build, and the plain
    timm model it is measured against (same architecture, same weights)."""
    name: str                        # as given, with its pretrained tag if any
    applied: bool                    # a timm ViT name: timm's model converted with timm_evit.apply
    plain_name: str                  # the plain model (with a tag where timm has it)
    plain_kwargs: Dict[str, Any] = field(default_factory=dict)   # its creation arguments

    @property
    def label(self) -> str:
        """How tables name the EViT model."""
        return f'{self.name} + EViT' if self.applied else self.name


def parse_model_name(model_name: str) -> ModelSpec:
    """``model_name`` as a ``ModelSpec``: any name ``timm.create_model`` takes for an EViT model,
    with or without a pretrained tag: a paper name (``evit_deit_small.keep70_fuse_in1k``),
    ``evit_<timm name>[.tag]``, or a timm ViT name itself (converted with ``timm_evit.apply``). A
    paper name's counterpart is timm's DeiT with the same tag where timm has it
    (``evit_deit_tiny.fb_in1k``: ``deit_tiny_patch16_224.fb_in1k``), else timm's DeiT architecture:
    the tools load it with the EViT model's own weights either way (``create_plain_counterpart``).
    A ValueError names what is wrong: a name no tool takes, or a tag the architecture does not have."""
    arch, tag = split_model_name_tag(model_name)
    applied = not arch.startswith(EVIT_PREFIX)
    if arch in PLAIN_COUNTERPARTS:
        check_pretrained_tag(model_name)
        plain, plain_kwargs = PLAIN_COUNTERPARTS[arch]
        return ModelSpec(model_name, applied, _with_tag(plain, tag) if tag else plain, dict(plain_kwargs))
    if applied and timm.is_model(arch):
        check_pretrained_tag(model_name)
        return ModelSpec(model_name, applied, model_name)    # timm's model itself, EViT applied to a copy
    if arch[len(EVIT_PREFIX):] in TIMM_ARCHITECTURES and timm.is_model(arch):
        check_pretrained_tag(model_name)
        # evit_<timm name>[.tag]: timm's model of that name and tag
        return ModelSpec(model_name, applied, model_name[len(EVIT_PREFIX):])
    raise ValueError(f'--model takes one of {sorted(PLAIN_COUNTERPARTS)}, evit_<timm name> for a timm ViT that '
                     f'timm_evit.apply supports (e.g. evit_deit3_small_patch16_224), or such a timm name itself, '
                     f'each with or without a pretrained tag (e.g. evit_deit_small.keep70_fuse_in1k), '
                     f'got {model_name!r}')


def model_spec(model: Union[str, ModelSpec]) -> ModelSpec:
    """``model`` as a ``ModelSpec``: parsed where it is still a name (the Python API takes either)."""
    return model if isinstance(model, ModelSpec) else parse_model_name(model)


def check_pretrained_tag(model_name: str) -> None:
    """A ValueError naming the tag and the architecture's tags where ``model_name`` has a pretrained
    tag that timm's registry does not know (``timm.create_model`` would fail on it, weights or not)."""
    arch, tag = split_model_name_tag(model_name)
    if not tag:
        return
    try:
        get_pretrained_cfg(model_name)
    except RuntimeError as e:   # timm: 'Invalid pretrained tag (...) for ...'
        tags = [name.partition('.')[2] for name in get_arch_pretrained_cfgs(arch)]
        raise ValueError(f'--model {model_name}: {arch} has no pretrained tag {tag!r}; its tags: '
                         f'{", ".join(tags) or "none"}') from e


def _with_tag(arch: str, tag: str) -> str:
    """``arch.tag`` where timm has that pretrained tag for ``arch``, else ``arch``."""
    return f'{arch}.{tag}' if f'{arch}.{tag}' in get_arch_pretrained_cfgs(arch) else arch


def create_plain_counterpart(model: Union[str, ModelSpec], evit: nn.Module, **model_kwargs) -> nn.Module:
    """timm's plain model for ``model`` (its ``ModelSpec.plain_name``), built with the architecture
    arguments among ``model_kwargs`` and loaded with ``evit``'s weights, in eval mode."""
    spec = model_spec(model)
    plain_name, plain_kwargs = spec.plain_name, spec.plain_kwargs
    # EViT's arguments left out (the plain model shares only the architecture's); the EViT model's
    # own num_classes (the caller's, or a checkpoint's) wins over model_kwargs
    architecture = dict(model_kwargs)
    pop_evit_args(architecture)
    architecture.pop('num_classes', None)
    plain = timm.create_model(plain_name, num_classes=evit.num_classes, **plain_kwargs, **architecture)
    state = evit.state_dict()
    state.pop('keep_rate_step', None)  # warm-up progress: training state, not a weight
    plain.load_state_dict(state)
    return plain.eval()
