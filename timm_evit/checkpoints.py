"""Reading untrusted checkpoint files: safetensors, or torch.load(weights_only=True)."""
import argparse
import os
import pickle
import re
from typing import Any, Dict

import torch

__all__ = ['ALLOWED_PICKLE_GLOBALS', 'read_checkpoint', 'unwrap_state_dict', 'require_matching_keys',
           'load_state_dict_checked', 'load_checkpoint_file', 'one_line']

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
    unsafe = f'checkpoint {path!r} cannot be read safely (weights_only=True)'
    try:
        with torch.serialization.safe_globals(ALLOWED_PICKLE_GLOBALS):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # a pickle that is not weights-only, or garbage
        raise ValueError(f'{unsafe}: {_unpickling_reason(e)}') from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a damaged or truncated file
        raise ValueError(f'{unsafe}: {one_line(str(e))}') from e
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


def load_state_dict_checked(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, whose mismatch error (keys, shapes)
    becomes a one-line ValueError naming ``source``."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # torch's "Error(s) in loading state_dict": one line per problem
        problems = [one_line(line, limit=240) for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f'{source} does not fit {type(model).__name__}: ' + '; '.join(problems[:4])
                         + (f'; and {len(problems) - 4} more' if len(problems) > 4 else '')) from e


def load_checkpoint_file(model: torch.nn.Module, path: str) -> None:
    """Load a checkpoint file (as timm's ``checkpoint_path``: EMA weights first, ``module.``
    stripped) into ``model``, strictly, without running code from it; a ValueError naming the
    file if it cannot be read or does not fit."""
    load_state_dict_checked(model, unwrap_state_dict(read_checkpoint(path)), f'checkpoint {path!r}')


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _unpickling_reason(error: Exception) -> str:
    # torch's weights-only error is a page of advice; its reason is one sentence of it
    found = re.search(r'WeightsUnpickler error: (.*?)(?: Please use|$)', ' '.join(str(error).split()))
    return found.group(1) if found else one_line(str(error))
