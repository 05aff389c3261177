"""The models are found by `import timm` alone, in fresh interpreters running the installed package."""
import os
import subprocess
import sys
import textwrap


def run_python(code, tmp_path, env=None, args=()):
    full_env = {k: v for k, v in os.environ.items() if k != 'TIMM_EVIT_AUTOLOAD'}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args, '-c', textwrap.dedent(code)], cwd=tmp_path, env=full_env,
        capture_output=True, text=True, timeout=300)


def test_import_timm_alone_registers_and_creates_the_models(tmp_path):
    result = run_python("""
        import timm
        model = timm.create_model('evit_deit_small', keep_rate=0.6)
        print(type(model).__name__, model.keep_rate, sorted(timm.list_models('evit_deit_*')))
        print(timm.create_model('evit_lvvit_s').skip_lam)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == '2.0'      # LV-ViT too, with its residual scaling
    # the paper's names, and timm's DeiT architectures by their own names (evit_<timm name>)
    assert "VisionTransformerEViT (0.6, 0.6, 0.6) ['evit_deit_base', 'evit_deit_base_distilled_patch16_224', " \
           "'evit_deit_base_distilled_patch16_384', 'evit_deit_base_patch16_224'" in result.stdout
    assert "'evit_deit_small', 'evit_deit_small_distilled_patch16_224', 'evit_deit_small_patch16_224'" in result.stdout


def test_start_up_hook_imports_neither_torch_nor_timm(tmp_path):
    result = run_python('import sys; print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "timm_evit")))',
                        tmp_path, args=('-X', 'importtime'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'
    imported = [line.rsplit('|', 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith('import time:')]
    assert '_timm_evit_autoload' in imported                    # the hook ran at start-up...
    assert not {'torch', 'timm', 'importlib.metadata'} & set(imported)  # ...and imported nothing heavy


def test_environment_variable_switches_the_hook_off(tmp_path):
    result = run_python("""
        import timm
        print(timm.list_models('evit_*'))
        import timm_evit  # explicit import still registers
        print(timm.list_models('evit_deit_small'))
    """, tmp_path, env={'TIMM_EVIT_AUTOLOAD': '0'})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:2] == ['[]', "['evit_deit_small']"]


def broken_plugins(tmp_path, modules):
    """A second distribution declaring plugin modules (name -> source) that fail on import; PYTHONPATH for it."""
    dist = tmp_path / 'broken_plugin-1.0.dist-info'
    dist.mkdir()
    (dist / 'METADATA').write_text('Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n')
    (dist / 'entry_points.txt').write_text('[timm.models]\n' + ''.join(f'{m} = {m}_models\n' for m in modules))
    for module, source in modules.items():
        (tmp_path / f'{module}_models.py').write_text(source)
    return os.pathsep.join(p for p in (str(tmp_path), os.environ.get('PYTHONPATH')) if p)


def test_a_broken_plugin_is_a_warning_not_a_crash(tmp_path):
    path = broken_plugins(tmp_path, {'broken': 'raise RuntimeError("boom")\n'})
    result = run_python("""
        import timm
        print(timm.list_models('evit_deit_small'))
    """, tmp_path, env={'PYTHONPATH': path})
    assert result.returncode == 0, result.stderr
    assert "['evit_deit_small']" in result.stdout
    assert "timm plugin 'broken' (broken_models) failed to load" in result.stderr and 'boom' in result.stderr


def test_broken_plugins_are_warnings_under_w_error_and_sys_exit(tmp_path):
    # -W error turns the warning itself into an exception; SystemExit is no Exception
    path = broken_plugins(tmp_path, {'raising': 'raise RuntimeError("boom")\n',
                                     'exiting': 'import sys\nsys.exit("bye")\n'})
    result = run_python("""
        import timm
        print(timm.list_models('evit_deit_small'))
    """, tmp_path, env={'PYTHONPATH': path}, args=('-W', 'error'))
    assert result.returncode == 0, result.stderr
    assert "['evit_deit_small']" in result.stdout
    assert "timm plugin 'raising' (raising_models) failed to load" in result.stderr and 'boom' in result.stderr
    assert "timm plugin 'exiting' (exiting_models) failed to load" in result.stderr and "SystemExit('bye')" in result.stderr


def test_module_names_do_not_collide_with_timms():
    import timm
    import timm_evit  # noqa: F401
    assert not [name for name in timm.list_models(module='deit') if name.startswith('evit_')]
    assert timm.list_models(module='evit_deit') == ['evit_deit_base', 'evit_deit_small', 'evit_deit_tiny']
    assert timm.list_models(module='evit_lvvit') == ['evit_lvvit_m', 'evit_lvvit_s']
