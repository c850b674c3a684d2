"""Training on several processes: data shards that do not depend on how many processes read them,
and `phi-jax train` itself as 2 processes on 127.0.0.1 (launch/local.sh, gloo). There each process
feeds its own data shard from the grain stream, both save the checkpoint and their data positions,
SIGTERM stops both at one step, and re-running the same command resumes, on 2 processes or on 1.
Every run must give the losses and params of one process running the same command uninterrupted."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from phi_jax import data
from phi_jax.checkpoint import DataHandler, DataPositionError, DataRestore
from tests.test_checkpoint import assert_same_params, wait_for_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Two data shards of 2 rows whatever the number of processes, so one process reads what two do.
TRAIN = [sys.executable, "-m", "phi_jax.cli", "train", "--gin_file=tiny_cpu", "--gin.TRAIN_STEPS=20",
         "--gin.CHECKPOINT_EVERY=8", "--gin.LOG_EVERY=1", "--gin.EVAL_EVERY=8", "--gin.BATCH_SIZE=4",
         "--gin.SEQ_LEN=32", "--gin_bindings=tiny.num_layers=1", "--gin_bindings=OptimizerConfig.warmup_steps=2",
         "--gin_bindings=TrainConfig.eval_steps=2", "--gin_bindings=TrainConfig.data_shards=2"]


def assert_side_by_side(batch, blocks):
    for key, value in batch.items():
        np.testing.assert_array_equal(value, np.concatenate([block[key] for block in blocks]))


def test_two_data_shards_read_by_one_process_are_the_rows_two_processes_read(tmp_path):
    shards = dict(data_dir=None, seq_len=32, seed=0, shard_count=2)
    apart = [data.make_train_iterator("default", batch_size=2, shard_index=i, **shards) for i in range(2)]
    together = data.make_train_iterator("default", batch_size=4, local_shards=2, **shards)
    for _ in range(3):
        assert_side_by_side(next(together), [next(it) for it in apart])

    # Each of two processes saved its own shard's position; one process resumes both.
    for i, it in enumerate(apart):
        (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps(it.get_state()))
    resumed = data.make_train_iterator("default", batch_size=4, local_shards=2, **shards)
    DataHandler().restore(epath.Path(tmp_path), DataRestore(resumed))
    assert_side_by_side(next(resumed), [next(it) for it in apart])

    other_layout = data.make_train_iterator("default", data_dir=None, seq_len=32, seed=0, batch_size=4)
    with pytest.raises(DataPositionError, match="split into 2 data shards, this one into 1.*data_shards=2"):
        DataHandler().restore(epath.Path(tmp_path), DataRestore(other_layout))


def test_a_data_position_saved_before_streams_named_their_shards_resumes():
    it = data.make_train_iterator("default", data_dir=None, seq_len=32, seed=0, batch_size=2)
    next(it)
    saved_then = it.get_state()["shards"]["0"]  # the whole state of a stream without ShardRows
    resumed = data.make_train_iterator("default", data_dir=None, seq_len=32, seed=0, batch_size=2)
    resumed.set_state(saved_then)
    assert_side_by_side(next(resumed), [next(it)])


def test_a_data_shard_that_ends_first_gives_padding_rows():
    shards = dict(data_dir=None, seq_len=512, shard_count=2)
    apart = [list(data.make_eval_iterator("default", batch_size=2, shard_index=i, **shards)) for i in range(2)]
    together = list(data.make_eval_iterator("default", batch_size=4, local_shards=2, **shards))
    assert len(apart[0]) != len(apart[1]) and len(together) == max(map(len, apart))
    padding = {key: np.zeros_like(value) for key, value in apart[0][0].items()}
    for step, batch in enumerate(together):
        assert_side_by_side(batch, [rows[step] if step < len(rows) else padding for rows in apart])


def start(workdir, processes):
    """The same command on 2 processes of 1 CPU device each, or on 1 process of 2 devices."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if processes == 2:
        command = [str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "1", "--command", "--"]
    else:
        command = []
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.Popen([*command, *TRAIN, f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def losses(workdir):
    """{(step, name): value} of the losses in metrics.jsonl; a step logged twice (by both processes,
    or again after a resume) fails."""
    values = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name in ("loss", "grad_norm", "eval_loss"):
            if name in record:
                assert (record["step"], name) not in values, f"step {record['step']} logged twice"
                values[record["step"], name] = record[name]
    return values


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    finish(start(workdir, 1))
    return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 2-process run stopped by SIGTERM to the launcher between its checkpoints: (workdir, output)."""
    workdir = tmp_path_factory.mktemp("stopped")
    process = start(workdir, 2)
    wait_for_step(workdir, 10, process)
    process.send_signal(signal.SIGTERM)
    return workdir, finish(process)


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_equal_one_process(single, stopped, tmp_path):
    workdir, output = stopped
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[0] == 8 and 10 <= saved[-1] < 20, saved
    assert output.count("preempted (SIGTERM)") == 2, output[-3000:]
    for process in range(2):  # each process saved the position of its own data shard only
        state = json.loads((workdir / "checkpoints" / str(saved[-1]) / "data" / f"process_{process}-of-2.json")
                           .read_text())
        assert list(state["shards"]) == [str(process)]

    shutil.copytree(workdir, tmp_path / "run")
    output = finish(start(tmp_path / "run", 2))
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / str(saved[-1])}" in output
    # Exact, as measured: with 2 data-parallel devices every cross-device sum has two terms and
    # a + b == b + a, so gloo between processes and one process's all-reduce give the same bits. (With 2
    # devices per process, sums of 4 terms group differently: losses then differ by about 1e-7 relative.)
    expected = losses(single)
    assert sorted(step for step, name in expected if name == "loss") == list(range(1, 21))
    assert losses(tmp_path / "run") == expected
    assert_same_params(tmp_path / "run", single)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(single, stopped, tmp_path):
    shutil.copytree(stopped[0], tmp_path / "run")
    output = finish(start(tmp_path / "run", 1))
    assert "resumed from" in output
    assert losses(tmp_path / "run") == losses(single)
    assert_same_params(tmp_path / "run", single)
