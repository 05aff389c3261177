"""Output files: checked before the long work (writable, never an input), written all whole or
none at all (temporary files beside them, renamed once every one is written). The commands and
``weights/hub.py`` write their files through these."""
import contextlib
import os
import secrets
import signal
import stat
import sys
import tempfile
from typing import BinaryIO, Callable, List, Mapping, Optional, Sequence

__all__ = ['Writer', 'OutputError', 'check_writable', 'same_file_as', 'write_all_whole', 'figure_writer', 'file_mode',
           'folder_mode', 'create_folders', 'remove_folders', 'quiet_broken_pipe']

Writer = Callable[[BinaryIO], None]   # writes one file's bytes


class OutputError(OSError, ValueError):
    """An output file that cannot be written (disk full, permissions), named in the message: an
    OSError, and a ValueError as the commands report a user's mistakes (as io.UnsupportedOperation)."""


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
    if not folder:
        _require_regular_or_absent(path, ValueError, argument)
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


def _require_regular_or_absent(path: str, error: type, argument: str = '') -> None:
    """``error`` unless ``path`` is absent or a regular file (links followed): the rename that writes
    a file would put a regular file in the place of a device, a FIFO or a socket (as root, over
    /dev/null itself)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not os.path.lexists(path):
            return
        mode = None   # a dangling link: the rename would replace the link, not write its target
    except OSError:
        return        # unreadable: writing it reports why
    if mode is None or not stat.S_ISREG(mode):
        what = 'a link to nothing' if mode is None else f'a {_file_type(mode)}'
        raise error(f'{argument + " " if argument else ""}{path!r} is not a regular file ({what}): '
                    'give the path of a new or ordinary file')


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, 'character device'), (stat.S_ISBLK, 'block device'), (stat.S_ISFIFO, 'FIFO'),
                       (stat.S_ISSOCK, 'socket'), (stat.S_ISDIR, 'folder')):
        if test(mode):
            return name
    return 'special file'


def same_file_as(path: str, inputs: Sequence[str]) -> Optional[int]:
    """The index of the first of ``inputs`` that ``path`` is (the same file: its own path, a
    symbolic or hard link, compared by device and inode), or None."""
    def identity(p):
        try:
            st = os.stat(p)
        except (OSError, ValueError):  # missing: nothing there to write over
            return None
        return st.st_dev, st.st_ino
    target = identity(path)
    if target is None:
        return None
    return next((i for i, p in enumerate(inputs) if identity(p) == target), None)


def create_folders(folder: str) -> List[str]:
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
        remove_folders(created)
        raise
    return created


def remove_folders(created: List[str]) -> None:
    """Remove the folders ``create_folders`` created, innermost first, each only if still empty."""
    for f in reversed(created):
        with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
            os.rmdir(f)


def _temporary_name(path: str) -> str:
    """A new hidden name beside ``path`` (its suffix kept, as some writers want it)."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f'.tmp-{secrets.token_hex(8)}{os.path.splitext(path)[1]}')


def _write_new(tmp: str, write: Writer) -> None:
    """``write`` into the new file ``tmp`` (never an existing one), with the usual permissions."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
    with os.fdopen(fd, 'wb') as f:
        write(f)


def write_all_whole(outputs: Mapping[str, Writer], make_folders: bool = False) -> None:
    """Write every file of ``outputs`` (path -> function writing its bytes), or none of them.

    Each is written to a temporary file beside its target; only when all are written are they
    renamed into place, so readers never see a partial file, nor a partial set (a file written
    before a later one fails is removed again). ``make_folders`` creates missing folders (removed
    again on failure); otherwise a missing folder is an error. An ``OSError`` while writing (disk
    full, permissions) becomes an ``OutputError`` naming the file; any other error propagates as is.
    An interrupt (KeyboardInterrupt, or any exception a signal handler raises) at any point leaves
    no temporary file: each is named, and its cleanup in place, before it is created.
    """
    created, temporaries, renamed = [], {}, []
    try:
        for path in outputs:
            _require_regular_or_absent(path, OutputError)
            folder = os.path.dirname(os.path.abspath(path))
            if make_folders:
                try:
                    created += create_folders(folder)
                except OSError as e:
                    raise OutputError(f'cannot create the folder of {path!r}: {e}') from e
            elif not os.path.isdir(folder):
                raise OutputError(f'cannot write {path!r}: folder {folder!r} does not exist')
        for path, write in outputs.items():
            while path not in temporaries:
                temporaries[path] = _temporary_name(path)
                try:
                    _write_new(temporaries[path], write)
                except FileExistsError:  # the name is taken (never by chance in practice): not ours to remove
                    del temporaries[path]
                except OSError as e:
                    raise OutputError(f'cannot write {path!r}: {e}') from e
        for path, tmp in temporaries.items():
            renamed.append(path)   # before the rename: the cleanup tells by the temporary file whether it happened
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OutputError(f'cannot write {path!r}: {e}') from e
    except BaseException:
        for path, tmp in temporaries.items():
            with contextlib.suppress(OSError):
                if os.path.lexists(tmp):   # not renamed (or never created: then nothing is there)
                    os.unlink(tmp)
                elif path in renamed:      # renamed into place: written over whatever was there, so removed
                    os.unlink(path)
        remove_folders(created)
        raise


def figure_writer(fig, dpi: int = 110) -> Writer:
    """A writer (see ``write_all_whole``) of ``fig`` as PNG."""
    return lambda f: fig.savefig(f, format='png', dpi=dpi)


def quiet_broken_pipe() -> int:
    """The exit of a command whose reader went away (``timm-evit ... | head``): stdout pointed at
    the null device, so that no traceback follows (nor one more when Python flushes stdout at exit),
    and the exit code a shell gives SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + int(signal.SIGPIPE)
