"""Input images as the models take them (8-bit RGB); the optional plotting import. Output files
are written through ``files``."""

__all__ = ['pyplot', 'rgb_image']


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a RuntimeError that says what to install."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'timm-evit[plot]'") from e
    return plt


# Formats whose 32-bit integer PIL images ('I') hold 16-bit samples, 0..65535: older Pillow
# releases open a 16-bit grey PNG as 'I', and a PGM whose maxval is above 255 opens as 'I'.
_SIXTEEN_BIT_FORMATS = ('PNG', 'PPM')
_PIXEL_TYPES = {'i4': '32-bit integers', 'f4': '32-bit floats'}


def rgb_image(image):
    """``image`` (PIL) as the 8-bit RGB image the models' transforms take, or a ValueError saying why not.

    8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV, ...) go through PIL's own
    ``convert('RGB')``. 16-bit grey is scaled to 8 bits (65535 is white): PIL's conversion clips
    it instead, so a 16-bit photo turns white. 32-bit integer and float images have no fixed white
    (0..1, 0..65535, anything): refused rather than guessed.
    """
    import numpy as np
    from PIL import Image, ImageMode
    typestr = ImageMode.getmode(image.mode).typestr
    if typestr.endswith('u2') or (image.mode == 'I' and image.format in _SIXTEEN_BIT_FORMATS):
        pixels = np.asarray(image, dtype=np.float64) * (255 / 65535)
        image = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))
    elif typestr not in ('|u1', '|b1'):
        kind = _PIXEL_TYPES.get(typestr[1:], f'{typestr!r} values')
        raise ValueError(f'its pixels are {kind} (PIL mode {image.mode!r}), with no fixed white to scale to 8 bits: '
                         'save it with 8 or 16 bits per channel')
    try:
        return image.convert('RGB')
    except ValueError as e:  # a mode PIL cannot convert (e.g. La)
        raise ValueError(f'its PIL mode {image.mode!r} has no RGB conversion: {e}') from e
