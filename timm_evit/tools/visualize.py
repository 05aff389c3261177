"""What EViT keeps: per-stage patch masks, traced through every reorganising block, and their drawing."""
import os
from typing import List, Optional, Sequence, Tuple

import torch

from ._io import pyplot, rgb_image
from ..options import KeepRate

__all__ = ['KEPT', 'FUSED', 'DROPPED', 'reorganisation', 'reorganisation_masks', 'masks_figure', 'panel_titles',
           'load_image', 'stage_names', 'picture_names']

KEPT, FUSED, DROPPED = 0, 1, 2  # patch states in the masks


def reorganisation_masks(model, images: torch.Tensor, keep_rate: Optional[KeepRate] = None) -> torch.Tensor:
    """The masks of ``reorganisation``: ``[B, stages, grid_h, grid_w]``."""
    return reorganisation(model, images, keep_rate)[0]


@torch.no_grad()
def reorganisation(model, images: torch.Tensor,
                   keep_rate: Optional[KeepRate] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """State of every patch after each reorganising block, ``[B, stages, grid_h, grid_w]``, and each
    image's token count there, ``[B, stages]`` (at ``keep_rate``; None: the model's own).

    ``KEPT``: the patch still has its own token. ``FUSED``: it is carried by a fused token
    (possibly after several stages: a patch fused once stays fused, even if its fused token is
    kept later). ``DROPPED``: no token carries it (``fuse_token=False``). The model's
    ``forward_intermediates`` traces each patch through all stages, so a patch dropped in the
    first stage is shown dropped in every later one. A model without reorganising blocks
    (``reorg_layers=()``) has no stages: ``[B, 0, grid_h, grid_w]``, the input alone.

    The count is the non-prefix tokens, patch and fused ones.
    """
    was_training = model.training
    model.eval()
    try:
        # every block's trace (timm's indices take at least one block), the reorganising ones read below
        out = model.forward_intermediates(images, output_fmt='NLC', output_dict=True, intermediates_only=True,
                                          keep_rate=keep_rate)
    finally:
        model.train(was_training)
    grid_h, grid_w = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    shape = (images.shape[0], len(model.reorg_layers), grid_h, grid_w)
    masks = torch.empty(shape, dtype=torch.int8, device=images.device)
    counts = torch.empty(shape[:2], dtype=torch.long, device=images.device)
    for stage, layer in enumerate(model.reorg_layers):
        token_patch_ids, patch_token_index = out['token_patch_ids'][layer], out['patch_token_index'][layer]
        counts[:, stage] = token_patch_ids.shape[1]   # patch tokens and the fused one (-1)
        carried = patch_token_index >= 0
        carrier_is_patch = token_patch_ids.gather(1, patch_token_index.clamp(min=0)) >= 0
        state = torch.full_like(patch_token_index, DROPPED)
        state[carried & carrier_is_patch] = KEPT
        state[carried & ~carrier_is_patch] = FUSED
        masks[:, stage] = state.unflatten(1, (grid_h, grid_w))
    return masks, counts


def load_image(path: str):
    """An 8-bit RGB PIL image (see ``rgb_image``: 16-bit images scaled, not clipped), or a
    ValueError that names the file and says why it cannot be read."""
    from PIL import Image, UnidentifiedImageError
    if os.path.isdir(path):
        raise ValueError(f'cannot read image {path!r}: it is a folder; give its image files (e.g. '
                         f'{os.path.join(path, "*.png")})')
    if not os.path.isfile(path):
        raise ValueError(f'cannot read image {path!r}: no such file')
    try:
        with Image.open(path) as img:
            return rgb_image(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f'cannot read image {path!r}: {e}') from e


def masks_figure(image: torch.Tensor, masks: torch.Tensor, stage_names: Sequence[str], title: str = '',
                 token_counts: Optional[Sequence[int]] = None):
    """The input and one panel per stage: kept patches as they are, dropped ones greyed, fused ones
    tinted orange; each panel is titled by ``panel_titles``. ``image`` ``[3, H, W]`` in 0..1,
    ``masks`` ``[stages, gh, gw]``, ``token_counts`` the image's tokens per stage (``reorganisation``;
    None: not shown). A matplotlib figure: close it with ``pyplot().close(fig)``."""
    plt = pyplot()
    height, width = image.shape[-2:]
    panels = [('input', image)]
    grey = torch.full_like(image, 0.5)
    orange = torch.tensor([1.0, 0.55, 0.0]).view(3, 1, 1).expand_as(image)
    for name, mask in zip(panel_titles(masks, stage_names, token_counts), masks):
        state = torch.nn.functional.interpolate(mask[None, None].float(), size=(height, width), mode='nearest')[0]
        shown = torch.where(state == DROPPED, 0.25 * image + 0.75 * grey, image)
        shown = torch.where(state == FUSED, 0.4 * image + 0.6 * orange, shown)
        panels.append((name, shown))
    # squeeze=False: a model without reorganising blocks has the input panel alone
    # two-line panel titles (with token counts) take a line more, which tight_layout leaves to the suptitle
    fig_height = 2.9 + (0.15 if token_counts is not None else 0.)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), fig_height), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(name, fontsize=8)
        ax.axis('off')
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.2 / fig_height) if title and token_counts is not None else None)
    return fig


def panel_titles(masks: torch.Tensor, stage_names: Sequence[str],
                 token_counts: Optional[Sequence[int]] = None) -> List[str]:
    """One title per stage of one image's ``masks`` ``[stages, gh, gw]``: its tokens there (where
    ``token_counts`` are given), the patches kept with a token
    of their own, and those its fused tokens stand for (their size): 'block 3: 72 tokens' over '71
    kept, 125 fused' (two lines: a panel is narrow)."""
    titles = []
    for stage, (name, mask) in enumerate(zip(stage_names, masks)):
        kept, fused = int((mask == KEPT).sum()), int((mask == FUSED).sum())
        tokens = '' if token_counts is None else f'{int(token_counts[stage])} tokens\n'
        titles.append(f'{name}: {tokens}{kept} kept' + (f', {fused} fused' if fused else ''))
    return titles


def stage_names(model) -> List[str]:
    return [f'block {layer}' for layer in model.reorg_layers]


def picture_names(image_paths: Sequence[str], suffix: str = '_evit.png') -> List[str]:
    """One file name per image: its name without extension plus ``suffix``. Images that share a
    name (``a/cat.png b/cat.png``) get ``_1``, ``_2``, ... in the order given (``cat_evit.png``,
    ``cat_1_evit.png``), so that no picture of one run overwrites another, even on a file system
    that ignores case."""
    taken, names = set(), []
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = stem, 0
        while name.casefold() in taken:
            n += 1
            name = f'{stem}_{n}'
        taken.add(name.casefold())
        names.append(name + suffix)
    return names
