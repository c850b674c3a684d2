"""The benchmark scripts still run (tiny sizes on CPU; the numbers mean nothing here)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_train_step_bench_runs_the_bf16_path_on_cpu():
    result = subprocess.run(
        [sys.executable, "bench/train_step.py", "--configs", "tiny", "--dtype", "bfloat16", "--batch", "1",
         "--seq", "32", "--iters", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tiny |" in result.stdout and "bfloat16" in result.stdout and '"ratio"' in result.stdout
