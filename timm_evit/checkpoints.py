"""Reading untrusted checkpoint files: safetensors, or torch.load(weights_only=True)."""
import argparse
import os
from typing import Any, Dict

import torch

__all__ = ['ALLOWED_PICKLE_GLOBALS', 'read_checkpoint', 'unwrap_state_dict', 'require_matching_keys']

# Training scripts derived from timm's and DeiT's pickle their argparse.Namespace beside the
# weights (official EViT and Token Labeling files). It is a plain attribute bag: safe to allow.
ALLOWED_PICKLE_GLOBALS = [argparse.Namespace]


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The contents of a checkpoint file, never running code from it.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``
    allowing only ``argparse.Namespace`` besides tensors. Errors name the file.
    """
    if not os.path.isfile(path):
        raise ValueError(f'checkpoint {path!r} is not a file')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f'checkpoint {path!r} is not a readable safetensors file (corrupted or truncated?): {e}') from e
    try:
        with torch.serialization.safe_globals(ALLOWED_PICKLE_GLOBALS):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError for a pickle that is not weights-only, others for damage
        raise ValueError(f'checkpoint {path!r} cannot be read safely (weights_only=True): {e}') from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict')
    return checkpoint


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint: ``state_dict_ema`` / ``model_ema`` /
    ``state_dict`` / ``model`` nesting (EMA first, as timm's own loader), ``module.`` prefixes
    (DistributedDataParallel) stripped."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


def require_matching_keys(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """A ValueError naming every missing and unexpected key, if any."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f'checkpoint does not match {type(model).__name__}: missing keys {missing}, '
                         f'unexpected keys {unexpected}')
