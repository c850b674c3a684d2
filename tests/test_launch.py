"""launch/: 2 processes x 4 CPU devices match the single-process losses; SIGTERM reaches each process
once; a URL DATA_DIR is refused (every process reads it as a filesystem path); the pod and SLURM
launchers."""

import json
import os
import pathlib
import signal
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


def test_sigterm_reaches_each_process_once_and_a_clean_stop_exits_0():
    # Each process acts as phi-jax does: the first SIGTERM means save and exit 0, a second exit at once.
    program = ("import signal, sys, time\n"
               "count = []\n"
               "signal.signal(signal.SIGTERM, lambda *_: count.append(1))\n"
               "print('ready', flush=True)\n"
               "while not count: time.sleep(0.01)\n"
               "time.sleep(0.5)\n"
               "print(f'SIGTERM x{len(count)}', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([str(ROOT / "launch" / "local.sh"), "-n", "2", "--command", "--", sys.executable,
                                "-c", program], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    ready = 0
    while ready < 2:
        line = process.stdout.readline()
        assert line, "a process ended before it was ready"
        ready += line.endswith("ready\n")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert sorted(line for line in output.splitlines() if "SIGTERM" in line) == ["[0] SIGTERM x1", "[1] SIGTERM x1"]


def test_dry_run_prints_each_process_command():
    result = launch("-n", "2", "-d", "4", "--dry-run", "--", "train", "--gin_file=experiments/tiny_cpu.gin")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2
    assert "PHI_JAX_PROCESS_ID=1" in lines[1] and "phi-jax train --gin_file=experiments/tiny_cpu.gin" in lines[1]
    assert "--xla_force_host_platform_device_count=4" in lines[0]


def test_tpu_pod_dry_run_runs_the_same_command_on_every_worker():
    result = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), "--tpu", "v5e-64", "--zone", "us-west4-a",
                             "--dry-run", "--", "train", "--gin_file=experiments/phi15.gin", "--workdir=/mnt/gcs/run"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gcloud compute tpus tpu-vm ssh v5e-64 --zone us-west4-a --worker=all")
    assert "phi-jax\\ train\\ --gin_file=experiments/phi15.gin\\ --workdir=/mnt/gcs/run" in result.stdout


def test_tpu_pod_needs_a_tpu_name():
    result = subprocess.run([str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run", "--", "train"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--tpu and --zone are required" in result.stderr


def test_slurm_dry_run_prints_one_task_per_gpu():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "--dry-run", "train",
                             "--gin_file=experiments/phi15.gin"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=8 --gpus-per-task=1")
    assert f"{ROOT}/.venv/bin/phi-jax train --gin_file=experiments/phi15.gin" in result.stdout


@pytest.mark.parametrize("where", ["--gin.DATA_DIR='gs://bucket/phi'", "$PHI_JAX_DATA_DIR"])
def test_a_url_data_dir_is_refused_before_anything_is_read(where, tmp_path, monkeypatch, capsys):
    # Every process reads the prepared shards from a filesystem, like the workdir: a bucket must be mounted.
    from phi_jax import cli

    monkeypatch.setenv("PHI_JAX_DATA_DIR", "gs://bucket/phi")
    flags = [where] if where.startswith("--") else []
    status = cli.main(["train", "--gin_file=tiny_cpu", f"--workdir={tmp_path}", "--gin.MIXTURE='phi15'", *flags])
    source = "DATA_DIR" if flags else "$PHI_JAX_DATA_DIR"
    assert status == 2
    assert f"mixture 'phi15': {source} 'gs://bucket/phi': gs:// URLs are not supported" in capsys.readouterr().err
