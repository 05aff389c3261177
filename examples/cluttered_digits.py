"""Build a cluttered-digits ImageFolder from the handwritten digits scikit-learn ships (no download).

Each 8 x 8 digit is scaled up and pasted at a random place on a larger canvas strewn with
fragments of other digits (like the Cluttered MNIST benchmark), so that most patches are
background: the situation EViT is for. A fifth of the digits are held out: validation/ has one
canvas of each, test/ eight more.

    pip install 'timm-evit[examples]'
    python examples/cluttered_digits.py --out data/cluttered_digits
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image


def cluttered_digit(digit: np.ndarray, others: np.ndarray, rng: np.random.Generator, canvas: int = 64,
                    scale: int = 4, fragment_size: int = 2) -> np.ndarray:
    """One canvas (uint8, 0..255): ``digit`` (8 x 8, values 0..16) scaled by ``scale`` at a random
    place, over one ``fragment_size``-square piece of each of ``others`` scaled the same way."""
    image = np.zeros((canvas, canvas), dtype=np.float32)
    side = fragment_size * scale
    for other in others:
        y, x = rng.integers(0, 9 - fragment_size, size=2)
        fragment = np.kron(other[y:y + fragment_size, x:x + fragment_size], np.ones((scale, scale)))
        fy, fx = rng.integers(0, canvas - side + 1, size=2)
        image[fy:fy + side, fx:fx + side] = np.maximum(image[fy:fy + side, fx:fx + side], fragment)
    size = 8 * scale
    py, px = rng.integers(0, canvas - size + 1, size=2)
    big = np.kron(digit, np.ones((scale, scale)))
    image[py:py + size, px:px + size] = np.maximum(image[py:py + size, px:px + size], big)
    return (image / 16 * 255).astype(np.uint8)


def check_options(canvas: int, scale: int, fragments: int, fragment_size: int, copies: int,
                  test_copies: int) -> None:
    if scale < 1 or 8 * scale > canvas:
        raise ValueError(f'scale (--scale) must be >= 1 with 8 * scale <= canvas ({canvas}, --canvas), got {scale}')
    if fragments < 0:
        raise ValueError(f'fragments (--fragments) must be >= 0, got {fragments}')
    if not 1 <= fragment_size <= 8:
        raise ValueError(f'fragment_size (--fragment-size) must be 1 to 8 (digit pixels), got {fragment_size}')
    if copies < 1:
        raise ValueError(f'copies (--copies) must be >= 1, got {copies}')
    if test_copies < 0:
        raise ValueError(f'test_copies (--test-copies) must be >= 0, got {test_copies}')


def build(out: str, canvas: int = 64, scale: int = 4, fragments: int = 4, fragment_size: int = 2,
          val_fraction: float = 0.2, seed: int = 0, copies: int = 8, test_copies: int = 8, digits=None) -> None:
    """An ImageFolder ``out``/{train,validation,test}/<label>/*.png: ``copies`` random canvases of
    each training digit, one of each held-out digit in validation/ (train.py's per-epoch check) and
    ``test_copies`` more of each held-out digit in test/ (a larger held-out set for the final table).
    ``digits``: (images, labels), by default scikit-learn's handwritten digits."""
    check_options(canvas, scale, fragments, fragment_size, copies, test_copies)
    if digits is None:
        from sklearn.datasets import load_digits
        loaded = load_digits()
        digits = (loaded.images, loaded.target)
    images, labels = digits

    def write(split: str, index: int, count: int, rng: np.random.Generator) -> None:
        folder = os.path.join(out, split, str(int(labels[index])))
        os.makedirs(folder, exist_ok=True)
        for copy in range(count):
            others = images[rng.integers(0, len(images), size=fragments)]
            pixels = cluttered_digit(images[index], others, rng, canvas, scale, fragment_size)
            Image.fromarray(pixels).convert('RGB').save(os.path.join(folder, f'{index:04d}_{copy}.png'))

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    num_val = int(len(order) * val_fraction)
    for n, index in enumerate(order):
        if n < num_val:
            write('validation', index, 1, rng)
        else:
            write('train', index, copies, rng)
    if test_copies:  # its own generator, so train/ and validation/ do not depend on test_copies
        test_rng = np.random.default_rng([seed, 1])
        for index in order[:num_val]:
            write('test', index, test_copies, test_rng)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='folder to create (train/, validation/ and test/ inside)')
    parser.add_argument('--canvas', type=int, default=64, help='canvas side in pixels')
    parser.add_argument('--scale', type=int, default=4, help='each 8 x 8 digit is scaled up by this factor')
    parser.add_argument('--fragments', type=int, default=4, help='clutter fragments of other digits per canvas')
    parser.add_argument('--fragment-size', type=int, default=2,
                        help='side of a clutter fragment in digit pixels (1 to 8)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--copies', type=int, default=8, help='random canvases per training digit')
    parser.add_argument('--test-copies', type=int, default=8, help='random canvases per held-out digit in test/')
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f'cluttered_digits.py: --out {args.out!r} is not empty', file=sys.stderr)
        return 2
    try:
        build(args.out, canvas=args.canvas, scale=args.scale, fragments=args.fragments,
              fragment_size=args.fragment_size, seed=args.seed, copies=args.copies,
              test_copies=args.test_copies)
    except ValueError as e:
        print(f'cluttered_digits.py: {e}', file=sys.stderr)
        return 2
    except ImportError:
        print("cluttered_digits.py needs scikit-learn: pip install 'timm-evit[examples]'", file=sys.stderr)
        return 2
    print(f'wrote {args.out}/train, {args.out}/validation' + (f' and {args.out}/test' if args.test_copies else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
