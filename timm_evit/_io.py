"""Output files written whole or not at all, and the optional plotting import."""
import os
import tempfile
from contextlib import contextmanager

__all__ = ['pyplot', 'write_whole', 'save_figure_whole']


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a RuntimeError that says what to install."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'timm-evit[plot]'") from e
    return plt


@contextmanager
def _whole(path: str, mode: str):
    # Write beside the target, then rename over it: readers never see a partial file.
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f'cannot write {path!r}: folder {directory!r} does not exist')
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_whole(path: str, text: str) -> None:
    with _whole(path, 'w') as f:
        f.write(text)


def save_figure_whole(fig, path: str, dpi: int = 110) -> None:
    with _whole(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=dpi)
