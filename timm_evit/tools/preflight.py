"""What the tools check about the model they are asked to build, before its weights are read or any
long work starts: the input size against the patch size, the memory of an input batch, where
``--pretrained`` weights come from."""
import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoints import one_line

__all__ = ['check_input_size', 'check_batch_fits', 'out_of_memory_as_error', 'hub_weights', 'hub_unreachable',
           'hub_offline', 'missing_weights_message']


def _option(key: str, value, options: Optional[Dict[str, str]]) -> str:
    """How the user gave argument ``key``: the tool's own option (``options``), else --model-kwargs."""
    if options and key in options:
        return f'{options[key]} {value!r}'
    return f'--model-kwargs {key}={value!r}'


def _nearest_multiples(size: int, step: int) -> List[int]:
    below = size // step * step
    return [m for m in (below, below + step) if m > 0]


def check_input_size(model: nn.Module, model_name: str, given: Optional[dict] = None,
                     options: Optional[Dict[str, str]] = None, padding_ok: bool = True) -> None:
    """A ValueError where the model's input size is not a whole number of patches and the result
    would mislead. timm's patch embedding is a convolution whose stride is the patch (after the
    stem of a hybrid model): it ignores the last ``size % patch`` pixels of each row and column,
    and sees nothing below one patch, while the tools would declare, feed and draw the whole
    image. A model built with ``dynamic_img_pad=True`` and ``dynamic_img_size=True`` pads the
    image to whole patches instead: accepted, unless ``padding_ok`` is False (a drawing of whole
    patches over the image); so is timm's own architecture at its own size (neither ``img_size``
    nor ``patch_size`` among ``given``). ``given``: the creation arguments (to name the option that set the
    size); ``options``: the tool's own option for an argument (``{'img_size': '--img-size'}``)."""
    embed = model.patch_embed
    if getattr(embed, 'img_size', None) is None:
        return   # the model takes any size: nothing fixed to check
    size, stride = tuple(embed.img_size), tuple(embed.feat_ratio(as_scalar=False))
    if all(s % p == 0 for s, p in zip(size, stride)):
        return
    pads = getattr(embed, 'dynamic_img_pad', False) and getattr(model, 'dynamic_img_size', False)
    if pads and padding_ok:
        return
    given = given or {}
    if padding_ok and not {'img_size', 'patch_size'} & set(given):
        # timm's own architecture at its own size, as its weights were trained: SigLIP so400m/14 at
        # 384 px sees 27 x 27 patches and ignores 6 pixels by design. Only a drawing of whole
        # patches over the image (visualize) still needs whole patches.
        return
    if 'img_size' in given:
        source = _option('img_size', given['img_size'], options)
    else:
        source = f"the model's default input size {size[0]}" + ('' if size[0] == size[1] else f'x{size[1]}')
    patch = f'{stride[0]}' if stride[0] == stride[1] else f'{stride[0]}x{stride[1]}'
    nearest = ' or '.join(dict.fromkeys(str(m) for s, p in zip(size, stride) if s % p
                                        for m in _nearest_multiples(s, p)))
    if any(s < p for s, p in zip(size, stride)):
        problem = f"is smaller than the patch size {patch} of {model_name}: timm's patch embedding sees none of it"
    else:
        ignored = ' or '.join(sorted({str(s % p) for s, p in zip(size, stride) if s % p}))
        problem = (f"is not a multiple of the patch size {patch} of {model_name}: timm's patch embedding "
                   f"ignores the last {ignored} pixel(s) of each row or column")
    if not padding_ok:
        remedy = f'this tool draws whole patches over the image: use {nearest}'
    else:
        remedy = f'use {nearest}, or --model-kwargs dynamic_img_size=True dynamic_img_pad=True (the model then pads)'
    raise ValueError(f'{source} {problem}; {remedy}')


def _memory_bytes(device: torch.device) -> Optional[int]:
    """The memory of ``device``: the GPU's, or this machine's physical memory (None if unknown)."""
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, OSError, ValueError):   # not a POSIX system
        return None


def _gib(size: float) -> str:
    return f'{size / 2 ** 30:,.1f} GiB'


def check_batch_fits(batch_size: int, input_size: Sequence[int], dtype: torch.dtype, device: torch.device,
                     option: str = '--batch-size') -> None:
    """A ValueError naming ``option`` where a batch of ``input_size`` images alone takes more than
    the device's memory: refused before anything is allocated. (A batch that fits but whose
    forward does not is reported by ``out_of_memory_as_error``.)"""
    needed = batch_size * math.prod(input_size) * torch.empty((), dtype=dtype).element_size()
    memory = _memory_bytes(device)
    if memory is not None and needed > memory:
        shape = 'x'.join(map(str, input_size))
        raise ValueError(f'{option} {batch_size}: the input batch alone ({batch_size} images of {shape}, '
                         f'{str(dtype).replace("torch.", "")}) takes {_gib(needed)}, more than the {_gib(memory)} '
                         f'of memory of {device}')


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)   # the CPU allocator's RuntimeError: "... can't allocate memory" / "not enough memory"
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or 'not enough memory' in text)


@contextlib.contextmanager
def out_of_memory_as_error(batch_size: int, device: torch.device, option: str = '--batch-size') -> Iterator[None]:
    """Running out of memory inside becomes a one-line ValueError naming ``option``."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (_is_out_of_memory(e) or isinstance(e, MemoryError)):
            raise
        raise ValueError(f'{option} {batch_size} does not fit in the memory of {device} '
                         f'({one_line(str(e), limit=200)}): use a smaller one') from e


def hub_weights(pretrained_cfg) -> Optional[Tuple[str, Optional[str], Tuple[str, ...]]]:
    """(repository, revision, the file names timm tries) where timm would load ``pretrained_cfg``'s
    weights from the Hugging Face Hub; None where they come from elsewhere (a file, a URL)."""
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, 'to_dict') else dict(pretrained_cfg or {})
    load_from, location = _resolve_pretrained_source(cfg)
    if load_from != 'hf-hub':
        return None
    hub_id, filename = location if isinstance(location, (list, tuple)) else (location, HF_WEIGHTS_NAME)
    repo_id, revision = hf_split(hub_id)
    return repo_id, revision, (*_get_safe_alternatives(filename), filename)


def _cached(repo_id: str, revision: Optional[str], filenames: Sequence[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in filenames)


def hub_unreachable(repo_id: str, revision: Optional[str], filenames: Sequence[str]) -> Optional[str]:
    """Why these Hub weights cannot be had: not in the local cache, and huggingface_hub is offline
    (``HF_HUB_OFFLINE``) or one request to the Hub, without retries, gets no answer. None where they
    are cached or the Hub answers (huggingface_hub then does as it always does)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError
    if _cached(repo_id, revision, filenames):
        return None
    if constants.HF_HUB_OFFLINE:
        return 'HF_HUB_OFFLINE is set'
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filenames[0], revision=revision))   # one request, no retries
    except HfHubHTTPError:
        return None   # the Hub answered (not found, gated, ...): timm reports it
    except Exception as e:  # noqa: BLE001  (no answer: refused, timed out, no route, proxy, TLS)
        return f'the Hub ({constants.ENDPOINT}) cannot be reached: {type(e).__name__}: {one_line(str(e), limit=160)}'
    return None


@contextlib.contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """huggingface_hub offline for the duration, as under ``HF_HUB_OFFLINE=1``: cached files only,
    no request (and none of its retries, which take a minute where no network answers)."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def missing_weights_message(model_name: str, repo_id: str, why: str) -> str:
    return (f'--pretrained: the weights of {model_name} ({repo_id} on the Hugging Face Hub) are not in the local '
            f'cache and {why}: download them once where the Hub can be reached (hf download {repo_id}), '
            f'or set HF_HUB_CACHE to a cache that holds them')
