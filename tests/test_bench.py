"""The benchmark scripts still run (tiny sizes on CPU; the numbers mean nothing here)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_bench(*argv) -> str:
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_train_step_bench_runs_the_bf16_path_on_cpu():
    out = run_bench("bench/train_step.py", "--configs", "tiny", "--dtype", "bfloat16", "--batch", 1, "--seq", 32,
                    "--iters", 1, "--json")
    assert "| tiny |" in out and "bfloat16" in out and '"ratio"' in out


def test_checkpoint_bench_saves_and_restores_through_the_trainer_checkpoints():
    out = run_bench("bench/checkpoint.py", "--phi15_layers", 0, "--saves", 1)
    assert "| tiny | 0.02 GB |" in out


def test_decode_bench_checks_tokens_and_times_both_frameworks():
    out = run_bench("bench/decode.py", "--configs", "tiny_cpu", "--batches", "2", "--prompt", 8, "--new_tokens", 4,
                    "--iters", 1)
    assert "| tiny_cpu | 1.4M | 2 |" in out
