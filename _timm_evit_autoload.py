"""Start-up hook: register timm plugin models the first time ``timm`` is imported.

timm has no plugin discovery of its own, so an unmodified ``train.py`` or ``validate.py`` would
never see models that live in another package. ``timm_evit_autoload.pth`` runs ``install()`` when
the interpreter starts: it puts a finder on ``sys.meta_path`` that waits for ``import timm``,
lets timm import as usual, then imports every module declared under the ``timm.models``
entry-point group. Until then it only compares module names (no torch, no timm, no metadata
scan). A plugin that fails to load (an exception, or even ``sys.exit``) is a warning, never a
crash, also under ``python -W error``.

Switch it off with the environment variable ``TIMM_EVIT_AUTOLOAD=0``.
"""
import os
import sys

ENTRY_POINT_GROUP = 'timm.models'
ENV_SWITCH = 'TIMM_EVIT_AUTOLOAD'


def _warn(message: str) -> None:
    """A RuntimeWarning; printed to stderr where warnings are errors (``python -W error``), where
    raising would break the ``import timm`` this hook runs inside."""
    import warnings
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Exception:  # the warning itself, raised by the warnings filter
        try:
            sys.stderr.write(f'RuntimeWarning: {message}\n')
        except Exception:  # no usable stderr: nothing more to do
            pass


def load_plugins() -> None:
    """Import every module declared under the ``timm.models`` entry-point group."""
    from importlib.metadata import entry_points
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as e:  # a broken distribution's metadata must not break `import timm`
        _warn(f'timm plugins were not loaded: reading entry points failed: {e!r}')
        return
    for ep in eps:
        try:
            ep.load()
        except (Exception, SystemExit) as e:  # a plugin calling sys.exit() must not end the interpreter
            _warn(f'timm plugin {ep.name!r} ({ep.value}) failed to load and its models are not registered: {e!r}')


class _TimmLoader:
    """Wraps timm's own loader: runs it, restores it, then loads the plugins."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        load_plugins()


class _TimmImportFinder:
    """One-shot meta-path finder that notices the first ``import timm``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        self.uninstall()
        try:
            from importlib.util import find_spec
            spec = find_spec('timm')
        except Exception:
            return None  # let the regular import machinery report it
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        spec.loader = _TimmLoader(spec.loader)
        return spec

    def uninstall(self):
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def install() -> None:
    """Called from the .pth file at start-up; never raises."""
    try:
        if not enabled() or any(isinstance(f, _TimmImportFinder) for f in sys.meta_path):
            return
        if 'timm' in sys.modules:  # imported before site ran (unusual): register now
            load_plugins()
            return
        sys.meta_path.insert(0, _TimmImportFinder())
    except Exception as e:
        _warn(f'timm_evit autoload hook not installed: {e!r}')
