"""The plain timm model each EViT model is measured against (same architecture, same weights)."""
from typing import Any, Dict, Tuple

import timm
from torch import nn

from ..evit_timm import EVIT_PREFIX, TIMM_ARCHITECTURES
from ..options import EVIT_ARGS

__all__ = ['PLAIN_COUNTERPARTS', 'EVIT_ONLY_ARGS', 'plain_model_name', 'is_applied', 'evit_label',
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
# Arguments only EViT has; the others describe the architecture, which the plain model shares.
EVIT_ONLY_ARGS = EVIT_ARGS


def is_applied(model_name: str) -> bool:
    """Whether the tools build ``model_name`` as timm's own model with ``timm_evit.apply`` (any timm
    ViT name, with or without a pretrained tag) rather than as a registered ``evit_*`` model."""
    return model_name not in PLAIN_COUNTERPARTS and not model_name.startswith('evit_')


def plain_model_name(model_name: str) -> Tuple[str, Dict[str, Any]]:
    """The plain timm model (and its creation arguments) that ``model_name`` is measured against."""
    if model_name in PLAIN_COUNTERPARTS:
        return PLAIN_COUNTERPARTS[model_name]
    arch = model_name.split('.')[0]
    if is_applied(model_name) and timm.is_model(arch):
        return model_name, {}    # timm's model itself, EViT applied to a copy
    if arch.startswith(EVIT_PREFIX) and arch[len(EVIT_PREFIX):] in TIMM_ARCHITECTURES and timm.is_model(arch):
        return model_name[len(EVIT_PREFIX):], {}   # evit_<timm name>[.tag]: timm's model of that name and tag
    raise ValueError(f'--model takes one of {sorted(PLAIN_COUNTERPARTS)}, evit_<timm name> for a timm ViT that '
                     f'timm_evit.apply supports (e.g. evit_deit3_small_patch16_224), or such a timm name itself, '
                     f'got {model_name!r}')


def evit_label(model_name: str) -> str:
    """How tables name the EViT model of ``model_name``."""
    return f'{model_name} + EViT' if is_applied(model_name) else model_name


def create_plain_counterpart(model_name: str, evit: nn.Module, **model_kwargs) -> nn.Module:
    """timm's plain model for ``model_name`` (see ``plain_model_name``), built with the architecture
    arguments among ``model_kwargs`` and loaded with ``evit``'s weights, in eval mode."""
    plain_name, plain_kwargs = plain_model_name(model_name)
    # the EViT model's own num_classes (the caller's, or a checkpoint's) wins over model_kwargs
    architecture = {k: v for k, v in model_kwargs.items() if k not in EVIT_ONLY_ARGS + ('num_classes',)}
    plain = timm.create_model(plain_name, num_classes=evit.num_classes, **plain_kwargs, **architecture)
    state = evit.state_dict()
    state.pop('keep_rate_step', None)  # warm-up progress: training state, not a weight
    plain.load_state_dict(state)
    return plain.eval()
