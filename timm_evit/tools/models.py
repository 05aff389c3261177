"""Model building for every command (bench, sweep, visualize, export): ``timm.create_model`` with
a user's mistake as a one-line ValueError, every argument checked on the meta device before any
weights are read."""
from typing import Dict, Optional, Union

import timm
import torch

from ..checkpoints import load_checkpoint_file, one_line
from ..convert import apply
from ..options import TRAINING_ARGS, pop_evit_args
from .plain import ModelSpec, model_spec
from .preflight import check_input_size, hub_offline, hub_unreachable, hub_weights, missing_weights_message

__all__ = ['create_evit_model', 'merge_model_kwargs', 'check_device']


def merge_model_kwargs(model_kwargs: Optional[dict], **given) -> dict:
    """``model_kwargs`` plus the arguments a tool takes on their own (``num_classes``,
    ``fuse_token``, ``keep_rate``; None: not given). An argument given both ways must agree: a
    ValueError names both options otherwise."""
    merged = dict(model_kwargs or {})
    for key, value in given.items():
        if value is None:
            continue
        if key in merged and merged[key] != value:
            raise ValueError(f'{_as_option(key, value)} conflicts with --model-kwargs {key}={merged[key]!r}')
        merged[key] = value
    return merged


def _as_option(key: str, value) -> str:
    if key == 'fuse_token':
        return '--no-fuse' if value is False else f'fuse_token={value!r}'
    return f'--{key.replace("_", "-")} {value!r}'


def create_evit_model(model: Union[str, ModelSpec], pretrained: bool = False, checkpoint: Optional[str] = None,
                      options: Optional[Dict[str, str]] = None, whole_patches: bool = False,
                      **kwargs) -> torch.nn.Module:
    """``timm.create_model`` of ``model`` (a name, or its ``ModelSpec``) for the tools, where a user's
    mistake is a one-line ValueError: a name
    or pretrained tag no tool takes, an argument the model refuses (name or value, EViT's included),
    an input size that is not a whole number of patches (``preflight.check_input_size``;
    ``whole_patches``: even where the model pads), pretrained weights that cannot be had (not cached,
    and offline or no network: said at once, without huggingface_hub's minute of retries) or do not
    fit, a ``checkpoint`` that cannot be read safely or does not fit. Every argument is checked on
    the meta device (no memory, no weights) before any weights are read. A timm ViT name (not
    ``evit_*``) is built as timm's model, then converted with ``timm_evit.apply`` using the EViT
    arguments among ``kwargs``. ``options``: the tool's own option for an argument, for messages
    (``{'img_size': '--img-size'}``; the others are named as ``--model-kwargs``)."""
    spec = model_spec(model)   # a name and tag the tools take (its ValueError says which)
    model_name = spec.name
    evit_args = {}
    if spec.applied:
        evit_args = pop_evit_args(kwargs)
        warmup = sorted(k for k in evit_args if k in TRAINING_ARGS)
        if warmup:
            raise ValueError(f'{", ".join(warmup)}: the keep-rate warm-up is for training evit_* models, '
                             f'not for timm_evit.apply on {model_name}')
    with torch.device('meta'):   # every argument checked before any weights are read (or downloaded)
        shape = _build(model_name, False, kwargs, evit_args if spec.applied else None)
    check_input_size(shape, model_name, kwargs, options, padding_ok=not whole_patches)
    source = hub_weights(shape.pretrained_cfg) if pretrained else None
    unreachable = hub_unreachable(*source) if source else None
    try:
        with hub_offline(unreachable is not None):   # the cache only: no retries against a Hub that does not answer
            model = _build(model_name, pretrained, kwargs)
    except OSError as e:  # only reading pretrained weights does I/O here (huggingface_hub's errors are OSErrors)
        if not pretrained:
            raise
        if unreachable:
            raise ValueError(missing_weights_message(model_name, source[0], unreachable)) from e
        raise ValueError(f'--pretrained: the weights of {model_name} cannot be loaded: {one_line(str(e))}') from e
    if checkpoint:
        load_checkpoint_file(model, checkpoint)
    if spec.applied:
        apply(model, **evit_args)   # its ValueError names what the model lacks
    return model


def _build(model_name: str, pretrained: bool, kwargs: dict, evit_args: Optional[dict] = None) -> torch.nn.Module:
    """``timm.create_model`` (then, unless None, ``apply`` with ``evit_args``), its refusal of an argument as a
    one-line ValueError. The arguments were checked on the meta device before ``pretrained`` weights
    are loaded: a RuntimeError then is about those weights (not published, not fitting)."""
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # the model's constructor refusing an argument
        arguments = ' '.join(f'{k}={v!r}' for k, v in {**kwargs, **(evit_args or {})}.items())
        raise ValueError(f'cannot build {model_name} with {arguments}: {one_line(str(e))}') from e
    except RuntimeError as e:
        if not pretrained or isinstance(e, torch.OutOfMemoryError):
            raise
        raise ValueError(f'--pretrained: the weights of {model_name} cannot be loaded: {one_line(str(e))}') from e
    if evit_args is not None:
        apply(model, **evit_args)   # on the meta device: the class and EViT's arguments checked
    return model


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device this machine has, or a ValueError saying what is allowed."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ('cpu', 'cuda'):
        raise ValueError(f"--device takes 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device!r} was asked for but torch sees no CUDA device')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f'device {device!r} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s)')
    return dev
