"""Output files: checked before the long work, written all whole or none at all; the optional plotting import."""
import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, List, Mapping

__all__ = ['OutputError', 'pyplot', 'check_writable', 'write_all_whole', 'write_whole', 'save_figure_whole',
           'figure_writer', 'file_mode', 'folder_mode']

Writer = Callable[[BinaryIO], None]   # writes one file's bytes


class OutputError(OSError, ValueError):
    """An output file that cannot be written (disk full, permissions), named in the message: an
    OSError, and a ValueError as the commands report a user's mistakes (as io.UnsupportedOperation)."""


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a RuntimeError that says what to install."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'timm-evit[plot]'") from e
    return plt


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~_umask()


def check_writable(path: str, argument: str, folder: bool = False) -> None:
    """A ValueError naming ``argument`` unless ``path`` can be written later: a file (or with
    ``folder``, a folder) whose folder exists and takes files, or can be created where the nearest
    existing folder takes them. Nothing is left behind: run it before long work, not instead of
    handling errors while writing."""
    target = os.path.abspath(path)
    if not folder and os.path.isdir(target):
        raise ValueError(f'{argument} {path!r} is a folder; give a file name')
    existing = target if folder else os.path.dirname(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f'{argument} {path!r} cannot be written: {existing!r} is not a folder')
    try:  # try it rather than trusting permission bits (ACLs, read-only mounts, root)
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.tmp-')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f'{argument} {path!r} cannot be written: {e}') from e


def _make_folders(folder: str) -> List[str]:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created = []
    try:
        for f in reversed(missing):
            os.mkdir(f)
            created.append(f)
    except OSError:
        _remove_folders(created)
        raise
    return created


def _remove_folders(created: List[str]) -> None:
    for f in reversed(created):
        with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
            os.rmdir(f)


def _write_temporary(path: str, write: Writer) -> str:
    """``write`` into a new temporary file beside ``path``; its name."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp-',
                               suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.chmod(tmp, file_mode())  # mkstemp makes it private; give it the usual permissions
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_all_whole(outputs: Mapping[str, Writer], make_folders: bool = False) -> None:
    """Write every file of ``outputs`` (path -> function writing its bytes), or none of them.

    Each is written to a temporary file beside its target; only when all are written are they
    renamed into place, so readers never see a partial file, nor a partial set (a file written
    before a later one fails is removed again). ``make_folders`` creates missing folders (removed
    again on failure); otherwise a missing folder is an error. An ``OSError`` while writing (disk
    full, permissions) becomes an ``OutputError`` naming the file; any other error propagates as is.
    """
    created, temporaries, renamed = [], {}, []
    try:
        for path in outputs:
            folder = os.path.dirname(os.path.abspath(path))
            if make_folders:
                try:
                    created += _make_folders(folder)
                except OSError as e:
                    raise OutputError(f'cannot create the folder of {path!r}: {e}') from e
            elif not os.path.isdir(folder):
                raise OutputError(f'cannot write {path!r}: folder {folder!r} does not exist')
        for path, write in outputs.items():
            try:
                temporaries[path] = _write_temporary(path, write)
            except OSError as e:
                raise OutputError(f'cannot write {path!r}: {e}') from e
        for path, tmp in temporaries.items():
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OutputError(f'cannot write {path!r}: {e}') from e
            renamed.append(path)
    except BaseException:
        for path, tmp in temporaries.items():
            with contextlib.suppress(OSError):
                os.unlink(path if path in renamed else tmp)
        _remove_folders(created)
        raise


def write_whole(path: str, text: str) -> None:
    """``text`` (UTF-8) to ``path``, written whole or not at all."""
    write_all_whole({path: lambda f: f.write(text.encode('utf-8'))})


def figure_writer(fig, dpi: int = 110) -> Writer:
    """A writer (see ``write_all_whole``) of ``fig`` as PNG."""
    return lambda f: fig.savefig(f, format='png', dpi=dpi)


def save_figure_whole(fig, path: str, dpi: int = 110) -> None:
    write_all_whole({path: figure_writer(fig, dpi)})
