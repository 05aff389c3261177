"""The plain timm model each EViT model is measured against (same architecture, same weights)."""
import timm
from torch import nn

__all__ = ['PLAIN_COUNTERPARTS', 'EVIT_ONLY_ARGS', 'create_plain_counterpart']

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
EVIT_ONLY_ARGS = ('keep_rate', 'reorg_layers', 'fuse_token', 'keep_rate_warmup_start', 'keep_rate_warmup_steps')


def create_plain_counterpart(model_name: str, evit: nn.Module, **model_kwargs) -> nn.Module:
    """timm's plain model for ``model_name`` (see PLAIN_COUNTERPARTS), built with the architecture
    arguments among ``model_kwargs`` and loaded with ``evit``'s weights, in eval mode."""
    if model_name not in PLAIN_COUNTERPARTS:
        raise ValueError(f'model_name must be one of {sorted(PLAIN_COUNTERPARTS)}, got {model_name!r}')
    plain_name, plain_kwargs = PLAIN_COUNTERPARTS[model_name]
    # the EViT model's own num_classes (the caller's, or a checkpoint's) wins over model_kwargs
    architecture = {k: v for k, v in model_kwargs.items() if k not in EVIT_ONLY_ARGS + ('num_classes',)}
    plain = timm.create_model(plain_name, num_classes=evit.num_classes, **plain_kwargs, **architecture)
    state = evit.state_dict()
    state.pop('keep_rate_step', None)  # warm-up progress: training state, not a weight
    plain.load_state_dict(state)
    return plain.eval()
