"""``benchmarks/gpu.sh``, the one command a session with a GPU runs (BENCHMARKS.md, "GPU"), run on
the CPU at toy sizes (``GPU_SH_SMOKE=1``): every step's commands parse and run, so that no typo
waits for a device; and its budget skips what would not fit. The numbers mean nothing here."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ('tests', 'sdpa', 'eager', 'profile', 'compile', 'cudagraphs', 'train')


def run_gpu_script(tmp_path, *steps, budget_s=900):
    results = tmp_path / 'gpu.md'
    env = dict(os.environ, GPU_SH_SMOKE='1', PYTHON=sys.executable, GPU_SH_BUDGET_S=str(budget_s))
    env.pop('TIMM_SCRIPTS', None)
    proc = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu.sh'), str(results), *steps], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    return proc, results.read_text() if results.exists() else ''


def test_every_step_runs_on_the_cpu(tmp_path):
    proc, text = run_gpu_script(tmp_path)
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]
    assert text.startswith('# benchmarks/gpu.sh ') and 'torch ' in text
    for step in STEPS:
        assert f'\n## {step}\n' in text, step
    assert 'Traceback' not in text and '(exit ' not in text and '(skipped: ' not in text
    # every bench ran to its table: 8 eager (2 batches x 2 models x 2 fusions), 2 compiled, 1 CUDA graphs
    assert text.count('| model | attn | keep_rate |') == 11
    for name in ('evit_deit_small_patch16_224', 'evit_vit_base_patch16_siglip_224'):   # size-aware, and
        assert f'| {name} | fused | 0.7 | size |' in text
    for name in ('evit_deit_small', 'evit_vit_base_patch16_siglip_224'):   # the paper's fusion ('yes')
        assert f'| {name} | fused | 0.7 | yes |' in text
    assert "fusion 'paper'" in text and "fusion 'size'" in text     # the SDPA kernels per fusion, the profile
    assert 'bias in the keys' in text
    assert "(not run: TIMM_SCRIPTS must name" in text               # train needs timm's scripts


def test_a_step_the_budget_cannot_hold_is_skipped_and_said(tmp_path):
    proc, text = run_gpu_script(tmp_path, 'sdpa', 'compile', budget_s=10)
    assert proc.returncode == 0, text
    assert text.count('(skipped: ') == 2 and 'run it again by name' in text
    assert 'bias in the keys' not in text


def test_an_unknown_step_is_refused(tmp_path):
    proc, text = run_gpu_script(tmp_path, 'eagr', budget_s=10)
    assert proc.returncode == 2 and 'unknown step eagr' in proc.stdout
