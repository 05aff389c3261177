"""The ``timm-evit`` command's entry point (pyproject.toml, ``[project.scripts]``).

Every command imports torch and timm first, which takes seconds. This module imports only the
standard library before it takes over Ctrl-C and SIGTERM for those seconds, so that a signal then
also ends in one line and exit code 130 or 143, as it does later (``timm_evit.tools.cli.main``),
not in a traceback of the import or in silence. While importing, nothing has been written yet, so
the process ends at once: an exception raised there could be taken by an import that catches
everything (some do), and the command would run on.
"""
import os
import signal
import sys

COMMANDS = ('bench', 'visualize', 'sweep', 'export')
EXIT_CODES = {signal.SIGINT: (128 + int(signal.SIGINT), 'interrupted'),
              signal.SIGTERM: (128 + int(signal.SIGTERM), 'terminated')}


def _prefix(argv) -> str:
    """``timm-evit COMMAND`` as the command's own messages begin, from the arguments not yet parsed."""
    command = next((a for a in argv if not a.startswith('-')), None)
    return f'timm-evit {command}' if command in COMMANDS else 'timm-evit'


def _end_while_importing(argv):
    prefix = _prefix(argv)

    def handler(signum, frame):
        code, word = EXIT_CODES[signum]
        os.write(2, f'{prefix}: {word}\n'.encode())   # not through sys.stderr, which the import may be writing to
        os._exit(code)
    return handler


def main() -> int:
    argv = sys.argv[1:]
    handler = _end_while_importing(argv)
    # A signal the caller ignores (SIGINT in a shell's background job) stays ignored.
    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    for s, was in previous.items():
        if was is not signal.SIG_IGN:
            signal.signal(s, handler)
    from timm_evit.tools.cli import main as run_command
    for s, was in previous.items():   # from here on, the command's own handling (cli.main)
        signal.signal(s, was)
    return run_command(argv)


if __name__ == '__main__':
    sys.exit(main())
