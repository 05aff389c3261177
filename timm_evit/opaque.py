"""The functions FX tracing keeps whole (docs/design.md, "Layers and file ownership"): each branches
on its input's shape or values (token counts, layouts, checks), which a symbolic trace cannot follow.

One home for them: ``torch.fx.wrap`` patches a name in the module that declares it, so every
caller calls them through this module (``opaque.reorganize(...)``), where the patch is
seen; ``register_notrace_function`` makes timm's feature extraction keep them whole too.

timm's own FX leaves (e.g. ``resample_abs_pos_embed``, which ``_pos_embed`` calls under
``dynamic_img_size``) are kept whole in the timm modules whose code EViT's forward runs
(``keep_timm_leaves_whole_in``).
"""
from typing import Optional, Tuple

from types import ModuleType

import torch
import timm.models.deit
import timm.models.eva
import timm.models.vision_transformer
from timm.models import get_notrace_functions, register_notrace_function

from .reorg import (
    mean_received_attention, reorganize, rotary_rows_for_tokens, log_sizes_after,
    trace_patch_token_index,
    trace_token_patch_ids,
)

__all__ = [
    'check_image_batch', 'check_attention_mask', 'check_patch_grid', 'mean_received_attention',
    'reorganize', 'trace_token_patch_ids', 'trace_patch_token_index', 'log_sizes_after',
    'rotary_rows_for_tokens',
]


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'x must be a torch.Tensor of images [B, {in_chans}, H, W], got {type(x).__name__}')
    if x.ndim != 4:
        raise ValueError(f'x must be a batch of images [B, {in_chans}, H, W] (4 dims), got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'x must have {in_chans} channels (in_chans), got shape {tuple(x.shape)}')


def check_attention_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, reorganises: bool) -> None:
    if (attn_mask is not None or is_causal) and reorganises:
        # A mask is laid out for the tokens entering the blocks; reorganised tokens have no place in it.
        raise ValueError('attn_mask / is_causal need keep_rate=1.0: EViT changes the number and order of '
                         'tokens, so a mask for the input tokens does not fit the blocks after a reorganisation')


def check_patch_grid(num_patches: int, grid_size: Tuple[int, int]) -> None:
    if num_patches != grid_size[0] * grid_size[1]:
        # timm's patch dropout (training only) removed patches before the blocks: no full grid to fill
        raise ValueError(f"output_fmt='NCHW' needs every patch of the {grid_size[0]}x{grid_size[1]} grid entering the "
                         f"blocks, got {num_patches} (patch dropout in training removes patches): use "
                         "output_fmt='NLC', or the model in eval()")


for _function in (check_image_batch, check_attention_mask, check_patch_grid, mean_received_attention,
                  reorganize, trace_token_patch_ids, trace_patch_token_index, log_sizes_after,
                  rotary_rows_for_tokens):
    torch.fx.wrap(_function.__name__)       # (at module level, as torch.fx.wrap requires)
    register_notrace_function(_function)
del _function


def keep_timm_leaves_whole_in(module: ModuleType) -> None:
    """Make FX keep timm's notrace functions whole where ``module``'s own code calls them.

    timm's tracer patches them in the globals of the forward it traces and of each submodule it
    calls; an EViT model's forward is this package's, so timm's family module, where e.g.
    ``_pos_embed`` finds ``resample_abs_pos_embed``, would go unpatched and its shape branches
    would fail the trace. ``torch.fx.wrap`` patches a name, in every trace, in the globals of the
    module it is called at the top of: hence the call run in ``module``'s namespace."""
    leaves = {id(function) for function in get_notrace_functions()}
    for name, value in list(vars(module).items()):
        if id(value) in leaves:
            exec(f'__import__("torch").fx.wrap({name!r})', vars(module))


# the timm modules of the classes EViT serves (convert.EVIT_CLASSES; LV-ViT is a VisionTransformer)
for _module in (timm.models.vision_transformer, timm.models.deit, timm.models.eva):
    keep_timm_leaves_whole_in(_module)
del _module
