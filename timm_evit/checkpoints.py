"""Reading untrusted checkpoint files: safetensors, or torch.load(weights_only=True)."""
import argparse
import os
import pickle
import re
import warnings
from typing import Any, Dict, Optional

import torch

__all__ = ['ALLOWED_PICKLE_GLOBALS', 'read_checkpoint', 'unwrap_state_dict', 'require_matching_keys',
           'load_state_dict_checked', 'load_checkpoint_file', 'one_line', 'require_finite', 'require_finite_forward',
           'weights_source']

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
        # torch's warnings here (a TorchScript archive dispatched to torch.jit.load) are its refusal's reason again
        with torch.serialization.safe_globals(ALLOWED_PICKLE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # not weights-only; damaged or truncated (the unpickler then raises anything); TorchScript
        raise ValueError(f'{unsafe}: {_torch_reason(e)}') from e
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


def weights_source(model_name: str, pretrained: bool = False, checkpoint: Optional[str] = None) -> str:
    """The model and its weights, as errors about what it computes name them."""
    if checkpoint:
        return f'{model_name} with checkpoint {checkpoint!r}'
    return f'{model_name} with {"pretrained" if pretrained else "random"} weights'


def require_finite(values: torch.Tensor, what: str, source: str) -> None:
    """A ValueError naming ``what`` was computed and by which ``source`` (model, checkpoint)
    unless every one of ``values`` is finite: NaN logits would otherwise be counted, exported or
    drawn as if they meant something (NaN compares false, so a NaN logit is never wrong)."""
    values = torch.as_tensor(values).detach()
    if not values.is_floating_point() or bool(torch.isfinite(values).all()):
        return
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    raise ValueError(f'{source} gives non-finite {what} ({nan} NaN and {inf} infinite of {values.numel()} values): '
                     'broken weights, or an overflow; nothing is computed from them')


@torch.no_grad()
def require_finite_forward(model: torch.nn.Module, images: torch.Tensor, source: str,
                           keep_rate: Optional[float] = None) -> None:
    """``require_finite`` on what an EViT ``model`` (eval mode) computes from ``images`` (at
    ``keep_rate``; None: its own): every block's tokens, then the logits. Run on
    timm's math attention path, where a NaN attention row makes NaN tokens: torch's fused CPU kernel
    can turn it into finite output, while the class attention EViT chooses tokens by is still NaN."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    training = model.training
    kwargs = {} if keep_rate is None else dict(keep_rate=keep_rate)
    try:
        model.eval()
        for module in fused:
            module.fused_attn = False
        final, intermediates = model.forward_intermediates(images, output_fmt='NLC', **kwargs)
        for block, tokens in enumerate(intermediates):
            require_finite(tokens, f'tokens in block {block}', source)
        require_finite(model.forward_head(final), 'logits', source)
    finally:
        model.train(training)
        for module, value in fused.items():
            module.fused_attn = value


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


# Sentences of torch's load errors that advise loading the file anyway (weights_only=False,
# allowlisting its globals) or point to more of that advice: never passed on about an untrusted file.
_TORCH_ADVICE = ('weights_only set to false', 'weights_only=false', 'safe_globals', 'trust', 'can still be loaded',
                 'two options', 'alternatively', 'in pytorch 2.6', 'file an issue', 'check the documentation',
                 'load failed')


def _torch_reason(error: Exception) -> str:
    """What torch says is wrong with a file it refused to load, on one line, without its advice."""
    text = re.sub(r'\x1b\[[0-9;]*m|`', '', str(error)).replace('WeightsUnpickler error:', ' ')
    sentences = re.split(r'(?<=\.)\s+|\s*\(\d\)\s*', ' '.join(text.split()))
    reason = one_line(' '.join(s for s in sentences if s and not any(a in s.lower() for a in _TORCH_ADVICE)))
    if isinstance(error, (pickle.UnpicklingError, RuntimeError)) and reason:  # torch's own prose
        return reason
    return f'damaged or truncated? ({type(error).__name__}{": " + reason if reason else ""})'
