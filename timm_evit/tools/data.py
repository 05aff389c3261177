"""Images for sweep and bench: timm's ImageFolder dataset of a split (found as timm finds it), its
files, its loader with the model's eval transform, and the first images of it."""
import os
from typing import List, Optional, Sequence

import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM

from ._io import rgb_image
from .preflight import check_batch_fits

__all__ = ['TRAIN_SPLITS', 'EVAL_SPLITS', 'KNOWN_SPLITS', 'split_folder', 'image_files', 'load_image_folder',
           'with_rgb_images', 'eval_data_config', 'image_loader', 'first_images']

# timm's create_dataset looks for these folders for a split of these names: its own synonyms
TRAIN_SPLITS = tuple(_TRAIN_SYNONYM)


EVAL_SPLITS = tuple(_EVAL_SYNONYM)


KNOWN_SPLITS = TRAIN_SPLITS + EVAL_SPLITS + ('test', 'testing')


def split_folder(data_dir: str, split: str) -> str:
    """The folder of ``split`` in ``data_dir``, found as timm's create_dataset finds it (the
    split's own name, then its synonyms); ``data_dir`` itself if it holds class folders only and
    ``split`` is a validation split. timm would otherwise evaluate the whole root silently."""
    for name in (split, *_synonyms(split)):
        if os.path.isdir(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    splits = sorted(n for n in os.listdir(data_dir) if n in KNOWN_SPLITS and os.path.isdir(os.path.join(data_dir, n)))
    if splits:
        raise ValueError(f'--data-dir {data_dir!r} has no split {split!r}: it has {", ".join(splits)} (--split)')
    if split not in EVAL_SPLITS:
        raise ValueError(f'--data-dir {data_dir!r} has no split {split!r}: it has no split folders; its class '
                         f'folders are evaluated as they are only with a validation --split ({", ".join(EVAL_SPLITS)})')
    return data_dir


def _synonyms(split: str) -> Sequence[str]:
    return TRAIN_SPLITS if split in TRAIN_SPLITS else EVAL_SPLITS if split in EVAL_SPLITS else ()


def _image_dataset(data_dir: str, split: str):
    """timm's ImageFolder dataset of ``split`` (see ``split_folder``), images not yet read: timm's
    conversion to RGB clips 16-bit images, so ``load_image_folder`` converts them itself."""
    if not os.path.isdir(data_dir):
        raise ValueError(f'--data-dir {data_dir!r} is not a folder')
    root = split_folder(data_dir, split)
    try:
        dataset = create_dataset('', root=root, split=split, search_split=False, input_img_mode='')
    except RuntimeError as e:  # timm's ImageFolder reader finds no images
        raise ValueError(f'--data-dir {data_dir!r} (split {split!r}) holds no images: {e}') from e
    if len(dataset) == 0:
        raise ValueError(f'--data-dir {data_dir!r} (split {split!r}) holds no images')
    return dataset


def image_files(data_dir: str, split: str) -> List[str]:
    """The image files ``load_image_folder`` reads, without reading them."""
    return [path for path, _ in _image_dataset(data_dir, split).reader.samples]


def load_image_folder(data_dir: str, split: str):
    """timm's ImageFolder dataset of ``split`` (see ``split_folder``), with clear errors for a bad
    path, a missing split, no images, or files that cannot be decoded or have no 8-bit RGB
    equivalent (see ``rgb_image``). It yields 8-bit RGB images: ``with_rgb_images`` puts the
    conversion in front of the transform a loader gives it."""
    dataset = _image_dataset(data_dir, split)
    _require_decodable(dataset.reader.samples, data_dir)
    return dataset


def _require_decodable(samples, data_dir: str) -> None:
    """A ValueError naming up to three of the ``samples`` (path, target) that cannot be decoded."""
    unreadable = []
    for path, _ in samples:
        reason = _decoding_error(path)
        if reason:
            unreadable.append(f'{path}: {reason}')
    if unreadable:
        raise ValueError(f'{len(unreadable)} unreadable image(s) in {data_dir!r}, e.g. ' + '; '.join(unreadable[:3]))


def _decoding_error(path: str) -> Optional[str]:
    # timm skips a sample it cannot decode and silently serves the next one: that would bias the
    # accuracy, so every image is decoded (and converted) once up front (opening reads only the
    # header: a truncated JPEG opens fine and fails in load()).
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            rgb_image(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # SyntaxError: some broken headers
        return str(e)
    return None


def with_rgb_images(dataset) -> None:
    """Put ``rgb_image`` in front of ``dataset``'s transform (as timm's ``create_loader`` set it)."""
    from torchvision import transforms
    dataset.transform = transforms.Compose([rgb_image] + ([dataset.transform] if dataset.transform else []))


def eval_data_config(model, crop_pct: Optional[float] = None) -> dict:
    """timm's eval data config of ``model`` at the input size it was built with (``img_size=...``
    changes it; the pretrained_cfg still names the default size), ``crop_pct`` if given."""
    input_size = (model.in_chans, *model.patch_embed.img_size)
    return resolve_data_config({'input_size': input_size, 'crop_pct': crop_pct}, model=model)


def image_loader(dataset, data_config: dict, batch_size: int, workers: int = 0):
    """timm's eval loader (``create_loader``, CPU, no prefetcher) of ``dataset`` (``load_image_folder``'s)
    through ``data_config``'s transform, the images converted to 8-bit RGB first (``with_rgb_images``):
    the one pipeline of sweep and bench."""
    check_batch_fits(min(batch_size, len(dataset)), data_config['input_size'], torch.float32, torch.device('cpu'))
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'], num_workers=workers,
        use_prefetcher=False, device=torch.device('cpu'), persistent_workers=False)
    with_rgb_images(dataset)
    return loader


def first_images(model, data_dir: str, split: str, count: int, crop_pct: Optional[float] = None) -> torch.Tensor:
    """The first ``count`` images of ``split`` of the ImageFolder ``data_dir`` (timm's order: class
    folders sorted), as ``model`` sees them in evaluation (``eval_data_config``): ``[count, C, H, W]``
    fp32. Only those images are decoded; a ValueError where the split holds fewer (a measurement at
    ``--batch-size`` needs that many)."""
    dataset = _image_dataset(data_dir, split)
    if len(dataset) < count:
        raise ValueError(f'--data-dir {data_dir!r} (split {split!r}) holds {len(dataset)} image(s), fewer than '
                         f'--batch-size {count}: give a smaller --batch-size or more images')
    _require_decodable(dataset.reader.samples[:count], data_dir)
    images, _ = next(iter(image_loader(dataset, eval_data_config(model, crop_pct), count)))
    return images
