"""docs/design.md stays true where a test can tell: every file it names exists (the file-ownership
table among them), and its list of the functions FX keeps whole is the opaque module's."""
import re
from pathlib import Path

import timm_evit.opaque as opaque

ROOT = Path(__file__).resolve().parents[1]
DESIGN = (ROOT / 'docs' / 'design.md').read_text()
# files of timm's own repository that the document names as such, not ours
TIMM_FILES = {'train.py', 'validate.py'}


def test_every_file_the_design_document_names_exists():
    ours = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob('*.py') if '.venv' not in p.parts}
    named = set(re.findall(r'`([A-Za-z0-9_/.]+\.py)`', DESIGN)) - TIMM_FILES
    assert named
    missing = [name for name in sorted(named) if not any(path == name or path.endswith('/' + name) for path in ours)]
    assert not missing, f'docs/design.md names files that do not exist: {missing}'


def test_the_fx_leaf_list_is_the_opaque_module_s():
    sentence = DESIGN[DESIGN.index('`register_notrace_function` ('):]
    sentence = sentence[:sentence.index(')')]
    listed = set(re.findall(r'`([a-z_]+)`', sentence)) - {'register_notrace_function'}
    assert listed == set(opaque.__all__)


def package_imports(path: Path, package: str) -> set:
    """The modules of ``package`` that the file ``path`` (one of its modules) imports, anywhere in it."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split('.')[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update(alias.name for alias in node.names)
    return found & {p.stem for p in path.parent.glob('*.py')}


def test_the_tools_import_one_another_without_a_circle():
    # docs/design.md, tools/: measuring, data and reporting each in a module of its own, imports one way
    tools = ROOT / 'timm_evit' / 'tools'
    graph = {p.stem: package_imports(p, 'tools') - {p.stem} for p in tools.glob('*.py')}
    assert graph['measure'] <= {'_io', 'files', 'preflight'} and 'report' not in graph['bench'] | graph['sweep']
    done, path = set(), []

    def visit(module):
        assert module not in path, f'import circle: {" -> ".join(path[path.index(module):] + [module])}'
        if module in done:
            return
        path.append(module)
        for imported in graph[module]:
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)
