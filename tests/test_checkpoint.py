"""Fault tolerance: exact resume after kill -9 and SIGTERM, restore onto another mesh, damaged
checkpoints, failed background saves."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from phi_jax.checkpoint import (
    CheckpointRestoreError,
    CheckpointSaveError,
    ModelMismatchError,
    TrainCheckpoints,
    load_train_params,
)
from phi_jax.sharding import make_mesh, mesh_context
from phi_jax.train_step import abstract_state
from phi_jax.trainer import train
from tests.test_train import MODEL, OPTIMIZER, loop_config, make_batches

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, "-m", "phi_jax.cli", "train", "--gin_file=tiny_cpu", "--gin.TRAIN_STEPS=24",
         "--gin.CHECKPOINT_EVERY=8", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=0",
         "--gin_bindings=tiny.num_layers=1", "--gin_bindings=OptimizerConfig.warmup_steps=4"]


def start_training(workdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([*TRAIN, f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(workdir, step, process, timeout=240):
    metrics, deadline = pathlib.Path(workdir) / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.strip()):
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def finish(workdir):
    process = start_training(workdir)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def assert_same_params(a, b):
    _, params_a = load_train_params(a)
    _, params_b = load_train_params(b)
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    finish(workdir)
    return workdir


@pytest.mark.slow
def test_kill_9_between_checkpoints_resumes_bit_identically(tmp_path, uninterrupted):
    process = start_training(tmp_path)
    wait_for_step(tmp_path, 12, process)  # checkpoints at 8 and 16: killed in between
    process.send_signal(signal.SIGKILL)
    process.wait()
    output = finish(tmp_path)
    assert "resumed from" in output and "/checkpoints/8" in output
    assert_same_params(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_bit_identically(tmp_path, uninterrupted):
    process = start_training(tmp_path)
    wait_for_step(tmp_path, 11, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    saved = TrainCheckpoints(tmp_path).all_steps()
    assert "preempted (SIGTERM)" in output and saved[-1] not in (8, 16, 24)
    finish(tmp_path)
    assert_same_params(tmp_path, uninterrupted)


@pytest.fixture(scope="module")
def trained_on_fsdp_8(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp8")
    # A plain iterator (no data position is saved): these tests restore the state alone, and they run
    # on the GPU machines' stack too (.ci/newest_jax.sh), which has no grain.
    train(loop_config(train_steps=20, mesh_shape={"fsdp": 8}), workdir,
          train_iterator=iter(make_batches(20)), progress=False)
    return workdir


@pytest.mark.core
@pytest.mark.parametrize("shape, devices", [({"data": 1, "tensor": 2}, 2), ({"data": 2, "tensor": 2}, 4)])
def test_restore_onto_another_mesh(trained_on_fsdp_8, shape, devices):
    mesh = make_mesh(shape, jax.devices()[:devices])
    with mesh_context(mesh):
        state = TrainCheckpoints(trained_on_fsdp_8).restore(20, abstract_state(MODEL, OPTIMIZER, mesh), None)
    kernel = state.params["layers_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and tuple(kernel.sharding.spec) == ("fsdp", "tensor")
    _, expected = load_train_params(trained_on_fsdp_8)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), expected)
    assert int(state.step) == 20


@pytest.mark.core
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(trained_on_fsdp_8, tmp_path, caplog):
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained_on_fsdp_8), str(workdir)], check=True)
    state_dir = workdir / "checkpoints" / "20" / "state"
    victim = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    with mesh_context(mesh):
        step, state = TrainCheckpoints(workdir).restore_latest(abstract_state(MODEL, OPTIMIZER, mesh), None, MODEL)
    assert step == 10 and int(state.step) == 10
    assert "checkpoints/20 is damaged and skipped" in caplog.records[0].getMessage()


@pytest.mark.core
def test_nothing_restorable_is_an_error_not_a_fresh_start(trained_on_fsdp_8, tmp_path):
    workdir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained_on_fsdp_8), str(workdir)], check=True)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            for path in (step_dir / "state").rglob("*"):
                if path.is_file():
                    path.write_bytes(b"")
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    with mesh_context(mesh), pytest.raises(CheckpointRestoreError, match="none of the checkpoints"):
        TrainCheckpoints(workdir).restore_latest(abstract_state(MODEL, OPTIMIZER, mesh), None, MODEL)


@pytest.mark.core
def test_resuming_another_model_names_the_difference_and_calls_nothing_damaged(trained_on_fsdp_8, caplog):
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    checkpoints, other = TrainCheckpoints(trained_on_fsdp_8), MODEL.replace(num_layers=1)
    message = f"workdir {trained_on_fsdp_8} was trained with a different model: num_layers=2 there, 1 now"
    with mesh_context(mesh), pytest.raises(ModelMismatchError, match=re.escape(message)):
        checkpoints.restore_latest(abstract_state(other, OPTIMIZER, mesh), None, other)
    # How the model runs may change: another remat policy or compute dtype resumes.
    rerun = MODEL.replace(remat="full", dtype="bfloat16")
    with mesh_context(mesh):
        step, _ = checkpoints.restore_latest(abstract_state(rerun, OPTIMIZER, mesh), None, rerun)
    assert step == 20
    # Only our own records: another test's damaged checkpoint may still be failing a read in the
    # background (an orbax future on this worker) and log from there.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("phi_jax")]
    assert not any("damaged" in message for message in ours)


@pytest.mark.core
def test_a_url_workdir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'gs://bucket/run': gs:// URLs are not supported"):
        TrainCheckpoints("gs://bucket/run")
    assert list(tmp_path.iterdir()) == []


class _FailingCommit:
    def result(self, timeout=None):
        raise OSError("disk full (injected)")


@pytest.mark.core
def test_a_failed_background_save_stops_the_loop(tmp_path, monkeypatch):
    original = ocp.PyTreeCheckpointHandler.async_save

    async def failing_async_save(self, *args, **kwargs):
        return list(await original(self, *args, **kwargs) or []) + [_FailingCommit()]

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", failing_async_save)
    started = time.perf_counter()
    with pytest.raises(CheckpointSaveError, match="saving step 10 failed.*disk full"):
        train(loop_config(train_steps=30), tmp_path, train_iterator=iter(make_batches(30)), progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] <= 20, "the failure surfaced only at the next save"
    assert time.perf_counter() - started < 120
