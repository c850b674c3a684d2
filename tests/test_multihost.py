"""2 processes x 4 CPU devices through launch/local.sh give the single-process losses."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train import make_batches, run_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent


def launch(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(ROOT / "launch" / "local.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_two_processes_give_the_single_process_losses(mesh_shape):
    result = launch("-n", "2", "-d", "4", "--command", "--", sys.executable, "-m", "tests.multihost_steps",
                    json.dumps(mesh_shape))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if "LOSSES " in line)
    report = json.loads(line.split("LOSSES ", 1)[1])
    assert report["processes"] == 2 and report["rows"] == 4
    expected, _ = run_steps({"data": 1}, make_batches(3), devices=jax.devices()[:1])
    np.testing.assert_allclose(report["losses"], expected, rtol=1e-4)


def test_a_failing_process_fails_the_launch():
    result = launch("-n", "2", "--command", "--", sys.executable, "-c",
                    "import os, sys, time; sys.exit(3) if os.environ['PHI_JAX_PROCESS_ID'] == '1' else time.sleep(60)",
                    timeout=30)
    assert result.returncode == 3
    assert "a process failed (exit 3)" in result.stderr


def test_dry_run_prints_each_process_command():
    result = launch("-n", "2", "-d", "4", "--dry-run", "--", "train", "--gin_file=experiments/tiny_cpu.gin")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2
    assert "PHI_JAX_PROCESS_ID=1" in lines[1] and "phi-jax train --gin_file=experiments/tiny_cpu.gin" in lines[1]
    assert "--xla_force_host_platform_device_count=4" in lines[0]
