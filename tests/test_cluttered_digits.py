"""examples/cluttered_digits.py: the canvases it draws and the ImageFolder it writes (no scikit-learn needed)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_SCRIPT = Path(__file__).resolve().parents[1] / 'examples' / 'cluttered_digits.py'
_spec = importlib.util.spec_from_file_location('cluttered_digits', _SCRIPT)
cluttered_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cluttered_digits)


def _digit(seed):
    return np.random.default_rng(seed).integers(1, 17, (8, 8)).astype(np.float64)  # no zero pixel: a visible box


def _placements(image, digit, scale):
    """Every (y, x) where the scaled digit sits whole in ``image`` (clutter under it may only brighten it)."""
    big = (np.kron(digit, np.ones((scale, scale))) / 16 * 255).astype(np.uint8)
    size = big.shape[0]
    return [(y, x) for y in range(image.shape[0] - size + 1) for x in range(image.shape[1] - size + 1)
            if (image[y:y + size, x:x + size] >= big).all()]


def test_a_canvas_without_clutter_is_the_scaled_digit_on_black():
    digit = _digit(0)
    image = cluttered_digits.cluttered_digit(digit, digit[:0], np.random.default_rng(1), canvas=48, scale=3)
    assert image.shape == (48, 48) and image.dtype == np.uint8
    (y, x), = _placements(image, digit, 3)
    assert (image[y:y + 24, x:x + 24] == (np.kron(digit, np.ones((3, 3))) / 16 * 255).astype(np.uint8)).all()
    outside = image.copy()
    outside[y:y + 24, x:x + 24] = 0
    assert not outside.any()


def test_clutter_is_pieces_of_the_other_digits_and_the_digit_stays_whole():
    digit, others = _digit(0), np.stack([_digit(s) for s in (1, 2, 3)])
    scale, fragment_size = 2, 3
    image = cluttered_digits.cluttered_digit(digit, others, np.random.default_rng(4), canvas=64, scale=scale,
                                             fragment_size=fragment_size)
    (y, x), = _placements(image, digit, scale)
    outside = image.astype(int)
    outside[y:y + 16, x:x + 16] = -1
    lit = outside > 0
    assert lit.any()
    # clutter covers at most 3 squares of 6 x 6 pixels, each from one of the other digits' pixel values
    assert lit.sum() <= 3 * (fragment_size * scale) ** 2
    allowed = set((others / 16 * 255).astype(np.uint8).ravel().tolist())
    assert set(outside[lit].tolist()) <= allowed


def test_build_writes_an_imagefolder_with_a_held_out_split(tmp_path):
    images = np.stack([_digit(s) for s in range(10)])
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    cluttered_digits.build(str(tmp_path / 'd'), canvas=32, scale=2, fragments=2, copies=3, test_copies=4,
                           digits=(images, labels))
    train, val, test = (sorted((tmp_path / 'd' / split).glob('*/*.png')) for split in ('train', 'validation', 'test'))
    assert len(val) == 2 and len(train) == 8 * 3 and len(test) == 2 * 4
    held_out = {p.stem[:4] for p in val}
    assert held_out.isdisjoint({p.stem[:4] for p in train})  # no digit in both training and held-out splits
    assert {p.stem[:4] for p in test} == held_out
    assert len({p.read_bytes() for p in test}) == len(test)  # different canvases of the held-out digits
    for path in train + val + test:
        index = int(path.stem[:4])
        assert path.parent.name == str(labels[index])
        with Image.open(path) as im:
            assert im.size == (32, 32) and im.mode == 'RGB'
            assert _placements(np.asarray(im)[..., 0], images[index], 2)


@pytest.mark.parametrize('args, words', [
    (['--scale', '9'], 'scale (--scale) must be >= 1 with 8 * scale <= canvas (64, --canvas), got 9'),
    (['--fragment-size', '0'], 'fragment_size (--fragment-size) must be 1 to 8'),
    (['--fragments', '-1'], 'fragments (--fragments) must be >= 0'),
    (['--copies', '0'], 'copies (--copies) must be >= 1'),
    (['--test-copies', '-1'], 'test_copies (--test-copies) must be >= 0'),
])
def test_bad_options_are_refused_by_name(tmp_path, capsys, args, words):
    assert cluttered_digits.main(['--out', str(tmp_path / 'd'), *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / 'd').exists()


def test_train_and_validation_do_not_depend_on_test_copies(tmp_path):
    images = np.stack([_digit(s) for s in range(10)])
    labels = np.arange(10) % 3
    for test_copies in (0, 5):
        cluttered_digits.build(str(tmp_path / str(test_copies)), canvas=32, scale=2, copies=2,
                               test_copies=test_copies, digits=(images, labels))
    for split in ('train', 'validation'):
        a, b = (sorted((tmp_path / c / split).glob('*/*.png')) for c in ('0', '5'))
        assert [p.name for p in a] == [p.name for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert not (tmp_path / '0' / 'test').exists()


def test_a_folder_that_is_not_empty_is_refused(tmp_path, capsys):
    (tmp_path / 'keep.txt').write_text('mine')
    assert cluttered_digits.main(['--out', str(tmp_path)]) == 2
    assert 'is not empty' in capsys.readouterr().err
